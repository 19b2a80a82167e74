"""The release MIA's face-recognition input: CurricularFace IR-101 `deep_features` (512x7x7 -> 25088) of a portrait.

What the official release (MIMAFace2024/MIMAFace) feeds its MIA, in `infer_video.py` and `train_video.py` alike:

  frame      the 512-px face crop the model animates (the release's MTCNN-box crop; ours: animate's face crop)
  5 points   MTCNN's (facenet_pytorch) landmarks on that frame: eye, eye, nose tip, mouth corner, mouth corner
             (image left first)
  matrix     `face_util.get_affine_transform(pts5, mean_face_lm5p_256)`: the least-squares similarity (scale,
             rotation, shift; no shear) taking the points to InsightFace's standard 5-point template laid out at 256
             px: x -> (x + 8) * 2 + 16, y -> y * 2 of the 112x96 ArcFace template, so the face fills rows 0:224,
             columns 16:240 of a 256 crop
  warp       `kornia.geometry.warp_affine(frame in [-1, 1], matrix, dsize=(512, 512))`: bilinear, pixel centres at
             integer coordinates (align_corners=True), zeros outside (0 is mid-grey in [-1, 1]). The output keeps the
             frame's size although the matrix is the 256-px one, so the aligned face sits in the top-left quarter
  crop       `CurricularFaceOurCrop.deep_features`: bilinear resize to 256, rows 0:224, columns 16:240, resize to
             112 (both F.interpolate, align_corners=False) -> IR-101 input layer + body -> flattened NCHW (25088)

The release's crop expects the face in the whole 256 image, but its warp leaves it in the top-left 128x128 of it, so
the network sees a small face in the corner of a grey-bordered picture. The model was trained on exactly that input,
so this port reproduces the quirk rather than fixing it.

The 5 points come from MediaPipe FaceMesh (mimajax.faces.landmarks, already used for the motion) rather than MTCNN,
whose networks are not available offline: FIVE_POINTS are the indices of MTCNN's five (iris centres for its eye
points, FaceMesh's nose tip, the outer mouth corners). The similarity fit averages small differences in where the
two detectors place them over the five points.

The weights: the release loads `models/ArcFace/CurricularFace_Backbone.pth` of its project tree (the HuggingFace
repo MIMAFace/MIMAFace holds code and weights; the model folders are `checkpoints/{image,video}`). `find_weights`
looks next to mim.pth first, then in that project layout (`weights_candidates`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from mimajax.errors import CheckpointReadError
from mimajax.metrics import ir101

WEIGHTS_FILE = ir101.WEIGHTS_FILE  # CurricularFace_Backbone.pth
RELEASE_WEIGHTS_DIR = Path("models", "ArcFace")  # where the release's CurricularFaceOurCrop reads it from
FEATURE_DIM = 512 * 7 * 7
ALIGNED_SIZE = 256  # the side the alignment template is laid out for
# FaceMesh indices of MTCNN's five points, in its order: iris centre at image left (refine_landmarks order), the
# other iris centre, the nose tip, the mouth corner at image left, the other mouth corner.
FIVE_POINTS = (468, 473, 1, 61, 291)
# InsightFace's standard 5-point template of a 112x96 ArcFace crop (eyes, nose tip, mouth corners; image left first).
ARCFACE_TEMPLATE_112x96 = np.array(
  [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
)
# The release's mean_face_lm5p_256: the template widened to 112x112 (+8), doubled, shifted right by 16.
TEMPLATE_256 = np.stack([(ARCFACE_TEMPLATE_112x96[:, 0] + 8) * 2 + 16, ARCFACE_TEMPLATE_112x96[:, 1] * 2], axis=1)


# ----------------------------------------------------------------------------- the five points and the alignment


def five_points(landmarks: np.ndarray) -> np.ndarray:
  """FaceMesh landmarks (478, 2 | 3) in mimajax's convention (pixel centres at +0.5) -> (5, 2) MTCNN-order points
  with pixel centres at integer coordinates, the convention of the warp (cv2 / kornia align_corners=True)."""
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.ndim != 2 or landmarks.shape[0] <= max(FIVE_POINTS):
    raise ValueError(f"expected FaceMesh's 478 landmarks (478, 2|3); got {landmarks.shape}")
  return landmarks[list(FIVE_POINTS), :2] - 0.5


def detect_five_points(frame: np.ndarray, landmarker=None) -> np.ndarray:
  """The five points (5, 2) of the face in `frame` (H, W, 3) uint8; ValueError when FaceMesh finds none."""
  from mimajax.faces import landmarks as face_landmarks

  if landmarker is None:
    try:
      face_landmarks.check_available()
    except face_landmarks.LandmarkerUnavailable as e:
      raise ValueError(f"the release's face features need FaceMesh's landmarks ({e}); or pass them as a file") from e
    landmarker = face_landmarks.FaceLandmarker()
  points, found = landmarker.track([np.asarray(frame)])
  if not found[0]:
    raise ValueError(f"FaceMesh found no face in the {frame.shape[1]}x{frame.shape[0]} source crop")
  return five_points(points[0])


def similarity_transform(points: np.ndarray, template: np.ndarray = TEMPLATE_256) -> np.ndarray:
  """The 2x3 similarity [[a, -b, tx], [b, a, ty]] taking `points` to `template` in the least-squares sense.

  The release solves the normal equations of this problem (cv2.solve, SVD); a least-squares solve of the stacked
  point equations has the same minimiser, better conditioned.
  """
  p = np.asarray(points, np.float64)
  q = np.asarray(template, np.float64)
  if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 2 or len(p) < 2:
    raise ValueError(f"points {p.shape} and template {q.shape} must be matching (N >= 2, 2) arrays")
  ones, zeros = np.ones(len(p)), np.zeros(len(p))
  # x' = a x - b y + tx ;  y' = b x + a y + ty
  rows = np.concatenate([np.stack([p[:, 0], -p[:, 1], ones, zeros], 1), np.stack([p[:, 1], p[:, 0], zeros, ones], 1)])
  a, b, tx, ty = np.linalg.lstsq(rows, np.concatenate([q[:, 0], q[:, 1]]), rcond=None)[0]
  return np.array([[a, -b, tx], [b, a, ty]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
  """(H, W, C) -> (size, size, C) float32: output pixel (x, y) samples the input at matrix^-1 (x, y) bilinearly.

  Pixel centres at integer coordinates; each of the four neighbours outside the image contributes `fill`, as
  torch's grid_sample with zero padding (kornia's warp_affine, the release's) does for fill 0. Computed in float64:
  it is a few hundred thousand taps, and exactness keeps the parity check about the network.
  """
  image = np.asarray(image, np.float64)
  h, w = image.shape[:2]
  forward = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
  inverse = np.linalg.inv(forward)[:2]
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  x0, y0 = np.floor(sx), np.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0, y0 = x0.astype(np.int64), y0.astype(np.int64)

  def tap(yi, xi):
    inside = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h))[..., None]
    return np.where(inside, image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], fill)

  top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
  bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def network_input(frame: np.ndarray, points: np.ndarray) -> jax.Array:
  """A square uint8 frame (S, S, 3) and its five points -> the IR-101 input (1, 112, 112, 3) in [-1, 1].

  The warp runs on pixel values with a mid-grey fill (127.5), which is the release's zero fill on [-1, 1] values:
  the normalisation is affine and the bilinear weights sum to one, so both orders give the same numbers.
  """
  frame = np.asarray(frame)
  if frame.ndim != 3 or frame.shape[0] != frame.shape[1] or frame.shape[2] != 3:
    raise ValueError(f"the face-feature frame must be a square RGB image (S, S, 3); got {frame.shape}")
  warped = warp_affine(frame, similarity_transform(points), frame.shape[0], fill=127.5)
  return ir101.preprocess(warped[None], crop="release")


# ----------------------------------------------------------------------------- the IR-101 weights of a release


def weights_candidates(release_dir: str | os.PathLike) -> list[Path]:
  """Where a release folder's CurricularFace weights may be: next to mim.pth; under the folder as the release's
  project tree; or in the project tree two levels up (the model folder being <project>/checkpoints/video)."""
  root = Path(release_dir)
  return [root / WEIGHTS_FILE, root / RELEASE_WEIGHTS_DIR / WEIGHTS_FILE,
          root.parent.parent / RELEASE_WEIGHTS_DIR / WEIGHTS_FILE]  # fmt: skip


def find_weights(release_dir: str | os.PathLike) -> Path:
  """The first of `weights_candidates` that exists, or CheckpointReadError naming the file and every place."""
  candidates = weights_candidates(release_dir)
  for path in candidates:
    if path.is_file():
      return path
  raise CheckpointReadError(
    f"the release variant's face features need {WEIGHTS_FILE} (CurricularFace IR-101, shipped in the release's "
    f"{RELEASE_WEIGHTS_DIR}/); looked in {', '.join(str(p.parent) for p in candidates)}: copy it next to mim.pth "
    "(or pass --face-features FILE.npy)"
  )


def units_from_state(state: dict[str, np.ndarray]) -> tuple[int, ...]:
  """IR units per stage read off a state dict's body keys (IR-101 gives [3, 13, 30, 3]; smaller nets load too)."""
  depth_of = {}
  for key, value in state.items():
    m = re.fullmatch(r"body\.(\d+)\.res_layer\.1\.weight", key)
    if m:
      depth_of[int(m.group(1))] = int(np.shape(value)[0])
  units = tuple(sum(1 for d in depth_of.values() if d == depth) for depth in ir101.DEPTHS)
  if not depth_of or sorted(depth_of) != list(range(len(depth_of))) or min(units) < 1:
    raise CheckpointReadError(f"not a CurricularFace IR backbone state dict (body units per stage: {list(units)})")
  return units


