"""Five-point face alignment for Deep3DFaceRecon's coefficient network, and the inverse that puts renders back.

Five points (image left to right: eye, eye, nose tip, mouth corner, mouth corner), from FaceMesh's 478 landmarks
(mimajax.faces.landmarks) with the definitions Deep3DFaceRecon's `extract_5p` uses on dlib's 68 points (eye =
the mean of its two corners, the nose tip, the mouth corners):

  eye at image left    mean of 33 (outer corner) and 133 (inner)      dlib 37, 40 (1-based)
  eye at image right   mean of 362 (inner) and 263 (outer)            dlib 43, 46
  nose tip             1                                              dlib 31
  mouth corners        61 (image left), 291 (image right)            dlib 49, 55

For the release's alignment the eyes are the iris centres 468 and 473 instead (`eyes="iris"`): its MTCNN points are
eye centres, and mimajax.mimaface.face_features takes the same five for the same matrix (the release aligns D3DFR's
and CurricularFace's inputs with one warp).

Two alignments, as their networks were trained:

  deep3d_align    Deep3DFaceRecon's util/preprocess.py `align_img`: POS (a least-squares affine camera) of the
                  standard 3D five points LM3D to the image points, with y up; scale s = 102 / the camera's mean row
                  norm; the image resized by s (PIL bicubic, integer size) and cropped to 224 around the face.
  release_warp    the MIMAFace release (dataset/face_util.py `get_affine_transform`, used in infer_video.py): the
                  least-squares similarity of the points onto `mean_face_lm5p_256` (ArcFace's 112-px template moved
                  by 8 px, doubled, shifted 16 px right), applied with cv2.warpAffine to a 256 crop of the 512 frame.
                  The release renders its BFM at 256 (focal 1015 * 256 / 224, the same field of view as 224) in that
                  crop and warps render and mask back with cv2.invertAffineTransform's inverse (kornia warp_affine,
                  bilinear) onto the 512 frame, background -1 (`warp_back`).

Conventions: landmarks and points are the project's continuous pixels (pixel centres at +0.5); every 2x3 matrix
here maps pixel *index* coordinates (cv2's: pixel centres at integers), frame -> crop, as cv2.warpAffine takes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EYE_LEFT, EYE_RIGHT, NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = (33, 133), (362, 263), 1, 61, 291

# Deep3DFaceRecon's standard five points (util/load_mats.py load_lm3d of similarity_Lm3D_all.mat: the BFM's 68
# landmarks reduced by extract_5p), x right, y up, BFM units; the order of `five_points`.
LM3D = np.array(
  [
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032535, -0.04617932, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
  ]
)
DEEP3D_SIZE, DEEP3D_RESCALE = 224, 102.0
# The release's mean_face_lm5p_256: ArcFace's template (x + 8) * 2 + 16, y * 2, in index coordinates of the 256 crop.
ARCFACE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                        [62.7299, 92.2041]])  # fmt: skip
RELEASE_TEMPLATE_256 = np.stack([(ARCFACE_112[:, 0] + 8) * 2 + 16, ARCFACE_112[:, 1] * 2], axis=1)
RELEASE_SIZE, RELEASE_FRAME = 256, 512


IRIS_LEFT, IRIS_RIGHT = 468, 473


def five_points(landmarks: np.ndarray, eyes: str = "corners") -> np.ndarray:
  """FaceMesh landmarks (..., 478, >= 2) -> (..., 5, 2) in the same (continuous pixel) coordinates; eyes "corners"
  (Deep3DFaceRecon's dlib definition) or "iris" (MTCNN's eye centres, the release's)."""
  lm = np.asarray(landmarks, np.float64)[..., :2]
  if eyes == "corners":
    left, right = lm[..., EYE_LEFT, :].mean(-2), lm[..., EYE_RIGHT, :].mean(-2)
  elif eyes == "iris":
    left, right = lm[..., IRIS_LEFT, :], lm[..., IRIS_RIGHT, :]
  else:
    raise ValueError(f"eyes={eyes!r}; expected 'corners' or 'iris'")
  return np.stack([left, right, lm[..., NOSE_TIP, :], lm[..., MOUTH_LEFT, :], lm[..., MOUTH_RIGHT, :]], axis=-2)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """A 2x3 index-coordinate matrix applied to continuous-pixel points (..., 2) -> continuous pixels."""
  p = np.asarray(points, np.float64) - 0.5
  return p @ np.asarray(matrix, np.float64)[:, :2].T + np.asarray(matrix, np.float64)[:, 2] + 0.5


def invert_affine(matrix: np.ndarray) -> np.ndarray:
  """The inverse 2x3 transform (cv2.invertAffineTransform)."""
  m = np.asarray(matrix, np.float64)
  inv = np.linalg.inv(m[:, :2])
  return np.concatenate([inv, -inv @ m[:, 2:]], axis=1)


def warp(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """cv2.warpAffine(image, matrix, (W, H)), bilinear, zeros outside: the release's crop and its warp back."""
  import cv2

  w, h = (size, size) if isinstance(size, int) else (size[1], size[0])
  return cv2.warpAffine(np.asarray(image), np.asarray(matrix, np.float64), (w, h), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip


# ------------------------------------------------------------------------------------------------------- the release


def release_warp(points: np.ndarray, template: np.ndarray = RELEASE_TEMPLATE_256) -> np.ndarray:
  """Five continuous-pixel points (5, 2) -> the 2x3 similarity [[a, -b, tx], [b, a, ty]] onto the release's 256
  template, least squares (what get_affine_transform's normal equations solve), in index coordinates as the release's
  MTCNN points are."""
  src = np.asarray(points, np.float64) - 0.5
  x, y = src[:, 0], src[:, 1]
  one, zero = np.ones_like(x), np.zeros_like(x)
  design = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
  target = np.concatenate([template[:, 0], template[:, 1]])
  (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
  return np.array([[a, -b, tx], [b, a, ty]])


def warp_back(render: np.ndarray, mask: np.ndarray, inverse: np.ndarray, size: int = RELEASE_FRAME,
              background: float = 0.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
  """A crop's render (S, S, 3) float and mask (S, S[, 1]) -> (image, mask) in the frame, as the release composes
  them: both warped bilinearly by `inverse`, then image * mask + background * (1 - mask) (the release's -1 in
  [-1, 1] is 0 here, in [0, 1])."""
  img = warp(np.asarray(render, np.float32), inverse, size)
  m = warp(np.asarray(mask, np.float32).reshape(mask.shape[:2]), inverse, size)[..., None]
  return img * m + background * (1.0 - m), m


# ---------------------------------------------------------------------------------------------------- Deep3DFaceRecon


def pos(points_up: np.ndarray, lm3d: np.ndarray = LM3D) -> tuple[np.ndarray, float]:
  """Deep3DFaceRecon's POS: the affine camera xp = R3x3 X + t by least squares -> (t (2,), s = mean of the two rows'
  norms). Points (5, 2) with y up."""
  n = len(lm3d)
  design = np.zeros((2 * n, 8))
  design[0::2, 0:3], design[0::2, 3] = lm3d, 1
  design[1::2, 4:7], design[1::2, 7] = lm3d, 1
  k, *_ = np.linalg.lstsq(design, np.asarray(points_up, np.float64).reshape(-1), rcond=None)
  return np.array([k[3], k[7]]), float((np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2)


@dataclasses.dataclass(frozen=True)
class Deep3DCrop:
  """align_img's result: the 224 crop, the frame -> crop matrix (index coordinates), and its trans_params."""

  image: np.ndarray  # (224, 224, 3) uint8
  matrix: np.ndarray  # (2, 3)
  trans_params: np.ndarray  # (w0, h0, s, tx, ty), Deep3DFaceRecon's record of the alignment


def deep3d_transform(points: np.ndarray, width: int, height: int, target_size: int = DEEP3D_SIZE,
                     rescale_factor: float = DEEP3D_RESCALE) -> tuple[np.ndarray, tuple, np.ndarray]:  # fmt: skip
  """align_img's geometry without the pixels: (frame -> crop matrix, (resized w, h, left, up), trans_params)."""
  idx = np.asarray(points, np.float64) - 0.5
  up_points = np.stack([idx[:, 0], height - 1 - idx[:, 1]], axis=1)  # test.py flips y before align_img
  t, s = pos(up_points)
  s = rescale_factor / s
  w, h = int(width * s), int(height * s)  # astype(np.int32): truncation
  left = int(w / 2 - target_size / 2 + float((t[0] - width / 2) * s))
  up = int(h / 2 - target_size / 2 + float((height / 2 - t[1]) * s))
  # PIL's resize maps pixel centres: (x + 0.5) * w / w0 - 0.5; the crop then shifts by (left, up)
  sx, sy = w / width, h / height
  matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5 - left], [0.0, sy, 0.5 * sy - 0.5 - up]])
  return matrix, (w, h, left, up), np.array([width, height, s, t[0], t[1]])


def deep3d_align(image: np.ndarray, points: np.ndarray, target_size: int = DEEP3D_SIZE,
                 rescale_factor: float = DEEP3D_RESCALE) -> Deep3DCrop:  # fmt: skip
  """Deep3DFaceRecon's align_img on an RGB uint8 frame and its five continuous-pixel points: PIL bicubic resize and
  crop (zeros outside the frame), as the network was trained."""
  from PIL import Image

  h0, w0 = image.shape[:2]
  matrix, (w, h, left, up), params = deep3d_transform(points, w0, h0, target_size, rescale_factor)
  resized = Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), resample=Image.Resampling.BICUBIC)
  crop = np.asarray(resized.crop((left, up, left + target_size, up + target_size)).convert("RGB"))
  return Deep3DCrop(crop, matrix, params)


def deep3d_template(target_size: int = DEEP3D_SIZE, rescale_factor: float = DEEP3D_RESCALE) -> np.ndarray:
  """Where align_img puts a frontal face's five points in its crop (continuous pixels, rows down): the centre plus
  rescale_factor times LM3D's x, y."""
  c = target_size / 2
  return np.stack([c + rescale_factor * LM3D[:, 0], c - rescale_factor * LM3D[:, 1]], axis=1)
