"""The preparation job's input: VoxCeleb2-layout clips, their coefficient files, their frames as prepare decodes them.

`mimajax prepare` (prepare.py), its `--extract-motion` pass (motion_extraction.py) and the TFDS builder
(voxceleb2_mima.py) all start here, so they find the same clips and see the same frames and face box: coefficients
extracted from a clip describe exactly the frames prepare stores. Kept apart from prepare.py so that motion
extraction, which prepare runs, does not import prepare.

Input: `INPUT/<speaker>/<video>/<clip>.mp4` (VoxCeleb2: `id00012/21Uxsk56VDQ/00001.mp4`) and, per clip, a
coefficient file `<clip>.npy` or Deep3DFaceRecon `<clip>.mat`, under a coefficients folder (same relative path) or
beside the video. Frames are decoded with OpenCV, streamed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from mimajax.faces import detection

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  video_id: str  # relative path without extension: "<speaker>/<video>/<clip>"
  speaker: str
  video_path: str
  coefficient_path: str | None  # None: none found (prepare skips the clip as missing_coefficients)


def discover_videos(
  input_dir: str | os.PathLike, coefficients_dir: str | os.PathLike | None = None
) -> list[VideoEntry]:
  """Every `<speaker>/<video>/<clip>.<ext>` under input_dir, sorted by video_id."""
  root = Path(input_dir)
  if not root.is_dir():
    raise ValueError(f"--input {root} is not a folder; expected <speaker>/<video>/<clip>.mp4 inside it")
  entries = []
  for path in sorted(root.glob("*/*/*")):
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
      continue
    rel = path.relative_to(root).with_suffix("")
    video_id = rel.as_posix()
    candidates = [Path(coefficients_dir) / rel] if coefficients_dir else []
    candidates.append(path.with_suffix(""))
    coeff = next((str(c) + ext for c in candidates for ext in (".npy", ".mat") if Path(str(c) + ext).exists()), None)
    entries.append(VideoEntry(video_id, rel.parts[0], str(path), coeff))
  return entries


def read_frames(path: str, step: int = 1) -> Iterator[tuple[int, np.ndarray]]:
  """(index, (H, W, 3) uint8 RGB) of every step-th frame, streamed (long videos never sit in memory)."""
  import cv2

  cap = cv2.VideoCapture(path)
  try:
    if not cap.isOpened():
      return
    index = 0
    while True:
      if index % step:
        if not cap.grab():
          return
      else:
        ok, bgr = cap.read()
        if not ok or bgr is None:
          return
        yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
      index += 1
  finally:
    cap.release()


def frame_counts(path: str) -> tuple[int, int | None]:
  """(frames that decode, frames the container declares or None if it declares none) of the video at `path`; the
  two differ for a truncated or corrupt file. Decodes without converting (cheap next to `read_frames`)."""
  import cv2

  cap = cv2.VideoCapture(path)
  try:
    if not cap.isOpened():
      return 0, None
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    decoded = 0
    while cap.grab():
      decoded += 1
    return decoded, (declared if declared > 0 else None)
  finally:
    cap.release()


def read_video(path: str) -> np.ndarray:
  """All frames (N, H, W, 3) uint8 RGB, as `prepare` decodes them (for tests and small clips)."""
  frames = [f for _, f in read_frames(path)]
  return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def clip_face_box(
  path: str, margin: float = detection.FACE_MARGIN, detector: str = detection.DEFAULT_DETECTOR, face_index: int = 0
) -> tuple[int, int, int] | None:
  """The crop="detect" box (x0, y0, side) of the clip at `path`: detection.video_face_box of its frames (the frames
  between the searched ones are only grabbed, not converted); None if no face was found."""
  frames = (rgb for _, rgb in read_frames(path, detection.VIDEO_STEP))
  return detection.frames_face_box(frames, margin, detection.MAX_DETECTIONS, detector, face_index)
