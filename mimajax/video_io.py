"""Video and image files for `mimajax animate`: streamed reading, atomic H.264 mp4 writing, the side-by-side view.

Reading goes through `imageio.v3.imiter` (its ffmpeg plugin; never `imageio.get_reader` on mp4, whose length is
infinite, see OFFLINE_ASSETS.md), one frame at a time, so long drivers need not fit in memory. Writing uses
imageio-ffmpeg's bundled ffmpeg with libx264 and yuv420p, which needs even frame sides: odd sides are padded by
repeating the last row / column. `Mp4Writer` takes frames batch by batch under a temporary name in the destination
folder; the file appears under its name only when complete (`commit`), and a failure removes it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")
DEFAULT_FPS = 25.0


def is_video(path: str | os.PathLike) -> bool:
  return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _unreadable(path, e: Exception) -> ValueError:
  first = (str(e).strip().splitlines() or [""])[0]
  return ValueError(f"video {path} is unreadable ({type(e).__name__}: {first}); expected a video ffmpeg decodes")


def video_fps(path: str | os.PathLike) -> float:
  """Frame rate from the container (DEFAULT_FPS when it names none); ValueError if the file is no video."""
  import imageio.v3 as iio

  path = Path(path)
  if not path.is_file():
    raise ValueError(f"video {path} does not exist")
  try:
    fps = float(iio.immeta(path).get("fps") or DEFAULT_FPS)
  except Exception as e:  # noqa: BLE001  (every decoder error means the same to the user: unreadable)
    raise _unreadable(path, e) from e
  return fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS


def iter_video(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
  """(H, W, 3) uint8 RGB frames, decoded one at a time; ValueError if the file cannot be read or has no frame."""
  import imageio.v3 as iio

  video_fps(path)  # a missing or foreign file fails here, with its name
  count = 0
  try:
    for frame in iio.imiter(path):
      if max_frames is not None and count >= max_frames:
        break
      frame = np.asarray(frame)
      count += 1
      yield np.repeat(frame[..., None], 3, axis=-1) if frame.ndim == 2 else frame[..., :3]
  except Exception as e:  # noqa: BLE001
    raise _unreadable(path, e) from e
  if not count:
    raise ValueError(f"video {path} has no decodable frames")


def read_video(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
  """(all frames (T, H, W, 3) uint8 RGB, fps): for short videos; long ones are better streamed (`iter_video`)."""
  return np.stack(list(iter_video(path, max_frames))), video_fps(path)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An image file (the source portrait) -> (H, W, 3) uint8 RGB; ValueError if it is missing or unreadable."""
  import imageio.v3 as iio

  path = Path(path)
  if not path.is_file():
    raise ValueError(f"source image {path} does not exist")
  try:
    image = np.asarray(iio.imread(path))
  except Exception as e:  # noqa: BLE001  (any decoder error: not an image)
    raise ValueError(f"source image {path} is unreadable ({type(e).__name__}); expected a PNG or JPEG portrait") from e
  return as_rgb(image, str(path))


def as_rgb(image, what: str = "source image") -> np.ndarray:
  """(H, W), (H, W, 1 | 3 | 4) uint8 or [0, 1] float -> (H, W, 3) uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 16:
    raise ValueError(f"{what}: shape {image.shape}; expected an RGB image (H, W, 3) of at least 16 x 16 pixels")
  if image.dtype != np.uint8:
    image = to_uint8(image) if np.issubdtype(image.dtype, np.floating) else image.astype(np.uint8)
  return np.ascontiguousarray(np.broadcast_to(image[..., :3], image.shape[:2] + (3,)))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded."""
  return np.uint8(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5)


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
  """An .mp4 file name in an existing folder, or ValueError (checked before hours of sampling, not after)."""
  path = Path(path)
  if path.suffix.lower() != ".mp4":
    raise ValueError(f"{what} {path}: expected an .mp4 file name")
  if path.is_dir() or not path.parent.is_dir():
    raise ValueError(f"{what} {path}: not a file name in an existing folder")
  return path


def even_frames(frames: np.ndarray) -> np.ndarray:
  """(T, H, W, 3) -> even H and W (yuv420p subsamples chroma 2x2) by repeating the last row / column."""
  h, w = frames.shape[1:3]
  pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
  return np.pad(frames, pad, mode="edge") if h % 2 or w % 2 else frames


