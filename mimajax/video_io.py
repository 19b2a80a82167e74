"""Video and image files for `mimajax animate`: streamed reading, checked atomic writing, the side-by-side view.

Reading goes through `imageio.v3.imiter` (its ffmpeg plugin; never `imageio.get_reader` on mp4, whose length is
infinite, see OFFLINE_ASSETS.md), one frame at a time, so long drivers need not fit in memory; `iter_video` warns
on stderr when a video decodes only partly (fewer frames than its container declares).

Writing: `Mp4Writer` pipes frames batch by batch into imageio-ffmpeg's bundled ffmpeg (libx264, yuv420p, which needs
even frame sides: odd sides are padded by repeating the last row / column), under a temporary name in the
destination folder. The file replaces `path` only once it is known complete: ffmpeg exited with status 0 (a full
disk makes it fail writing the trailer, which imageio-ffmpeg's own writer does not report), the file is not empty,
reading it back (demuxing, no decoding) gives as many frames as were written, and it is flushed to the disk
(`fsync`, where a full network disk may report only then). Otherwise `VideoWriteError` (an OSError) says why, the
temporary file is removed and whatever was at `path` is untouched. `write_image` does the same for one image.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import subprocess
import tempfile
from fractions import Fraction
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


def declared_frames(path: str | os.PathLike) -> int | None:
  """The frames the container declares (its duration x frame rate, rounded); None where it declares no duration.
  A video that decodes fewer is truncated or corrupt."""
  import imageio.v3 as iio

  try:
    meta = iio.immeta(path)
    duration, fps = float(meta.get("duration") or 0), float(meta.get("fps") or 0)
  except Exception:  # noqa: BLE001  (no usable metadata: nothing declared)
    return None
  frames = round(duration * fps)
  return frames if np.isfinite(duration * fps) and frames > 0 else None


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
  if not os.access(path.parent, os.W_OK | os.X_OK):
    raise ValueError(f"{what} {path}: the folder {path.parent} is not writable by this user")
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


class VideoWriteError(OSError):
  """A video or image could not be written completely (full disk, ffmpeg failure, unreadable result); nothing was
  put in its place. `errno` is the operating system's code where one caused it (ENOSPC: the disk is full)."""

  @classmethod
  def caused_by(cls, e: OSError, message: str) -> "VideoWriteError":
    err = cls(f"{message} ({e.strerror or e})")
    err.errno = e.errno
    return err


def ffmpeg_exe() -> str:
  """imageio-ffmpeg's ffmpeg (or the one IMAGEIO_FFMPEG_EXE names), looked up on every call."""
  import imageio_ffmpeg

  return imageio_ffmpeg.get_ffmpeg_exe()


def _tail(text: str, lines: int = 2) -> str:
  """The last distinct lines of ffmpeg's log (its reason is at the end), without their `[muxer @ 0x...]` tags."""
  kept = []
  for line in text.strip().splitlines():
    line = re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip())
    if line and line not in kept and not line.startswith("Last message repeated"):
      kept.append(line)
  return "; ".join(kept[-lines:]) or "no message"


def mp4_frame_count(path: str | os.PathLike, what: str | None = None) -> int:
  """Frames of the mp4's first video stream, by demuxing it (`-c copy`: no decoding, fast); VideoWriteError naming
  `what` (default: the file) if ffmpeg cannot read it."""
  what = what or str(path)
  cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null",
         "-progress", "pipe:1", "-"]  # fmt: skip
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise VideoWriteError(f"{what} cannot be read back: {e}") from e
  counts = re.findall(r"^frame=(\d+)\s*$", done.stdout, flags=re.MULTILINE)
  if done.returncode or not counts:
    raise VideoWriteError(f"{what} cannot be read back (ffmpeg exited with status {done.returncode}: "
                          f"{_tail(done.stderr, 1)})")  # fmt: skip
  return int(counts[-1])


