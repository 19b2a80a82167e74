"""MIMAFace motion coefficients (pose, expression, gaze) fitted to one face's FaceMesh landmarks, frame by frame.

The dataset's motion extraction (`mimajax extract-motion`, data_pipeline.motion_extraction) and `mimajax animate`'s
video drivers and source portraits (mimajax.mimaface.driving) turn landmarks into coefficients the same way, so a
driver's rows are exactly what training saw; this module is that shared fit. The dataset-level parts (landmark
caches, the expression PCA over all clips, files) stay in the data pipeline.

Rows have Deep3DFaceRecon's layout plus gaze (mimajax.face3d.coefficients, 261 columns) and are rendered with the
landmark morphable model (mimajax.face3d.landmark_model) whose expression basis they were projected on.
Per frame, in Deep3DFaceRecon's camera (focal 1015, centre 112 at 224 px, camera at z = 10; face3d/camera.py), from
478 landmarks in a face crop scaled to 224 px (`to_fit_pixels`):
  rigid fit   each landmark is back-projected along its pixel's ray to depth D (1 + z / 1015), MediaPipe's z being a
              relative depth in pixels; a weighted Umeyama similarity of MediaPipe's canonical face (its procrustes
              landmarks and weights) to these points at D = 1 gives R, s, t1. Units: the canonical face in
              decimetres (the BFM's units), and a face is taken to be canonical-sized, so its apparent size sets its
              distance: D = 1 / s, translation = t1 / s + (0, 0, 10). Then R X + translation projects exactly onto the
              landmarks for the landmarks' own shape X.
  angle       Euler (x, y, z) with R = Rz Ry Rx, so compute_rotation(angle) = R^T (the row-vector M) reproduces it
  shape       R^T (P - translation): the landmarks in the canonical frame
  gaze        iris centre - eye-corner midpoint, / corner distance, in the canonical frame (head pose removed), for the
              eye at -x (a) and +x (b): [mean x, mean y, (a - b) x / 2, (a - b) y / 2], minus the canonical face's
              values (0 = looking straight ahead). A horizontal mirror swaps the eyes and negates x, so it negates
              columns 0 and 3 only (GAZE_MIRROR_COLUMNS; data_pipeline.loader's flip).
  expression  the shape's least-squares coefficients in a PCA basis (mean shape + basis @ beta, whitened; the dataset
              fits it, face_model.npz stores it), zero-padded to 64
Identity and texture columns are zero; gamma is DEFAULT_GAMMA: Deep3DFaceRecon's built-in ambient 0.8 plus a weak
light from the camera (band z, 0.2), so a render shows the face's relief rather than a flat silhouette.
Frames without a face are filled from their neighbours first (`fill_gaps`).
"""

from __future__ import annotations

import numpy as np

from mimajax.face3d.camera import DEEP3D_CENTER, DEEP3D_DISTANCE, DEEP3D_FOCAL, DEEP3D_SIZE
from mimajax.face3d.coefficients import COEFFICIENT_SLICES, COEFFICIENT_WIDTHS
from mimajax.face3d.landmark_model import canonical_face_mesh