def _check_frames(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
    raise ValueError(f"video frames must be (T >= 1, H, W, 3); got shape {frames.shape}")
  if frames.dtype != np.uint8:
    raise ValueError(f"video frames must be uint8; got {frames.dtype} (convert [0, 1] floats with to_uint8)")
  return frames


class Mp4Writer:
  """H.264 (libx264, yuv420p) mp4 written batch by batch under a temporary name beside `path`.

  `write` batches of uint8 frames (T, H, W, 3); `close` finishes the file, `commit` renames it to `path`;
  `discard` (or leaving a `with` block by an exception) removes it. As a context manager a clean exit commits.
  """

  def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, *, quality: int = 8):
    self.path = check_output_path(path)
    if not fps > 0:
      raise ValueError(f"fps must be > 0; got {fps}")
    self.fps, self.quality, self.frames = fps, quality, 0
    self._size, self._writer = None, None  # the writer: None before the first batch and after close
    # ffmpeg picks the container from the extension; the name is new, so the file gets the usual permissions.
    self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial.mp4")

  def write(self, frames: np.ndarray) -> None:
    import imageio_ffmpeg

    frames = even_frames(_check_frames(frames))
    size = frames.shape[1:3]
    if self._size is None:
      self._size = size
      self._writer = imageio_ffmpeg.write_frames(str(self.tmp), (size[1], size[0]), fps=self.fps, codec="libx264",
                                                 quality=self.quality, macro_block_size=1, pix_fmt_out="yuv420p",
                                                 ffmpeg_log_level="error")  # fmt: skip
      self._writer.send(None)  # starts ffmpeg
    elif size != self._size or self._writer is None:
      raise ValueError(f"{self.path}: frames of {size} after frames of {self._size} (or after close)")
    for frame in frames:
      self._writer.send(np.ascontiguousarray(frame))
    self.frames += len(frames)

  def close(self) -> None:
    """Finishes the temporary file (ffmpeg flushes and exits)."""
    if not self.frames:
      raise ValueError(f"{self.path}: no frames were written")
    writer, self._writer = self._writer, None
    if writer is not None:
      writer.close()

  def commit(self) -> Path:
    """The finished file under its name."""
    self.close()
    os.replace(self.tmp, self.path)
    return self.path

  def discard(self) -> None:
    """No file: the temporary one is removed (ffmpeg stopped first)."""
    writer, self._writer = self._writer, None
    if writer is not None:
      try:
        writer.close()
      except Exception:  # noqa: BLE001  (already failing: the file goes either way)
        pass
    self.tmp.unlink(missing_ok=True)

  def __enter__(self) -> "Mp4Writer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      try:
        self.commit()
        return
      except BaseException:
        self.discard()
        raise
    self.discard()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FPS, *, quality: int = 8) -> Path:
  """All frames (T, H, W, 3) uint8 as an H.264 mp4 at `path` (which appears only when complete)."""
  with Mp4Writer(path, fps, quality=quality) as writer:
    writer.write(frames)
  return Path(path)


def resize_height(frames: np.ndarray, height: int) -> np.ndarray:
  """(T, H, W, 3) uint8 -> `height` rows, aspect kept."""
  import cv2

  h, w = frames.shape[1:3]
  if h == height:
    return frames
  width = max(1, round(w * height / h))
  interp = cv2.INTER_AREA if height < h else cv2.INTER_CUBIC
  return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


def side_by_side(columns: Sequence[np.ndarray], height: int | None = None) -> np.ndarray:
  """Columns of uint8 frames (T, H_i, W_i, 3), or stills (H_i, W_i, 3) repeated, -> (T, height, sum W, 3)."""
  if not columns:
    raise ValueError("side_by_side needs at least one column")
  cols = [_check_frames(np.asarray(c)[None] if np.ndim(c) == 3 else c) for c in columns]
  t = max(len(c) for c in cols)
  bad = [c.shape for c in cols if len(c) not in (1, t)]
  if bad:
    raise ValueError(f"side_by_side: every column needs {t} frames (or 1, a still); got shapes {bad}")
  height = height or max(c.shape[1] for c in cols)
  cols = [resize_height(c, height) for c in cols]
  return np.concatenate([np.broadcast_to(c, (t,) + c.shape[1:]) for c in cols], axis=2)