def _fsync_file(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(path: Path) -> None:
  """Makes a rename in `path` durable; file systems that cannot sync a folder are left as they are."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _commit(tmp: Path, path: Path) -> Path:
  """`tmp` flushed to the disk, then renamed over `path` (a failure leaves `path` as it was)."""
  try:
    _fsync_file(tmp)
  except OSError as e:
    raise VideoWriteError.caused_by(e, f"{path} could not be flushed to the disk") from e
  os.replace(tmp, path)
  _fsync_dir(path.parent)
  return path


class Mp4Writer:
  """H.264 (libx264, yuv420p) mp4 written batch by batch under a temporary name beside `path`.

  `write` batches of uint8 frames (T, H, W, 3); `close` finishes the temporary file and checks it (ffmpeg's exit
  status, its size, the frame count read back; VideoWriteError otherwise), `commit` renames it to `path`;
  `discard` (or leaving a `with` block by an exception) removes it. As a context manager a clean exit commits.
  """

  def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, *, quality: int = 8):
    self.path = check_output_path(path)
    if not fps > 0:
      raise ValueError(f"fps must be > 0; got {fps}")
    if not 1 <= quality <= 10:
      raise ValueError(f"quality must be in [1, 10]; got {quality}")
    self.fps, self.quality, self.frames = fps, quality, 0
    self._size, self._proc, self._log, self._closed = None, None, None, False
    # ffmpeg picks the container from the extension; the name is new, so the file gets the usual permissions.
    self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial.mp4")

  def _command(self, size) -> list[str]:
    crf = int((1 - self.quality / 10) * 51)  # imageio-ffmpeg's quality -> libx264 CRF (quality 8: CRF 10)
    fps = str(Fraction(self.fps).limit_denominator())
    return [ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{size[1]}x{size[0]}",
            "-pix_fmt", "rgb24", "-r", fps, "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
            "-crf", str(crf), "-v", "error", str(self.tmp)]  # fmt: skip

  def _failed(self, what: str) -> VideoWriteError:
    """ffmpeg stopped (or was stopped): its exit status and the end of its log."""
    proc, self._proc = self._proc, None
    if proc is not None and proc.stdin is not None:
      try:
        proc.stdin.close()
      except OSError:
        pass
    status = proc.wait() if proc is not None else None
    log = ""
    if self._log is not None:
      self._log.seek(0)
      log = self._log.read().decode(errors="replace")
    err = VideoWriteError(f"{self.path} was not written: {what} (ffmpeg exited with status {status}: {_tail(log)})")
    if "No space left on device" in log:
      err.errno = errno.ENOSPC
    return err

  def write(self, frames: np.ndarray) -> None:
    frames = even_frames(_check_frames(frames))
    size = frames.shape[1:3]
    if self._closed or (self._size is not None and size != self._size):
      raise ValueError(f"{self.path}: frames of {size} after frames of {self._size} (or after close)")
    if self._proc is None:
      self._size = size
      self._log = tempfile.TemporaryFile()
      try:
        self._proc = subprocess.Popen(self._command(size), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._log)  # fmt: skip
      except OSError as e:
        raise VideoWriteError(f"{self.path}: cannot start ffmpeg ({e})") from e
    try:
      for frame in frames:
        self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
    except OSError as e:  # ffmpeg exited (a full disk, a bad folder): its log says why
      raise self._failed(f"ffmpeg stopped after {self.frames} frames") from e
    self.frames += len(frames)

  def close(self) -> None:
    """Finishes the temporary file (ffmpeg flushes and exits) and checks it is complete; VideoWriteError if not."""
    if self._closed:
      return
    if not self.frames:
      raise ValueError(f"{self.path}: no frames were written")
    proc = self._proc
    if proc is None:
      raise VideoWriteError(f"{self.path} was not written: ffmpeg already stopped")
    try:
      proc.stdin.close()
    except OSError:
      pass
    status = proc.wait()
    if status:
      raise self._failed(f"ffmpeg could not finish the {self.frames} frames")
    self._proc = None
    self._log.close()
    self._log = None
    size = self.tmp.stat().st_size if self.tmp.exists() else 0
    if not size:
      raise VideoWriteError(f"{self.path} was not written: ffmpeg reported success but left an empty or no file")
    back = mp4_frame_count(self.tmp, f"{self.path} was not written: the video ffmpeg finished")
    if back != self.frames:
      raise VideoWriteError(
        f"{self.path} was not written: {self.frames} frames went in, {back} read back ({size} bytes)"
      )
    self._closed = True

  def commit(self) -> Path:
    """The finished, checked file under its name."""
    self.close()
    return _commit(self.tmp, self.path)

  def discard(self) -> None:
    """No file: the temporary one is removed (ffmpeg stopped first)."""
    proc, self._proc = self._proc, None
    if proc is not None:
      proc.kill()
      proc.wait()
      if proc.stdin is not None:
        try:
          proc.stdin.close()
        except OSError:
          pass
    if self._log is not None:
      self._log.close()
      self._log = None
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


def write_image(path: str | os.PathLike, image) -> Path:
  """An image (H, W[, 1 | 3 | 4]) uint8 (or [0, 1] floats) as PNG / JPEG (by the extension) at `path`, replaced only
  when the whole file is on the disk (VideoWriteError, an OSError, otherwise: `path` stays as it was)."""
  import imageio.v3 as iio

  path = Path(path)
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = to_uint8(image) if np.issubdtype(image.dtype, np.floating) else image.astype(np.uint8)
  data = iio.imwrite("<bytes>", image, extension=path.suffix.lower() or ".png")
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial{path.suffix}")
  try:
    try:
      with open(tmp, "wb") as f:
        f.write(data)
    except OSError as e:
      raise VideoWriteError.caused_by(e, f"{path} could not be written") from e
    if tmp.stat().st_size != len(data):
      raise VideoWriteError(f"{path}: {tmp.stat().st_size} of {len(data)} bytes were written")
    return _commit(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


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
