"""MediaPipe face detection + FaceMesh 478 landmarks (with irises), run from the .tflite models in the mediapipe wheel.

The motion fit (motion_fit.py: the dataset's motion extraction, issue 4 item 2, and animate's video drivers) needs
FaceMesh's landmarks. mediapipe 0.10.21 is the last wheel that bundles its models, but its Python graph API does not
run with the protobuf that tensorflow 2.21 needs (FieldDescriptor.label is gone in protobuf 7), so its models are run
directly with LiteRT (`ai-edge-litert`; tensorflow's deprecated `tf.lite.Interpreter` as a fallback), with the
pre/post-processing of MediaPipe's graphs (modules/face_detection, face_landmark, iris_landmark) written out here:

  face_detection_short_range.tflite  BlazeFace: the frame letterboxed to 128 px, values in [-1, 1] -> boxes and six
                                     keypoints per anchor; the best face after weighted non-maximum suppression
  face_landmark.tflite               a square ROI 1.5x the face, rotated so the eyes are level, 192 px in [0, 1]
                                     -> 468 points (x, y, z) and a face-presence logit
  iris_landmark.tflite               a square ROI 2.3x each eye's corners, 64 px in [0, 1], the eye at image right
                                     mirrored (the model knows one eye) -> iris centre + 4 contour points

Together: 478 points in FaceMesh's `refine_landmarks=True` order (468-472 the iris at image left, 473-477 the other;
centre, then +x, up, -x, down as in MediaPipe's face_model_with_iris). FaceMesh's own 478-point model
(face_landmark_with_attention.tflite) needs MediaPipe's custom op Landmarks2TransformMatrix, which LiteRT lacks.
Video runs like FaceMesh's tracking mode: each frame's ROI comes from the previous frame's landmarks, and the
detector runs only when the face was lost (presence < 0.5). Deterministic.

Coordinates: continuous pixels of the given image (x right, y down, pixel centres at +0.5); z in the same pixel
scale, relative depth, larger is farther from the camera (MediaPipe's sign).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Iterable

import numpy as np

INSTALL_COMMAND = "pip install --no-deps mediapipe==0.10.21 && pip install ai-edge-litert"
MODELS = {
  "detector": "face_detection/face_detection_short_range.tflite",
  "mesh": "face_landmark/face_landmark.tflite",
  "iris": "iris_landmark/iris_landmark.tflite",
}
PRESENCE_THRESHOLD = 0.5  # FaceMesh's min_tracking_confidence / face_landmark_cpu's ThresholdingCalculator
DETECTION_THRESHOLD = 0.5
# Eye corners (image left to right) that place each iris ROI, and whether the eye is mirrored for the iris model.
EYES = ((33, 133, False), (362, 263, True))
ROLL_LANDMARKS = (33, 263)  # outer eye corners: the face ROI's rotation
IRIS_DEPTH = 0.136  # face_model_with_iris: iris centre before the eye corners' mean depth / the corners' distance


class LandmarkerUnavailable(RuntimeError):
  """MediaPipe's models or a TFLite runtime are not installed."""


def model_path(name: str) -> Path:
  """Path of a bundled mediapipe model (located without importing mediapipe, whose import needs protobuf < 5)."""
  spec = importlib.util.find_spec("mediapipe")
  if spec is None or not spec.submodule_search_locations:
    raise LandmarkerUnavailable(f"motion extraction needs mediapipe 0.10.21's bundled models: {INSTALL_COMMAND}")
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
      raise LandmarkerUnavailable(f"motion extraction needs a TFLite runtime: {INSTALL_COMMAND}") from None
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


def _to_image(points: np.ndarray, roi: Roi, out_size: int) -> np.ndarray:
  """(K, 2 | 3) crop coordinates -> image coordinates; z scaled like x."""
  m = roi.to_image(out_size)
  out = np.array(points, np.float64, copy=True)
  out[:, :2] = points[:, :2] @ m[:, :2].T + m[:, 2]
  if out.shape[1] > 2:
    out[:, 2] *= roi.size / out_size
  return out


def _ssd_anchors(size: int = 128) -> np.ndarray:
  """Anchor centres (896, 2) in [0, 1] of the short-range BlazeFace: strides 8 (2 anchors) and 16 (6 anchors)."""
  anchors = []
  for stride, count in ((8, 2), (16, 6)):
    g = size // stride
    y, x = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    centres = np.stack([(x + 0.5) / g, (y + 0.5) / g], -1).reshape(-1, 1, 2)
    anchors.append(np.repeat(centres, count, axis=1).reshape(-1, 2))
  return np.concatenate(anchors)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
  return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


# --------------------------------------------------------------------------- the landmarker


@dataclasses.dataclass(frozen=True)
class Detection:
  box: np.ndarray  # (4,) x0, y0, x1, y1 in image pixels
  keypoints: np.ndarray  # (6, 2): eye at image left, other eye, nose tip, mouth, ear at image left, other ear
  score: float


