"""Face detection and the square face crop: one implementation for the dataset and for inference.

`mimajax prepare --crop detect` stores, `mimajax extract-motion` fits its landmarks in, and `mimajax animate` crops
its source portrait and its driving video to the same kind of box, so the model sees at inference the framing it
was trained on. Hence one detector, one box rule and one crop, here:

  largest_face      the largest face OpenCV's frontal Haar cascade finds in an RGB image (the speaker)
  frames_face_box   one square box for a set of frames: the median of their faces (up to max_detections), its side
                    FACE_MARGIN times the face's; a fixed crop, so the face does not jitter between frames
  image_face_box    the box of one image (a source portrait)
  video_face_box    the box of a whole video given frame by frame: its every VIDEO_STEP-th frame is searched
  crop_and_resize   the box (or the centre square) cut out, edge-padded where it leaves the frame, resized

Boxes are (x0, y0, side) in pixels of the image; None where no face was found.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable

import numpy as np

FACE_MARGIN = 1.8  # crop side / detected face side (prepare's default face_margin, and animate's)
VIDEO_STEP = 5  # a video's faces are looked for in every VIDEO_STEP-th frame
MAX_DETECTIONS = 16  # faces a video's box is the median of

_CASCADE = None


def largest_face(rgb: np.ndarray) -> tuple[float, float, float] | None:
  """(centre x, centre y, side) of the largest Haar face in an RGB image (the speaker); None if there is none."""
  import cv2

  global _CASCADE
  if _CASCADE is None:
    _CASCADE = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
  gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
  side = max(16, min(gray.shape) // 8)
  faces = _CASCADE.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
  if not len(faces):
    return None
  x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
  return x + w / 2, y + h / 2, max(w, h)


def frames_face_box(
  frames: Iterable[np.ndarray], margin: float = FACE_MARGIN, max_detections: int = MAX_DETECTIONS
) -> tuple[int, int, int] | None:
  """One square crop (x0, y0, side) for all `frames`: the median of their Haar face boxes, enlarged by margin.

  Frames are searched in order until max_detections faces are found; None if none has a face.
  """
  boxes = []
  for rgb in frames:
    face = largest_face(rgb)
    if face is not None:
      boxes.append(face)
      if len(boxes) >= max_detections:
        break
  if not boxes:
    return None
  cx, cy, s = np.median(np.asarray(boxes), axis=0)  # a fixed crop: no jitter between frames
  side = int(round(s * margin))
  return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def image_face_box(image: np.ndarray, margin: float = FACE_MARGIN) -> tuple[int, int, int] | None:
  """Square crop (x0, y0, side) around the largest Haar face of one image, enlarged by margin; None if none."""
  return frames_face_box([image], margin)


def video_face_box(
  frames: Iterable[np.ndarray],
  margin: float = FACE_MARGIN,
  step: int = VIDEO_STEP,
  max_detections: int = MAX_DETECTIONS,
) -> tuple[int, int, int] | None:
  """One crop for a whole video, given as all its frames in order: `frames_face_box` of every step-th frame.

  A decoder that can skip frames cheaply may instead hand `frames_face_box` every step-th frame itself (prepare's
  `clip_files.clip_face_box`); the box is the same.
  """
  return frames_face_box(itertools.islice(frames, 0, None, step), margin, max_detections)


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
