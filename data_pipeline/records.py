"""The record schema of the prepared dataset: one record = one segment of consecutive frames of one video.

Granularity: a video of N frames is cut into ceil(N / frames_per_record) segments of balanced length
(64 frames by default, so every segment of a video longer than 64 frames holds at least 32). A
12-frame clip and a source frame outside it are then sampled from one record, with one random read,
and a record stays small enough (~64 JPEGs) that reading it whole to decode 13 frames costs little.

Binary layout (little-endian, no dependency beyond numpy):
  b"MIMAREC1" (b"MIMAREC2" with latents) | uint32 header length | header (UTF-8 JSON) | coefficients float32 (n, d)
    [| latents (n, h, w, c) | render latents (n, h, w, c)] | frame bytes
The header holds video_id, speaker, identity, frame_indices, the byte length of each frame, the
coefficient dim, the image format ("jpeg", or lossless "png") and the frame size, and, in a record of a latent
cache (data_pipeline/latent_cache.py), latent_shape (h, w, c) and latent_dtype ("float32" | "float16"): the
frozen VAE's scaled posterior-mean latents of each frame and of each frame's render I_R.

The TFDS builder (voxceleb2_mima.py) stores the same Record as a TFDS example (`to_tfds_example`); the loader
reads those back with `from_tfds_example`, so reading a TFDS source needs this module only, not the builder (which
imports the preparation job) nor tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

MAGIC = b"MIMAREC1"
MAGIC_LATENTS = b"MIMAREC2"  # a record with latents: a reader that predates them refuses it rather than misreads
# ArrayRecord options: one record per group so any record is one random read; frames are already JPEG.
WRITER_OPTIONS = "group_size:1,uncompressed"
IMAGE_FORMATS = ("jpeg", "png")
# Deep3DFaceRecon layout (257 columns); the MIMAFace release appends 4 gaze columns.
COEFFICIENT_DIMS = (257, 261)
LATENT_DTYPES = ("float32", "float16")


@dataclasses.dataclass
class Record:
  """One segment of a video: encoded frames and their per-frame 3DMM coefficients."""

  video_id: str  # "<speaker>/<video>/<clip>", the clip's path relative to the input folder, no extension
  speaker: str  # identity name (VoxCeleb2's "id00012")
  identity: int  # index of `speaker` in the manifest's identity vocabulary
  frame_indices: np.ndarray  # (n,) int32 frame numbers in the source video
  coefficients: np.ndarray  # (n, d) float32, d in COEFFICIENT_DIMS
  frames: list[bytes]  # n encoded images, RGB, height x width (memoryviews from decode_record(copy_frames=False))
  height: int
  width: int
  image_format: str = "jpeg"
  latents: np.ndarray | None = None  # (n, h, w, c) the frames' VAE latents (a latent cache's records)
  render_latents: np.ndarray | None = None  # (n, h, w, c) the VAE latents of the frames' renders

  def __post_init__(self):
    self.frame_indices = np.asarray(self.frame_indices, np.int32)
    self.coefficients = np.asarray(self.coefficients, np.float32)
    n = len(self.frames)
    if self.frame_indices.shape != (n,):
      raise ValueError(f"{self.video_id}: frame_indices has shape {self.frame_indices.shape}; expected ({n},)")
    if self.coefficients.ndim != 2 or self.coefficients.shape[0] != n:
      raise ValueError(f"{self.video_id}: coefficients have shape {self.coefficients.shape}; expected ({n}, d)")
    if self.image_format not in IMAGE_FORMATS:
      raise ValueError(f"{self.video_id}: image_format {self.image_format!r}; expected one of {IMAGE_FORMATS}")
    if (self.latents is None) != (self.render_latents is None):
      raise ValueError(f"{self.video_id}: latents and render_latents come together (a latent cache stores both)")
    if self.latents is not None:
      for name in ("latents", "render_latents"):
        x = np.asarray(getattr(self, name))
        if (x.ndim != 4 or x.shape[0] != n or x.shape != np.shape(self.latents) or x.dtype.name not in LATENT_DTYPES
            or x.dtype != np.asarray(self.latents).dtype):  # fmt: skip
          raise ValueError(f"{self.video_id}: {name} {x.dtype}{x.shape}; expected ({n}, h, w, c) of {LATENT_DTYPES}, "
                           "the same shape for both")  # fmt: skip
        setattr(self, name, x)

  @property
  def num_frames(self) -> int:
    return len(self.frames)


def encode_record(record: Record) -> bytes:
  """Record -> bytes (the ArrayRecord payload)."""
  header = dict(
    video_id=record.video_id,
    speaker=record.speaker,
    identity=int(record.identity),
    frame_indices=record.frame_indices.tolist(),
    frame_sizes=[len(f) for f in record.frames],
    coefficient_dim=int(record.coefficients.shape[1]),
    image_format=record.image_format,
    height=int(record.height),
    width=int(record.width),
  )
  latents = []
  if record.latents is not None:
    header.update(latent_shape=list(record.latents.shape[1:]), latent_dtype=record.latents.dtype.name)
    dtype = np.dtype(record.latents.dtype).newbyteorder("<")
    latents = [np.ascontiguousarray(x, dtype).tobytes() for x in (record.latents, record.render_latents)]
  head = json.dumps(header, separators=(",", ":")).encode()
  coeffs = np.ascontiguousarray(record.coefficients, "<f4").tobytes()
  magic = MAGIC_LATENTS if latents else MAGIC
  return b"".join([magic, struct.pack("<I", len(head)), head, coeffs, *latents, *record.frames])


def decode_record(data: bytes, *, copy_frames: bool = True) -> Record:
  """bytes -> Record; the frames stay encoded (decode only the ones a clip uses).

  copy_frames=False gives the frames as memoryviews into `data` (no copy of the ~64 JPEGs a clip
  mostly does not use; the loader's hot path).
  """
  if bytes(data[: len(MAGIC)]) not in (MAGIC, MAGIC_LATENTS):
    expected = f"{MAGIC!r} (or {MAGIC_LATENTS!r})"
    raise ValueError(f"not a mimajax record: starts with {bytes(data[:8])!r}; expected {expected}")
  (head_len,) = struct.unpack_from("<I", data, len(MAGIC))
  offset = len(MAGIC) + 4
  header = json.loads(bytes(data[offset : offset + head_len]))
  offset += head_len
  n, d = len(header["frame_sizes"]), header["coefficient_dim"]
  coeffs = np.frombuffer(data, "<f4", count=n * d, offset=offset).reshape(n, d).astype(np.float32)
  offset += 4 * n * d
  latents = [None, None]
  if "latent_shape" in header:
    if header.get("latent_dtype") not in LATENT_DTYPES:
      raise ValueError(f"record of {header['video_id']}: latent_dtype {header.get('latent_dtype')!r}; "
                       f"expected one of {LATENT_DTYPES}")  # fmt: skip
    dtype, shape = np.dtype(header["latent_dtype"]).newbyteorder("<"), (n, *header["latent_shape"])
    count = int(np.prod(shape))
    for i in range(2):
      if offset + count * dtype.itemsize > len(data):
        raise ValueError(f"record of {header['video_id']} ends inside its latents (truncated or corrupt)")
      latents[i] = np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape).astype(dtype.name)
      offset += count * dtype.itemsize
  frames, view = [], memoryview(data)
  for size in header["frame_sizes"]:
    frame = view[offset : offset + size]
    frames.append(bytes(frame) if copy_frames else frame)
    offset += size
  if offset != len(data):
    raise ValueError(f"record of {header['video_id']} has {len(data) - offset} trailing bytes (truncated or corrupt)")
  return Record(
    video_id=header["video_id"],
    speaker=header["speaker"],
    identity=header["identity"],
    frame_indices=np.asarray(header["frame_indices"], np.int32),
    coefficients=coeffs,
    frames=frames,
    height=header["height"],
    width=header["width"],
    image_format=header["image_format"],
    latents=latents[0],
    render_latents=latents[1],
  )


def encode_frame(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
  """(H, W, 3) uint8 RGB -> JPEG (4:2:0, `quality`) or PNG bytes."""
  import cv2

  bgr = np.ascontiguousarray(rgb[..., ::-1])
  if image_format == "jpeg":
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  elif image_format == "png":
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  else:
    raise ValueError(f"image_format {image_format!r}; expected one of {IMAGE_FORMATS}")
  if not ok:
    raise ValueError(f"OpenCV could not encode a {rgb.shape} frame as {image_format}")
  return buf.tobytes()


def decode_frame(data: bytes, size: int | None = None) -> np.ndarray:
  """Encoded image -> (H, W, 3) uint8 RGB, resized to (size, size) if given.

  Halving sizes are decoded in the JPEG's DCT domain (libjpeg's scaled decoding), the cheapest way down.
  """
  import cv2

  buf = np.frombuffer(data, np.uint8)
  flag = cv2.IMREAD_COLOR
  if size is not None:
    w = (jpeg_size(data) or (None, None))[1]
    for factor, reduced in (
      (8, cv2.IMREAD_REDUCED_COLOR_8),
      (4, cv2.IMREAD_REDUCED_COLOR_4),
      (2, cv2.IMREAD_REDUCED_COLOR_2),
    ):
      if w is not None and w == size * factor:
        flag = reduced
        break
  bgr = cv2.imdecode(buf, flag)
  if bgr is None:
    raise ValueError(f"could not decode a {len(data)}-byte frame (corrupt JPEG/PNG)")
  if size is not None and bgr.shape[:2] != (size, size):
    shrink = bgr.shape[0] > size
    bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # ~40x faster than a NumPy channel reversal


def jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from a baseline/progressive JPEG's SOF marker, without decoding; None for other formats."""
  if data[:2] != b"\xff\xd8":
    return None
  i = 2
  while i + 9 < len(data):
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    length = struct.unpack_from(">H", data, i + 2)[0]
    if marker in (0xC0, 0xC1, 0xC2):
      return struct.unpack_from(">HH", data, i + 5)
    i += 2 + length
  return None


def to_tfds_example(rec: Record) -> dict:
  """Record -> the voxceleb2_mima builder's TFDS example (frames stay encoded JPEG bytes)."""
  return dict(video_id=rec.video_id, speaker=rec.speaker, identity=rec.identity, frame_indices=rec.frame_indices,
              coefficients=rec.coefficients, frames=list(rec.frames))  # fmt: skip


def from_tfds_example(example: dict) -> Record:
  """A TFDS example (as tfds.data_source returns it) -> Record."""
  frames = [bytes(f) for f in example["frames"]]
  size = jpeg_size(frames[0]) if frames else None
  if size is None:
    raise ValueError(f"{example['video_id']!r}: expected JPEG frames")
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return Record(
    video_id=text(example["video_id"]),
    speaker=text(example["speaker"]),
    identity=int(example["identity"]),
    frame_indices=np.asarray(example["frame_indices"], np.int32),
    coefficients=np.asarray(example["coefficients"], np.float32),
    frames=frames,
    height=size[0],
    width=size[1],
  )
