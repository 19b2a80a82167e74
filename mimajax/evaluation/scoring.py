"""One pair of one system -> per-frame metrics, with the networks loaded once and the references analysed once.

Which metric compares what (G: generated frames, S: the source frame, D: the driving frames):

  metric  same_identity          cross_identity   definition (mimajax.metrics)
  psnr    G vs D (ground truth)  -                image.psnr, dB, per frame on [0, 1] RGB, at most PSNR_CAP
  ssim    G vs D                 -                image.ssim, Gaussian window (Wang et al. 2004)
  lpips   G vs D                 -                lpips.LPIPS (AlexNet by default; --lpips-net vgg)
  fid     all G vs all D         all G vs all D   fid.frechet_distance of FID Inception-v3 pool features; the real
                                                  set is the protocol's driving frames (real frames of the test set)
  csim    S vs G                 S vs G           cosine similarity of identity embeddings (--identity network)
  akd     G vs D                 G vs D           face_motion landmarks, mean pixel distance at 256 px
  apd     G vs D                 G vs D           mean |head angle difference|, radians
  aed     G vs D                 G vs D           mean |blendshape difference| (52 MediaPipe expression scores)
  exp     G vs D                 G vs D           L2 of the 64 expression coefficients (the dataset's 3DMM)
  pose    G vs D                 G vs D           mean |difference| of the 6 pose values (angles + translation)
  gaze    G vs D                 G vs D           mean |difference| of the 4 gaze values

A frame where a face network finds no face gives NaN for its metrics; the frame counts of every figure say how many
frames it averages, and the frames without a face are counted per pair and system (`no_face`). Every frame is
resized to the evaluation resolution (the dataset's frames) before it is scored, so systems that generate at other
sizes are compared on the same pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
FRAME_METRICS = ("psnr", "ssim", "lpips", "csim", "akd", "apd", "aed", "exp", "pose", "gaze")
ALL_METRICS = FRAME_METRICS[:3] + ("fid",) + FRAME_METRICS[3:]
GROUND_TRUTH_METRICS = ("psnr", "ssim", "lpips")  # same_identity only: cross_identity has no ground truth
MOTION_METRICS = ("akd", "apd", "aed", "exp", "pose", "gaze")
# Identical frames have an infinite PSNR; counting them as 100 dB keeps a mean finite (a copy of the ground truth, a
# static clip). Two 8-bit frames differing in one value reach 89 dB at 64 px, 101 dB at 256 px: at face-animation
# quality (20-30 dB) the cap never binds but for identical or near-identical frames.
PSNR_CAP = 100.0
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "csim": True}  # the rest: lower is better


def resize_frames(frames: np.ndarray, size: int, what: str = "frames") -> np.ndarray:
  """Square (T, H, W, 3) uint8 -> (T, size, size, 3): area when shrinking, cubic when enlarging. Non-square frames
  are refused (stretching them would score a distorted face): systems are compared on square face crops."""
  import cv2

  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] != frames.shape[2]:
    raise ValueError(f"{what}: frames of shape {frames.shape[1:]}; expected square RGB face crops (H = W)")
  if frames.shape[1:3] == (size, size):
    return frames
  interp = cv2.INTER_AREA if frames.shape[1] > size else cv2.INTER_CUBIC
  return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def to_unit(frames: np.ndarray) -> np.ndarray:
  return np.asarray(frames, np.float32) / 255.0


@dataclasses.dataclass
class Networks:
  """The face networks behind the metrics, loaded once; each names itself in the report."""

  lpips: Any
  inception: Any
  identity: Any
  face_motion: Any

  @classmethod
  def load(cls, *, lpips_net: str = "alex", identity: str = "dlib", identity_weights: str | None = None,
           inception_weights: str | None = None, face_model: str | None = None,
           landmarks: str = "mediapipe") -> "Networks":  # fmt: skip
    from mimajax.metrics import face_motion
    from mimajax.metrics import identity as identity_nets
    from mimajax.metrics.inception import FIDInception
    from mimajax.metrics.lpips import LPIPS

    try:
      motion = face_motion.FaceMotion.load(face_model=face_model, landmarks=landmarks)
    except ValueError as e:  # e.g. a BFM where the landmark model's expression basis was expected: no Exp
      log.warning("Exp is not available: the dataset's face model %s does not fit the landmark fit (%s)", face_model, e)
      motion = face_motion.FaceMotion.load(face_model=None, landmarks=landmarks)
    return cls(
      lpips=LPIPS.load(net=lpips_net),
      inception=FIDInception.load(path=inception_weights),
      identity=identity_nets.load_identity(identity, path=identity_weights),
      face_motion=motion,
    )

  def network_names(self) -> dict[str, str]:
    motion = str(getattr(self.face_motion, "network", "face motion"))
    return {
      "psnr": "pixels (RGB in [0, 1])",
      "ssim": "pixels (Gaussian-window SSIM, sigma 1.5)",
      "lpips": str(self.lpips.network),
      "fid": str(self.inception.network),
      "csim": str(self.identity.network),
      **{m: motion for m in MOTION_METRICS},
    }


@dataclasses.dataclass
class Analysis:
  """What the networks make of a set of frames, computed once and shared by every comparison that needs it."""

  features: np.ndarray  # (T, 2048) FID Inception pool features
  embedding: np.ndarray  # (T, D) identity embeddings
  found: np.ndarray  # (T,) the identity network found a face
  motion: Any  # face_motion.FaceMotionResult

  def repeat(self, t: int) -> "Analysis":
    """A one-frame analysis as that of the frame shown t times (the copy-source baseline)."""
    motion = dataclasses.replace(self.motion, **{
      f.name: np.repeat(getattr(self.motion, f.name), t, axis=0) for f in dataclasses.fields(self.motion)
      if isinstance(getattr(self.motion, f.name), np.ndarray)
    })  # fmt: skip
    return Analysis(np.repeat(self.features, t, 0), np.repeat(self.embedding, t, 0), np.repeat(self.found, t, 0),
                    motion)  # fmt: skip


@dataclasses.dataclass
class References:
  """What every system of one pair is compared with, analysed once: the source and the driver (= ground truth)."""

  source: np.ndarray  # (R, R, 3) uint8 at the evaluation resolution
  driver: np.ndarray  # (T, R, R, 3)
  source_analysis: Analysis  # of the one source frame
  driver_analysis: Analysis  # of the driving frames (the protocol's real set for FID)


class Scorer:
  def __init__(self, networks: Networks, resolution: int):
    self.nets = networks
    self.resolution = resolution

  def analyse(self, frames: np.ndarray) -> Analysis:
    frames = resize_frames(frames, self.resolution)
    emb, found = self.nets.identity.embed(frames)
    return Analysis(np.asarray(self.nets.inception.features(frames)), np.asarray(emb), np.asarray(found, bool),
                    self.nets.face_motion.analyze(frames))  # fmt: skip

  def references(self, source: np.ndarray, driver: np.ndarray) -> References:
    source = resize_frames(source[None], self.resolution)
    driver = resize_frames(driver, self.resolution)
    return References(source[0], driver, self.analyse(source), self.analyse(driver))

  def score(self, protocol: str, generated: np.ndarray, ref: References, analysis: Analysis | None = None, *,
            what: str = "generated frames") -> tuple[dict, Analysis]:  # fmt: skip
    """Per-frame values {metric: (T,)} of `generated` against `ref`, and the generated frames' analysis (given when
    already known: the baselines are the references' own frames)."""
    from mimajax.metrics import identity as identity_nets
    from mimajax.metrics import image
    from mimajax.metrics import motion as motion_metrics

    gen = resize_frames(generated, self.resolution, what)
    t = len(ref.driver)
    if len(gen) != t:
      raise ValueError(f"{len(gen)} generated frames for {t} driving frames")
    a = analysis if analysis is not None else self.analyse(gen)
    out: dict[str, np.ndarray] = {}
    if protocol == "same_identity":
      x, y = to_unit(gen), to_unit(ref.driver)
      out["psnr"] = np.minimum(np.asarray(image.psnr(x, y), np.float64), PSNR_CAP)
      out["ssim"] = np.asarray(image.ssim(x, y), np.float64)
      out["lpips"] = np.asarray(self.nets.lpips(x, y), np.float64)
    src = ref.source_analysis
    csim = np.asarray(identity_nets.cosine_similarity(np.repeat(src.embedding, t, 0), a.embedding), np.float64)
    csim[~a.found | ~src.found[0]] = np.nan
    out["csim"] = csim
    for name in MOTION_METRICS:
      if name == "exp" and (a.motion.expression is None or ref.driver_analysis.motion.expression is None):
        out[name] = np.full(t, np.nan)  # no expression basis for this data: Exp is not available
        continue
      out[name] = np.asarray(getattr(motion_metrics, name)(a.motion, ref.driver_analysis.motion), np.float64)
    return out, a


def no_face_frames(analysis: Analysis) -> int:
  """Frames of a system's output where the identity or the landmark network found no face (the references' own
  failures are counted apart, as the source's and the driver's)."""
  return int((~np.asarray(analysis.found, bool) | ~np.asarray(analysis.motion.found, bool)).sum())


def aggregate(per_frame: list[np.ndarray]) -> tuple[float | None, int]:
  """Mean over the valid frames of all pairs (each frame weighs the same), and their number. inf stays inf."""
  values = np.concatenate(per_frame) if per_frame else np.zeros(0)
  valid = values[~np.isnan(values)]
  if not len(valid):
    return None, 0
  mean = float(np.mean(valid))
  return (mean if math.isfinite(mean) else float("inf")), int(len(valid))
