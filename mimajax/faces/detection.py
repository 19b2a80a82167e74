"""Face detection and the square face crop: one implementation for the dataset and for inference.

`mimajax prepare --crop detect` stores, `mimajax extract-motion` fits its landmarks in, and `mimajax animate` crops
its source portrait and its driving video to the same kind of box, so the model sees at inference the framing it
was trained on. Hence one detector, one box rule and one crop, here:

  faces             every face in an RGB image as (centre x, centre y, side), largest first, by one of DETECTORS:
                    "blazeface"  MediaPipe's full-range BlazeFace (blazeface.py): whole heads down to 1/20 of the
                                 shorter side, tilted and turned ones
                    "haar"       OpenCV's frontal Haar cascade, the project's first detector: upright faces over
                                 1/8 of the shorter side, and tight face crops, which BlazeFace misses
                    "auto"       (default) BlazeFace, and Haar on an image where BlazeFace finds none
                    (`python -m mimajax.faces.detection_eval` measures each; without mediapipe's models "auto"
                    is Haar alone, with a warning)
  largest_face      the face a crop is built around: the largest, or the face_index-th largest (several faces)
  frames_face_box   one square box for a set of frames: the median of their faces (up to max_detections), its side
                    FACE_MARGIN times the face's; a fixed crop, so the face does not jitter between frames
  image_face_box    the box of one image (a source portrait)
  video_face_box    the box of a whole video given frame by frame: its every VIDEO_STEP-th frame is searched
  crop_and_resize   the box (or the centre square) cut out, edge-padded where it leaves the frame, resized

Boxes are (x0, y0, side) in pixels of the image; None where no face was found.

BlazeFace's box is a tight square from the brows to the chin; the Haar cascade's, which the project's data and
checkpoints were framed by, sits higher (it takes in the forehead). A BlazeFace face is reported in the Haar frame:
its centre moved up by BLAZEFACE_SHIFT_Y of its side, its side unchanged (measured on astronaut and the four
face_recognition test portraits: Haar centre above BlazeFace's by 0.05-0.14 sides, median 0.087; side ratio
0.91-1.07, median 1.006), so `--crop detect` frames a face as before whichever detector found it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Iterable

import numpy as np

FACE_MARGIN = 1.8  # crop side / detected face side (prepare's default face_margin, and animate's)
VIDEO_STEP = 5  # a video's faces are looked for in every VIDEO_STEP-th frame
MAX_DETECTIONS = 16  # faces a video's box is the median of

DETECTORS = ("auto", "blazeface", "haar")
DEFAULT_DETECTOR = "auto"
BLAZEFACE_SHIFT_Y = -0.087  # x side: BlazeFace's box centre -> the Haar box's (the module docstring)

log = logging.getLogger(__name__)
_local = threading.local()  # one detector per thread: a TFLite interpreter is not thread-safe


def check_detector(detector: str) -> str:
  if detector not in DETECTORS:
    raise ValueError(f"unknown face detector {detector!r}; expected one of {', '.join(DETECTORS)}")
  return detector


def _haar_faces(rgb: np.ndarray) -> list[tuple[float, float, float]]:
  import cv2

  if getattr(_local, "cascade", None) is None:
    _local.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
  gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
  side = max(16, min(gray.shape) // 8)  # the cascade's false positives grow fast below an eighth of the frame
  found = _local.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
  return [(x + w / 2, y + h / 2, float(max(w, h))) for x, y, w, h in found]


def _blazeface_faces(rgb: np.ndarray) -> list[tuple[float, float, float]]:
  from mimajax.faces import blazeface

  if getattr(_local, "blazeface", None) is None:
    _local.blazeface = blazeface.BlazeFace("full")
  out = []
  for d in _local.blazeface.detect(np.ascontiguousarray(rgb[..., :3])):
    (cx, cy), side = (d.box[:2] + d.box[2:]) / 2, d.side
    out.append((float(cx), float(cy + BLAZEFACE_SHIFT_Y * side), side))
  return out


def faces(rgb: np.ndarray, detector: str = DEFAULT_DETECTOR) -> list[tuple[float, float, float]]:
  """Every face in an RGB image as (centre x, centre y, side) in pixels, largest first (ties: left first)."""
  check_detector(detector)
  found = []
  if detector != "haar":
    from mimajax.faces.tflite_models import LandmarkerUnavailable

    try:
      found = _blazeface_faces(rgb)
    except LandmarkerUnavailable as e:
      if detector == "blazeface":
        raise
      if not getattr(_local, "warned", False):  # auto without mediapipe's models: Haar alone, said once
        log.warning("face detection: %s; using the Haar cascade alone", e)
        _local.warned = True
  if detector == "haar" or (detector == "auto" and not found):
    found = _haar_faces(rgb)
  return sorted(found, key=lambda f: (-f[2], f[0]))


def largest_face(rgb: np.ndarray, detector: str = DEFAULT_DETECTOR, face_index: int = 0):
  """(centre x, centre y, side) of the face_index-th largest face (0: the largest, the speaker); None if the image
  has fewer faces."""
  if face_index < 0:
    raise ValueError(f"face_index={face_index}; expected >= 0 (0: the largest face)")
  found = faces(rgb, detector)
  return found[face_index] if face_index < len(found) else None


def frames_face_box(
  frames: Iterable[np.ndarray],
  margin: float = FACE_MARGIN,
  max_detections: int = MAX_DETECTIONS,
  detector: str = DEFAULT_DETECTOR,
  face_index: int = 0,
) -> tuple[int, int, int] | None:
  """One square crop (x0, y0, side) for all `frames`: the median of their faces' boxes (`largest_face` of each),
  enlarged by margin.

  Frames are searched in order until max_detections faces are found; None if none has a face.
  """
  check_detector(detector)
  boxes = []
  for rgb in frames:
    face = largest_face(rgb, detector, face_index)
    if face is not None:
      boxes.append(face)
      if len(boxes) >= max_detections:
        break
  if not boxes:
    return None
  cx, cy, s = np.median(np.asarray(boxes), axis=0)  # a fixed crop: no jitter between frames
  side = int(round(s * margin))
  return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def image_face_box(
  image: np.ndarray, margin: float = FACE_MARGIN, detector: str = DEFAULT_DETECTOR, face_index: int = 0
) -> tuple[int, int, int] | None:
  """Square crop (x0, y0, side) around the (face_index-th) largest face of one image, enlarged by margin; None if
  none."""
  return frames_face_box([image], margin, 1, detector, face_index)


def require_image_face_box(
  image: np.ndarray,
  what: str,
  margin: float = FACE_MARGIN,
  detector: str = DEFAULT_DETECTOR,
  face_index: int = 0,
) -> tuple[int, int, int]:
  """`image_face_box`, or ValueError naming the image and what the detector needs (a bad portrait)."""
  box = image_face_box(image, margin, detector, face_index)
  if box is None:
    which = "a face" if face_index == 0 else f"face {face_index} (faces are ranked largest first, from 0)"
    raise ValueError(
      f"no face found in {what} ({image.shape[1]}x{image.shape[0]}): looked for {which} with the {detector} "
      "detector, which needs a visible face of at least 1/20 of the image's shorter side (1/8 for haar)"
    )
  return box


def video_face_box(
  frames: Iterable[np.ndarray],
  margin: float = FACE_MARGIN,
  step: int = VIDEO_STEP,
  max_detections: int = MAX_DETECTIONS,
  detector: str = DEFAULT_DETECTOR,
  face_index: int = 0,
) -> tuple[int, int, int] | None:
  """One crop for a whole video, given as all its frames in order: `frames_face_box` of every step-th frame.

  A decoder that can skip frames cheaply may instead hand `frames_face_box` every step-th frame itself (prepare's
  `clip_files.clip_face_box`); the box is the same.
  """
  return frames_face_box(itertools.islice(frames, 0, None, step), margin, max_detections, detector, face_index)


def crop_and_resize(rgb: np.ndarray, box: tuple[int, int, int] | None, resolution: int) -> np.ndarray:
  """Square crop (box, or the centre square), edge-padded where it leaves the frame, resized to resolution."""
  import cv2

  h, w = rgb.shape[:2]
  if box is None:
    s = min(h, w)
    box = ((w - s) // 2, (h - s) // 2, s)
  x0, y0, s = box
  pad = max(0, -x0, -y0, x0 + s - w, y0 + s - h)
  if pad:
    rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = x0 + pad, y0 + pad
  crop = rgb[y0 : y0 + s, x0 : x0 + s]
  if s != resolution:
    crop = cv2.resize(
      crop, (resolution, resolution), interpolation=cv2.INTER_AREA if s > resolution else cv2.INTER_CUBIC
    )
  return np.ascontiguousarray(crop)
