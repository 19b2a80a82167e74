"""MediaPipe's .tflite models in the mediapipe wheel, run with LiteRT, and the square regions they are fed.

mediapipe 0.10.21 is the last wheel that bundles its models, but its Python graph API does not run with the protobuf
that tensorflow 2.21 needs (FieldDescriptor.label is gone in protobuf 7), so the models are run directly with LiteRT
(`ai-edge-litert`; tensorflow's deprecated `tf.lite.Interpreter` as a fallback). Used by the face detectors
(blazeface.py) and the landmarker (landmarks.py).

Coordinates: continuous pixels of the given image (x right, y down, pixel centres at +0.5).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np

INSTALL_COMMAND = "pip install --no-deps mediapipe==0.10.21 && pip install ai-edge-litert"
MODELS = {
  "detector": "face_detection/face_detection_short_range.tflite",
  "full_detector": "face_detection/face_detection_full_range_sparse.tflite",  # blazeface.py (detection.py's)
  "mesh": "face_landmark/face_landmark.tflite",
  "iris": "iris_landmark/iris_landmark.tflite",
}


class LandmarkerUnavailable(RuntimeError):
  """MediaPipe's models or a TFLite runtime are not installed."""


def model_path(name: str) -> Path:
  """Path of a bundled mediapipe model (located without importing mediapipe, whose import needs protobuf < 5)."""
  spec = importlib.util.find_spec("mediapipe")
  if spec is None or not spec.submodule_search_locations:
    raise LandmarkerUnavailable(f"face detection and landmarks need mediapipe 0.10.21's models: {INSTALL_COMMAND}")
  path = Path(spec.submodule_search_locations[0], "modules", MODELS[name])
  if not path.exists():
    raise LandmarkerUnavailable(
      f"{path} is missing: this mediapipe wheel has no bundled models (newer ones download them); {INSTALL_COMMAND}"
    )
  return path


def _interpreter_class():
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    try:
      from tensorflow.lite.python.interpreter import Interpreter  # deprecated, still in tensorflow 2.21
    except ImportError:
      raise LandmarkerUnavailable(f"face detection and landmarks need a TFLite runtime: {INSTALL_COMMAND}") from None
  return Interpreter


def check_available() -> None:
  """Raises LandmarkerUnavailable (naming the install command) unless the models and a TFLite runtime are there."""
  for name in MODELS:
    model_path(name)
  _interpreter_class()


class _TFLiteModel:
  """One .tflite model: (1, S, S, 3) float32 -> its outputs (batch axis dropped) in the order of `output_sizes`."""

  def __init__(self, name: str, output_sizes: tuple[int, ...], num_threads: int):
    self.interpreter = _interpreter_class()(model_path=str(model_path(name)), num_threads=num_threads)
    self.interpreter.allocate_tensors()
    (inp,) = self.interpreter.get_input_details()
    self.size = int(inp["shape"][1])
    self._input = inp["index"]
    by_size = {int(np.prod(d["shape"])): d["index"] for d in self.interpreter.get_output_details()}
    self._outputs = [by_size[n] for n in output_sizes]

  def __call__(self, x: np.ndarray) -> list[np.ndarray]:
    self.interpreter.set_tensor(self._input, np.ascontiguousarray(x[None], np.float32))
    self.interpreter.invoke()
    return [self.interpreter.get_tensor(i)[0] for i in self._outputs]


# --------------------------------------------------------------------------- regions of interest


@dataclasses.dataclass(frozen=True)
class Roi:
  """A square region: centre (cx, cy) and side in pixels; angle (radians) turns its x axis from the image's."""

  cx: float
  cy: float
  size: float
  angle: float = 0.0

  def to_image(self, out_size: int) -> np.ndarray:
    """(2, 3) affine: continuous coordinates in the out_size crop -> continuous image coordinates."""
    c, s = math.cos(self.angle), math.sin(self.angle)
    a = self.size / out_size * np.array([[c, -s], [s, c]])
    b = np.array([self.cx, self.cy]) - a @ np.array([out_size / 2, out_size / 2])
    return np.concatenate([a, b[:, None]], axis=1)


def roi_from_points(points: np.ndarray, start: int, end: int, scale: float) -> Roi:
  """MediaPipe's DetectionsToRects + RectTransformation(square_long): the points' box, turned by start->end."""
  lo, hi = points[:, :2].min(0), points[:, :2].max(0)
  dx, dy = points[end, :2] - points[start, :2]
  return Roi(*((lo + hi) / 2), scale * float((hi - lo).max()), math.atan2(dy, dx))


def crop(image: np.ndarray, roi: Roi, out_size: int, zero_border: bool = False) -> np.ndarray:
  """The ROI resampled to out_size x out_size (bilinear), edge-replicated (or zero) outside the image."""
  import cv2

  m = roi.to_image(out_size)
  m[:, 2] = m[:, :2] @ np.array([0.5, 0.5]) + m[:, 2] - 0.5  # continuous -> pixel-index coordinates
  border = cv2.BORDER_CONSTANT if zero_border else cv2.BORDER_REPLICATE
  return cv2.warpAffine(image, m, (out_size, out_size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=border, borderValue=0)  # fmt: skip


def to_image(points: np.ndarray, roi: Roi, out_size: int) -> np.ndarray:
  """(K, 2 | 3) crop coordinates -> image coordinates; z scaled like x."""
  m = roi.to_image(out_size)
  out = np.array(points, np.float64, copy=True)
  out[:, :2] = points[:, :2] @ m[:, :2].T + m[:, 2]
  if out.shape[1] > 2:
    out[:, 2] *= roi.size / out_size
  return out