def load_backbone(path: str | os.PathLike) -> ir101.IRBackbone:
  """A CurricularFace IR state dict (.pth), strictly imported, at the depth its keys have."""
  try:
    state = ir101.read_torch_state(path)
  except (OSError, RuntimeError, ValueError) as e:
    raise CheckpointReadError(f"cannot read {path} as a CurricularFace state dict ({type(e).__name__}: {e})") from e
  return ir101.ir_from_state_dict(state, units_from_state(state), where=f"{path}")


class FaceFeatures:
  """The release's face feature of a frame: `features(frame) -> (1, 25088)` float32.

  From a weights file, or from a release folder (`for_release`), whose file is looked for on first use: loading a
  release needs no IR weights when the caller brings the features itself (--face-features). The weights are read
  once and the network's forward compiled once.
  """

  def __init__(self, weights: str | os.PathLike | None = None, *, release_dir: str | os.PathLike | None = None,
               landmarker=None):  # fmt: skip
    if (weights is None) == (release_dir is None):
      raise ValueError("FaceFeatures takes a weights file or a release folder (one of them)")
    self._weights = None if weights is None else Path(weights)
    self._release_dir = release_dir
    self._landmarker = landmarker
    self._forward = None

  @classmethod
  def for_release(cls, release_dir: str | os.PathLike, **kw) -> "FaceFeatures":
    return cls(release_dir=release_dir, **kw)

  @property
  def weights(self) -> Path:
    """The IR weights file (a release folder's found now: CheckpointReadError naming where it was looked for)."""
    if self._weights is None:
      self._weights = find_weights(self._release_dir)
    if not self._weights.is_file():
      raise CheckpointReadError(f"{WEIGHTS_FILE}: {self._weights} is not a file")
    return self._weights

  def deep_features(self, x: jax.Array) -> np.ndarray:
    """IR inputs (N, 112, 112, 3) in [-1, 1] -> (N, 25088) body features (NCHW flatten order)."""
    if self._forward is None:
      graphdef, state = nnx.split(load_backbone(self.weights))
      forward = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)[1])
      self._forward = lambda v: forward(state, v)
    return np.asarray(self._forward(x), np.float32)

  def __call__(self, frame: np.ndarray, points: Sequence | None = None) -> np.ndarray:
    """(1, 25088) of a square uint8 frame (the model's source crop); `points` (5, 2) skip the landmark detection."""
    self.weights  # noqa: B018  (a missing file is reported before the landmarks run)
    points = detect_five_points(frame, self._landmarker) if points is None else np.asarray(points, np.float64)
    return self.deep_features(network_input(frame, points))