# MediaPipe's geometry pipeline (face_geometry/data/geometry_pipeline_metadata_landmarks.pbtxt): landmarks that move
# little with expression, and their procrustes weights (nose bridge and alae, eye corners, cheekbones, forehead).
RIGID_WEIGHTS = {
  4: 0.0709, 6: 0.0321, 10: 0.0084, 33: 0.0587, 54: 0.0077, 67: 0.0091, 117: 0.0098, 119: 0.0146, 121: 0.0186,
  127: 0.0052, 129: 0.1206, 132: 0.0056, 133: 0.0533, 136: 0.0669, 143: 0.0148, 147: 0.0143, 198: 0.0255,
  205: 0.0473, 263: 0.0587, 284: 0.0077, 297: 0.0091, 346: 0.0098, 348: 0.0146, 350: 0.0186, 356: 0.0052,
  358: 0.1206, 361: 0.0056, 362: 0.0533, 365: 0.0669, 372: 0.0148, 376: 0.0143, 420: 0.0255, 425: 0.0473,
}  # fmt: skip
# (iris centre, eye corner, eye corner): the eye at -x (image left), then at +x
GAZE_EYES = ((468, 33, 133), (473, 362, 263))
GAZE_MIRROR_COLUMNS = (0, 3)  # within the 4 gaze values: mean x and the eyes' y difference flip under a mirror
FRONT_LIGHT = 0.2
DEFAULT_GAMMA = np.zeros((3, 9), np.float32)
DEFAULT_GAMMA[:, 2] = FRONT_LIGHT  # SH band z (towards the camera) of each colour; band 0 keeps the 0.8 ambient
DEFAULT_GAMMA = DEFAULT_GAMMA.reshape(27)


def to_fit_pixels(landmarks: np.ndarray, side: int) -> np.ndarray:
  """Landmarks in pixels of a square face crop of `side` pixels -> the 224-px crop pixels the fit works in."""
  return landmarks * np.float32(DEEP3D_SIZE / side)  # x, y and z alike


def similarity_fit(src: np.ndarray, dst: np.ndarray, weights: np.ndarray):
  """Weighted Umeyama: dst (T, K, 3) ~ s R src (K, 3) + t -> s (T,), R (T, 3, 3) proper rotations, t (T, 3)."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = w @ src, np.einsum("k,tkc->tc", w, dst)
  sc, dc = src - mu_s, dst - mu_d[:, None]
  u, sv, vt = np.linalg.svd(np.einsum("k,tki,kj->tij", w, dc, sc))
  d = np.sign(np.linalg.det(u @ vt))  # a reflection would fit better only for mirrored input: never allowed
  flip = np.stack([np.ones_like(d), np.ones_like(d), d], -1)
  rotation = u @ (flip[..., None] * vt)
  scale = (sv * flip).sum(-1) / (w @ (sc**2).sum(-1))
  return scale, rotation, mu_d - scale[:, None] * np.einsum("tij,j->ti", rotation, mu_s)


def rotation_to_angles(rotation: np.ndarray) -> np.ndarray:
  """R = Rz(z) Ry(y) Rx(x) (..., 3, 3) -> (..., 3) (x, y, z): the inverse of compute_rotation (which returns R^T)."""
  r = np.asarray(rotation, np.float64)
  y = np.arcsin(np.clip(-r[..., 2, 0], -1.0, 1.0))
  return np.stack([np.arctan2(r[..., 2, 1], r[..., 2, 2]), y, np.arctan2(r[..., 1, 0], r[..., 0, 0])], axis=-1)


def backproject(points: np.ndarray) -> np.ndarray:
  """Landmarks (..., N, 3) in 224-px crop pixels (x, y down, z) -> world points for a reference depth of 1.

  World = D * this + (0, 0, 10) for the face at depth D (camera space is (x, y, 10 - z), see camera.py).
  """
  p = np.asarray(points, np.float64)
  k = 1.0 + p[..., 2] / DEEP3D_FOCAL  # depth relative to the reference depth
  x = (p[..., 0] - DEEP3D_CENTER) / DEEP3D_FOCAL * k
  y = (DEEP3D_SIZE - p[..., 1] - DEEP3D_CENTER) / DEEP3D_FOCAL * k  # rows grow down, v grows up
  return np.stack([x, y, -k], axis=-1)


def fit_pose(points: np.ndarray) -> dict[str, np.ndarray]:
  """Landmarks (T, 478, 3) in 224-px crop pixels -> angle (T, 3), translation (T, 3), shape (T, 478, 3) canonical."""
  canonical, _ = canonical_face_mesh()
  idx = np.fromiter(RIGID_WEIGHTS, int)
  unit = backproject(points)
  scale, rotation, t1 = similarity_fit(canonical[idx], unit[:, idx], np.fromiter(RIGID_WEIGHTS.values(), float))
  depth = 1.0 / scale  # the face at canonical size
  translation = t1 * depth[:, None] + np.array([0.0, 0.0, DEEP3D_DISTANCE])
  world = unit * depth[:, None, None] + np.array([0.0, 0.0, DEEP3D_DISTANCE])
  shape = np.einsum("tji,tnj->tni", rotation, world - translation[:, None])  # R^T (P - t)
  return dict(angle=rotation_to_angles(rotation), translation=translation, shape=shape, rotation=rotation)


def _iris_offsets(shape: np.ndarray) -> np.ndarray:
  offsets = []
  for iris, c0, c1 in GAZE_EYES:
    mid = (shape[..., c0, :2] + shape[..., c1, :2]) / 2
    width = np.linalg.norm(shape[..., c1, :] - shape[..., c0, :], axis=-1, keepdims=True)
    offsets.append((shape[..., iris, :2] - mid) / width)
  a, b = offsets
  return np.concatenate([(a + b) / 2, (a - b) / 2], axis=-1)


def gaze(shape: np.ndarray) -> np.ndarray:
  """Canonical-frame landmarks (..., 478, 3) -> (..., 4) gaze; 0 for the canonical face's straight-ahead irises."""
  rest = _iris_offsets(np.asarray(canonical_face_mesh()[0], np.float64))  # symmetric: mirror-even, like zero
  return _iris_offsets(np.asarray(shape, np.float64)) - rest


