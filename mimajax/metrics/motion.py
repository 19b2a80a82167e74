"""Motion metrics of a generated clip against its reference: AKD, APD, AED and MIMAFace's Exp / Pose / Gaze distances.

Each metric takes two mimajax.metrics.face_motion.FaceMotionResult of the same length (generated, reference), frame
t against frame t, and returns one distance per frame (T,), NaN where either frame has no face. `aggregate` then
reduces a metric to its mean over the valid frames and how many there were; the evaluator reports both, so a method
that loses the face is not rewarded by the frames it lost. Pure numpy: the networks ran in face_motion.

The papers' figures use other networks, so ours compare between methods measured here, not with published tables:
  AKD   FOMM / face-vid2vid: keypoints of a facial landmark detector (face-alignment's FAN) at 256 px
  APD   MMFA and face-vid2vid: head angles of Hopenet
  AED   face-vid2vid-style AED: an expression network's embedding (or 3DMM expression coefficients)
  Exp, Pose, Gaze   MIMAFace's table: distances of Deep3DFaceRecon coefficients (+ its gaze estimate)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


def _valid(gen, ref) -> np.ndarray:
  if len(gen.found) != len(ref.found):
    raise ValueError(f"generated and reference clips differ in length: {len(gen.found)} vs {len(ref.found)} frames")
  return np.asarray(gen.found, bool) & np.asarray(ref.found, bool)


def _per_frame(gen, ref, values: np.ndarray) -> np.ndarray:
  """values (T,) with NaN where either frame has no face, float64."""
  return np.where(_valid(gen, ref), np.asarray(values, np.float64), np.nan)


def _mean_abs(a, b) -> np.ndarray:
  return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=-1)


def akd(gen, ref) -> np.ndarray:
  """Average keypoint distance: the mean over landmarks of the Euclidean distance between the two frames' points,
  in pixels of frames resized to 256 x 256 (FOMM / face-vid2vid report AKD this way, with FAN's 68 points; ours are
  MediaPipe's 478 or dlib's 68, whichever both results hold)."""
  g, r = np.asarray(gen.landmarks, np.float64), np.asarray(ref.landmarks, np.float64)
  if g.shape[1:] != r.shape[1:]:
    raise ValueError(f"AKD needs the same landmarks in both clips; got {g.shape[1]} and {r.shape[1]} points")
  return _per_frame(gen, ref, np.linalg.norm(g - r, axis=-1).mean(axis=-1))


def apd(gen, ref) -> np.ndarray:
  """Average pose distance: the mean absolute difference of the three head angles (pitch, yaw, roll), radians.
  MMFA's APD uses Hopenet's angles (in degrees); ours are the landmark fit's (mimajax.faces.motion_fit)."""
  return _per_frame(gen, ref, _mean_abs(gen.angles, ref.angles))


def aed(gen, ref) -> np.ndarray:
  """Average expression distance: the mean absolute difference of the 52 MediaPipe blendshape scores (each in
  [0, 1]). face-vid2vid-style AED compares an expression network's embedding or 3DMM expression coefficients;
  ours uses MediaPipe's blendshapes, which need no identity-free expression network."""
  return _per_frame(gen, ref, _mean_abs(gen.blendshapes, ref.blendshapes))


def exp(gen, ref) -> np.ndarray:
  """MIMAFace's Exp: the L2 distance of the 64 expression coefficients (the face model's whitened PCA, in
  MIMAFace the Deep3DFaceRecon BFM expression). Needs results analysed with a face model."""
  if gen.expression is None or ref.expression is None:
    raise ValueError("the Exp distance needs expression coefficients: analyse both clips with a face model")
  diff = np.asarray(gen.expression, np.float64) - np.asarray(ref.expression, np.float64)
  return _per_frame(gen, ref, np.linalg.norm(diff, axis=-1))


def pose(gen, ref) -> np.ndarray:
  """MIMAFace's Pose: the mean absolute difference over the six pose values, the three angles (radians) and the
  translation (model units, decimetres), as Deep3DFaceRecon's angle + trans groups."""
  g = np.concatenate([gen.angles, gen.translation], axis=-1)
  r = np.concatenate([ref.angles, ref.translation], axis=-1)
  return _per_frame(gen, ref, _mean_abs(g, r))


def gaze(gen, ref) -> np.ndarray:
  """MIMAFace's Gaze: the mean absolute difference of the four gaze values (iris offsets relative to the eye
  corners, head pose removed; mimajax.faces.motion_fit.gaze)."""
  return _per_frame(gen, ref, _mean_abs(gen.gaze, ref.gaze))


METRICS: dict[str, Callable] = {"akd": akd, "apd": apd, "aed": aed, "exp": exp, "pose": pose, "gaze": gaze}


@dataclasses.dataclass(frozen=True)
class MotionScore:
  """A metric over a clip: the mean over valid frames (NaN when none), the valid frames and all frames."""

  mean: float
  valid: int
  frames: int


def aggregate(per_frame: np.ndarray) -> MotionScore:
  """Per-frame distances (T,), NaN for frames without a face in either clip -> MotionScore."""
  values = np.asarray(per_frame, np.float64).reshape(-1)
  ok = np.isfinite(values)
  mean = float(values[ok].mean()) if ok.any() else float("nan")
  return MotionScore(mean=mean, valid=int(ok.sum()), frames=int(values.size))


def frame_distances(gen, ref, names=None) -> dict[str, np.ndarray]:
  """{metric: (T,) per-frame distances} for `names` (default: every metric, Exp only when both clips carry
  expression coefficients)."""
  if names is None:
    has_expression = gen.expression is not None and ref.expression is not None
    names = [n for n in METRICS if n != "exp" or has_expression]
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown motion metrics {unknown}; expected some of {list(METRICS)}")
  return {n: METRICS[n](gen, ref) for n in names}


def motion_scores(gen, ref, names=None) -> dict[str, MotionScore]:
  """{metric: MotionScore} of the generated clip against the reference (see frame_distances for `names`)."""
  return {n: aggregate(v) for n, v in frame_distances(gen, ref, names).items()}
