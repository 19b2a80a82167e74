"""Faces through a video for the animators' drivers: one face box for the whole clip, its crops, and FaceMesh
landmarks tracked through them (the dataset's motion extraction, pass 1), with short gaps filled.

MIMAFace fits 3DMM rows to the landmarks (its `driving.py`); MMFA reads the crops and the head pose of
`motion_fit.fit_pose` (R of eq. 5). Both stream the video: memory does not grow with its pixels.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from mimajax import video_io
from mimajax.faces import detection, motion_fit


def landmarker():
  """MediaPipe's FaceMesh landmarker, or a ValueError saying what is missing."""
  from mimajax.faces import landmarks as face_landmarks

  try:
    face_landmarks.check_available()
    return face_landmarks.FaceLandmarker()
  except face_landmarks.LandmarkerUnavailable as e:
    raise ValueError(f"motion extraction from images is unavailable ({e}); pass coefficient files instead") from e


def crop_landmarks(crops: Iterable[np.ndarray], side: int, what: str, max_gap: int = 12) -> np.ndarray:
  """FaceMesh landmarks (T, 478, 3) of aligned face crops of `side` pixels, in 224-px crop pixels as the data
  pipeline caches them, short gaps filled (the dataset's motion extraction, pass 1)."""
  landmarks, found = landmarker().track(crops)
  filled = motion_fit.fill_gaps(motion_fit.to_fit_pixels(landmarks, side), found, max_gap)
  if filled is None:
    raise ValueError(
      f"MediaPipe found a face in {int(found.sum())} of {len(found)} frames of {what} (gaps over {max_gap} frames "
      "cannot be filled): the face must stay visible"
    )
  return filled


def video_crops(path, max_frames: int | None = None) -> tuple[tuple[int, int, int], Callable[[], Iterator[np.ndarray]]]:
  """(the clip's face box, a function streaming its crops at the box's own size) for a video; ValueError when
  the detector sees no face in it."""
  box = detection.video_face_box(video_io.iter_video(path, max_frames))
  if box is None:
    raise ValueError(f"no face found in the driving video {path}: the {detection.DEFAULT_DETECTOR} face detector "
                     f"saw none in every {detection.VIDEO_STEP}th frame")  # fmt: skip

  def crops():
    for frame in video_io.iter_video(path, max_frames):
      yield detection.crop_and_resize(frame, box, box[2])  # at the crop's own size, as the pipeline: no detail lost

  return box, crops