def project_expression(shapes: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
  """Shapes (T, N, 3) or flattened (T, 3N) -> whitened coefficients (T, K): the least-squares fit of
  mean (3N,) + basis (3N, K) @ beta."""
  x = np.asarray(shapes, np.float64).reshape(len(shapes), -1) - mean
  return x @ basis / np.maximum((basis**2).sum(0), 1e-30)


def assemble(angle, translation, expression, gaze_values) -> np.ndarray:
  """Per-frame groups -> (T, 261) float32 rows: zero identity/texture, DEFAULT_GAMMA, expression zero-padded to 64."""
  t = len(angle)
  out = np.zeros((t, COEFFICIENT_WIDTHS[1]), np.float32)
  a, _ = COEFFICIENT_SLICES["expression"]
  out[:, a : a + expression.shape[1]] = expression
  for name, value in (("angle", angle), ("translation", translation), ("gaze", gaze_values)):
    a, b = COEFFICIENT_SLICES[name]
    out[:, a:b] = value
  a, b = COEFFICIENT_SLICES["gamma"]
  out[:, a:b] = DEFAULT_GAMMA
  return out


def motion_coefficients(landmarks: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
  """Landmarks (T, 478, 3) in 224-px crop pixels, no gaps -> (T, 261) rows with the expression in the PCA basis
  mean (3 * 478,) + basis (3 * 478, K): pose fit, projection, gaze, assembled."""
  fit = fit_pose(landmarks)
  beta = project_expression(fit["shape"], mean, basis)
  return assemble(fit["angle"], fit["translation"], beta, gaze(fit["shape"]))


def fill_gaps(landmarks: np.ndarray, found: np.ndarray, max_gap: int) -> np.ndarray | None:
  """Missing frames linearly interpolated from their neighbours (edges: the nearest); None if a gap is too long."""
  if not found.any():
    return None
  missing = np.concatenate([[0], (~found).astype(np.int8), [0]])
  starts, ends = np.nonzero(np.diff(missing) == 1)[0], np.nonzero(np.diff(missing) == -1)[0]
  if len(starts) and (ends - starts).max() > max_gap:
    return None
  if found.all():
    return landmarks
  t, have = np.arange(len(found)), np.nonzero(found)[0]
  flat = landmarks.reshape(len(found), -1)
  filled = np.stack([np.interp(t, have, flat[have, j]) for j in range(flat.shape[1])], axis=1)
  return filled.reshape(landmarks.shape).astype(np.float32)
