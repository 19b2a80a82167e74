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

import math
from typing import Iterable

import numpy as np

from mimajax.faces import blazeface
from mimajax.faces.tflite_models import (  # noqa: F401 (re-exported: the landmarker's public names before the split)
  INSTALL_COMMAND,
  MODELS,
  LandmarkerUnavailable,
  Roi,
  _TFLiteModel,
  check_available,
  crop,
  model_path,
  roi_from_points,
  to_image,
)

PRESENCE_THRESHOLD = 0.5  # FaceMesh's min_tracking_confidence / face_landmark_cpu's ThresholdingCalculator
# Eye corners (image left to right) that place each iris ROI, and whether the eye is mirrored for the iris model.
EYES = ((33, 133, False), (362, 263, True))
ROLL_LANDMARKS = (33, 263)  # outer eye corners: the face ROI's rotation
IRIS_DEPTH = 0.136  # face_model_with_iris: iris centre before the eye corners' mean depth / the corners' distance


# --------------------------------------------------------------------------- the landmarker


class FaceLandmarker:
  """Face detection and 478 landmarks of one face per frame; `track` follows it through a video."""

  def __init__(self, num_threads: int = 1):
    self.detector = blazeface.BlazeFace("short", num_threads)
    self.mesh = _TFLiteModel("mesh", (468 * 3, 1), num_threads)
    self.iris = _TFLiteModel("iris", (5 * 3, 71 * 3), num_threads)

  def detect(self, image: np.ndarray):
    """FaceMesh's detection: the most confident face of the short-range BlazeFace (blazeface.Detection), or None."""
    found = self.detector.detect(image, tiles=False)
    return found[0] if found else None

  def mesh_landmarks(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """(468, 3) image-space landmarks in the ROI and the face-presence probability."""
    size = self.mesh.size
    raw, logit = self.mesh(crop(image, roi, size).astype(np.float32) / 255.0)
    presence = float(1 / (1 + np.exp(-np.clip(logit.reshape(-1)[0], -100, 100))))
    return to_image(raw.reshape(468, 3), roi, size), presence

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
      iris = to_image(iris, roi, size)
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
