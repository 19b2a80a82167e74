"""The videos of a prepared dataset (`mimajax prepare` shards), for evaluation: an index first, frames on demand.

A prepared video is stored as records of up to 64 consecutive frames; the index maps each video to its records (in
frame order) without decoding a frame, so a VoxCeleb1-sized test set (about 4,900 videos) indexes in seconds and a
pair decodes only the frames it uses. Frames come back as the dataset stores them: square face crops, uint8.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data_pipeline import loader, records


@dataclasses.dataclass(frozen=True)
class Video:
  """One prepared video: its id ("<speaker>/<video>/<clip>"), identity, frame count and where its records are."""

  video_id: str
  identity: str
  num_frames: int
  records: tuple[int, ...]  # indices into the dataset's records, in frame order


class Dataset:
  """A prepared folder's videos by id, and their frames and coefficient rows by frame number (0-based, per video)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"--data {self.path} does not exist (a `mimajax prepare` output folder)")
    paths, _ = loader.find_shards(self.path)
    import grain

    self._source = grain.sources.ArrayRecordDataSource(paths)
    by_video: dict[str, list[tuple[int, int, str, int]]] = {}
    for i in range(len(self._source)):
      rec = records.decode_record(self._source[i], copy_frames=False)
      first = int(rec.frame_indices[0]) if rec.num_frames else 0
      by_video.setdefault(rec.video_id, []).append((first, i, rec.speaker, rec.num_frames))
    self.videos: dict[str, Video] = {}
    for vid, parts in sorted(by_video.items()):
      parts.sort()
      self.videos[vid] = Video(vid, parts[0][2], sum(p[3] for p in parts), tuple(p[1] for p in parts))
    if not self.videos:
      raise ValueError(f"--data {self.path} holds no records")
    manifest = self.path / "manifest.json"
    self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
    self._cache: dict[int, records.Record] = {}

  def identities(self) -> list[str]:
    return sorted({v.identity for v in self.videos.values()})

  def _record(self, i: int) -> records.Record:
    if i not in self._cache:
      if len(self._cache) > 64:  # a handful of videos' records at a time: pairs read one or two videos each
        self._cache.clear()
      self._cache[i] = records.decode_record(self._source[i])
    return self._cache[i]

  def read(self, video_id: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (count, H, W, 3) uint8 and coefficient rows (count, C) of frames start .. start + count - 1."""
    video = self.videos[video_id]
    if start < 0 or count < 1 or start + count > video.num_frames:
      raise ValueError(f"{video_id}: frames {start}..{start + count - 1} are outside its {video.num_frames} frames")
    frames, rows, offset = [], [], 0
    for i in video.records:
      rec = self._record(i)
      lo, hi = max(start - offset, 0), min(start + count - offset, rec.num_frames)
      for j in range(lo, hi):
        frames.append(records.decode_frame(rec.frames[j]))
        rows.append(rec.coefficients[j])
      offset += rec.num_frames
      if offset >= start + count:
        break
    return np.stack(frames), np.stack(rows).astype(np.float32)

  def face_model_path(self) -> Path | None:
    """The dataset's landmark 3DMM (its expression basis; motion extraction wrote it), when it has one."""
    name = self.manifest.get("face_model")
    return self.path / name if name and (self.path / name).is_file() else None