class FaceLandmarker:
  """Face detection and 478 landmarks of one face per frame; `track` follows it through a video."""

  def __init__(self, num_threads: int = 1):
    self.detector = _TFLiteModel("detector", (896 * 16, 896), num_threads)
    self.mesh = _TFLiteModel("mesh", (468 * 3, 1), num_threads)
    self.iris = _TFLiteModel("iris", (5 * 3, 71 * 3), num_threads)
    self._anchors = _ssd_anchors(self.detector.size)

  def detect(self, image: np.ndarray) -> Detection | None:
    """The most confident face (weighted NMS at IoU 0.3, as MediaPipe), or None below the score threshold."""
    h, w = image.shape[:2]
    size = self.detector.size
    roi = Roi(w / 2, h / 2, max(h, w))  # letterbox: the whole frame, centred, zero padded
    raw, logits = self.detector(crop(image, roi, size, zero_border=True).astype(np.float32) / 127.5 - 1.0)
    scores = 1 / (1 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    keep = scores >= DETECTION_THRESHOLD
    if not keep.any():
      return None
    raw, scores, anchors = raw[keep] / size, scores[keep], self._anchors[keep]
    centre, half = raw[:, :2] + anchors, raw[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None]
    best = int(np.argmax(scores))
    group = _iou(boxes[best], boxes) > 0.3
    weights = scores[group] / scores[group].sum()
    box = (weights[:, None] * boxes[group]).sum(0).reshape(2, 2) * size
    kps = (weights[:, None, None] * keypoints[group]).sum(0) * size
    box, kps = _to_image(box, roi, size), _to_image(kps, roi, size)
    return Detection(box.reshape(4), kps, float(scores[best]))

  def mesh_landmarks(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """(468, 3) image-space landmarks in the ROI and the face-presence probability."""
    size = self.mesh.size
    raw, logit = self.mesh(crop(image, roi, size).astype(np.float32) / 255.0)
    presence = float(1 / (1 + np.exp(-np.clip(logit.reshape(-1)[0], -100, 100))))
    return _to_image(raw.reshape(468, 3), roi, size), presence

  def iris_landmarks(self, image: np.ndarray, mesh: np.ndarray) -> np.ndarray:
    """(10, 3): each eye's iris centre and contour (+x, up, -x, down), z placed at the eye corners' depth."""
    size, out = self.iris.size, []
    for start, end, mirrored in EYES:
      roi = roi_from_points(mesh[[start, end]], 0, 1, 2.3)  # the box of the two corners only
      patch = crop(image, roi, size).astype(np.float32) / 255.0
      (raw, _) = self.iris(patch[:, ::-1] if mirrored else patch)
      iris = raw.reshape(5, 3).astype(np.float64)  # centre, then the crop's +x, up, -x, down
      if mirrored:
        iris[:, 0] = size - iris[:, 0]
        iris = iris[[0, 3, 2, 1, 4]]  # un-mirrored, the crop's +x and -x points trade places
      iris = _to_image(iris, roi, size)
      # The iris model's z is relative to its own crop: anchor the centre in front of the eye corners' mean depth
      # by IRIS_DEPTH * the corners' distance, as in the canonical mesh.
      corners = mesh[[start, end]]
      iris[:, 2] += corners[:, 2].mean() - IRIS_DEPTH * np.linalg.norm(corners[0] - corners[1]) - iris[0, 2]
      out.append(iris)
    return np.concatenate(out)

  def landmarks(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray | None, Roi | None]:
    """(478, 3) landmarks in the ROI and the next frame's ROI, or (None, None) when no face is present."""
    mesh, presence = self.mesh_landmarks(image, roi)
    if presence < PRESENCE_THRESHOLD:
      return None, None
    points = np.concatenate([mesh, self.iris_landmarks(image, mesh)])
    return points.astype(np.float32), roi_from_points(mesh, *ROLL_LANDMARKS, 1.5)

  def track(self, frames: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Frames (H, W, 3) uint8 RGB -> landmarks (T, 478, 3) float32 (NaN where no face) and found (T,) bool."""
    out, roi = [], None
    for image in frames:
      points = None
      if roi is not None:
        points, roi = self.landmarks(image, roi)
      if points is None:
        det = self.detect(image)
        if det is not None:
          # A detection's ROI is coarse: one pass places the landmark ROI, a second reads the landmarks from it.
          start_roi = Roi(*((det.box[:2] + det.box[2:]) / 2), 1.5 * float((det.box[2:] - det.box[:2]).max()),
                          math.atan2(*(det.keypoints[1] - det.keypoints[0])[::-1]))  # fmt: skip
          points, roi = self.landmarks(image, start_roi)
          if points is not None:
            points, roi = self.landmarks(image, roi)
      out.append(points if points is not None else np.full((478, 3), np.nan, np.float32))
    landmarks = np.stack(out) if out else np.zeros((0, 478, 3), np.float32)
    return landmarks, ~np.isnan(landmarks[:, 0, 0])
