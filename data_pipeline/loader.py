"""Grain loaders over the prepared shards: clips of F frames + a source frame of the same video, batched per host.

Pipeline (one `grain.MapDataset`, so it is deterministic for a seed and its iterator state is exact):
  ArrayRecord shards -> records long enough for the clip -> this host's slice [process_index::process_count]
  -> shuffle (reshuffled every epoch) -> repeat -> sample a clip (F frames, stride) and a source frame
  outside it (`RandomClip`), decode those JPEGs only, flip (optional, the same for the whole clip) -> batch
  -> read threads / worker processes (`mp_prefetch`).

A batch (numpy; host-local, B = batch_size) maps onto mimajax.mimaface.model's training batch:
  frames        (B, F, H, W, 3) uint8 (or float32 in [0, 1]); the VAE turns them into `latents` on device
  source_frame  (B, H', W', 3) the same video, outside the clip; resized to CLIP's 224 it is `source`
  motion        (B, F, D) float32 3DMM coefficients of the frames (D = 257 | 261); rendered on device it
                gives `render_latents`
  source_motion (B, D) the source frame's coefficients
  identity      (B,) int32 speaker label (index into the manifest's `identities`)
  frame_indices (B, F) int32, source_index (B,) int32: frame numbers in the video
  record_index  (B,) int32 the record's index in the dataset; flipped (B,) bool
Image mode (stage 1) is num_frames=1: the F axis is dropped (frames (B, H, W, 3), motion (B, D)).
Every host's batch becomes global device arrays with `mimajax.sharding.to_global(batch, mesh)`.

Imports: records and the shared library only. A TFDS source is read with `records.from_tfds_example`, never
through the builder (voxceleb2_mima) or any other part of the preparation job.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from data_pipeline import records
from mimajax.face3d.coefficients import COEFFICIENT_SLICES
from mimajax.faces.motion_fit import GAZE_MIRROR_COLUMNS


def _mirror_sign_columns() -> np.ndarray:
  """Columns whose sign flips under a horizontal mirror (x -> -x in camera space), from the coefficient layout.

  Deep3DFaceRecon's yaw and roll angles, x translation, the x-odd spherical-harmonic bands (x, xy, xz) of each
  colour, and of the gaze the columns that motion_fit's layout makes odd (mean horizontal iris offset, the eyes'
  vertical difference; the eyes swap places, so the rest is even).
  """
  a, _ = COEFFICIENT_SLICES["angle"]
  g, _ = COEFFICIENT_SLICES["gamma"]
  t, _ = COEFFICIENT_SLICES["translation"]
  z, _ = COEFFICIENT_SLICES["gaze"]
  bands = [g + 9 * colour + band for colour in range(3) for band in (3, 4, 7)]  # gamma is stored (3, 9)
  return np.array([a + 1, a + 2, t, *bands, *(z + c for c in GAZE_MIRROR_COLUMNS)])


MIRROR_SIGN_COLUMNS = _mirror_sign_columns()


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  num_frames: int = 12  # F; 1 is image mode (stage 1): no frame axis
  stride: int = 1  # frame step inside a clip; lowered for records too short for it
  batch_size: int = 8  # per host
  resolution: int | None = None  # None: as stored; halving sizes decode in the DCT domain
  source_resolution: int | None = None  # None: same as resolution
  flip: bool = False  # horizontal flip of half the samples (see mirror_coefficients)
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  drop_remainder: bool = True
  float_frames: bool = False  # float32 in [0, 1] instead of uint8 (4x the bytes between processes)
  coefficient_dim: int | None = None  # 257 drops the release's gaze columns; None keeps what is stored
  # Speakers (manifest identity names) whose records are left out, e.g. frames a stage must never see so they can be
  # held out for its evaluation; each record's header is read once when the dataset is built.
  exclude_identities: tuple[str, ...] = ()
  # A latent cache's records (latent_cache.py): the clip's `latents` and `render_latents` (float32) join the sample;
  # the family decides whether they are the step's own (its VAE, face model and resolution).
  latents: bool = False

  def __post_init__(self):
    if self.num_frames < 1 or self.stride < 1 or self.batch_size < 1:
      raise ValueError(f"num_frames, stride and batch_size must be >= 1: {self}")
    if self.latents and self.flip:
      raise ValueError("latents with flip: a latent cache holds the unflipped frames' latents (turn one off)")

  @property
  def min_record_frames(self) -> int:
    return self.num_frames + 1  # the clip at stride 1 and one source frame outside it


def mirror_coefficients(coeffs: np.ndarray) -> np.ndarray:
  """Coefficients of the horizontally mirrored face: pose, lighting and (mimajax.faces.motion_fit's) gaze exactly.

  Identity, expression and texture are left as they are (neither the BFM's nor the landmark model's PCA bases have
  a per-component mirror; asymmetric expressions stay unmirrored). Gaze follows motion_fit's layout; the
  release's own gaze layout is not documented, so for its 261-column rows the gaze flip is a guess.
  """
  out = np.array(coeffs, np.float32, copy=True)
  out[..., MIRROR_SIGN_COLUMNS[MIRROR_SIGN_COLUMNS < out.shape[-1]]] *= -1  # 257-column rows have no gaze
  return out


# --------------------------------------------------------------------------- source


def find_shards(data: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[list[int]] | None]:
  """Shard paths and, where each shard's stats .json is present, its records' frame counts."""
  if isinstance(data, (str, os.PathLike)):
    root = Path(data)
    manifest = root / "manifest.json"
    if root.is_dir() and manifest.exists():
      paths = [str(root / s["path"]) for s in json.loads(manifest.read_text())["shards"]]
    elif root.is_dir():
      paths = sorted(str(p) for p in root.glob("*.array_record"))
    else:
      paths = [str(root)]
  else:
    paths = [str(p) for p in data]
  if not paths:
    raise ValueError(f"no .array_record shards in {data}; run `mimajax prepare` first")
  counts = []
  for p in paths:
    stats = Path(p[: -len(".array_record")] + ".json")
    if not stats.exists():
      return paths, None
    counts.append(json.loads(stats.read_text())["record_frames"])
  return paths, counts


class RecordSource(grain.sources.RandomAccessDataSource):
  """(record index, record bytes) of the records with at least min_frames frames (when counts are known)."""

  def __init__(self, paths: Sequence[str], record_frames: Sequence[Sequence[int]] | None = None, min_frames: int = 1,
               exclude_identities: Sequence[str] = ()):  # fmt: skip
    self._source = grain.sources.ArrayRecordDataSource(list(paths))
    if record_frames is None:
      self._index = np.arange(len(self._source), dtype=np.int64)
    else:
      frames = np.concatenate([np.asarray(c, np.int64) for c in record_frames] or [np.zeros(0, np.int64)])
      if len(frames) != len(self._source):
        raise ValueError(f"shard stats list {len(frames)} records but the shards hold {len(self._source)}")
      self._index = np.nonzero(frames >= min_frames)[0]
    if exclude_identities:
      leave = set(exclude_identities)
      speaker = lambda i: records.decode_record(self._source[int(i)], copy_frames=False).speaker
      self._index = np.array([i for i in self._index if speaker(i) not in leave], np.int64)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i):
    index = int(self._index[i])
    return index, self._source[index]

  def __repr__(self) -> str:
    return f"RecordSource({len(self)} of {len(self._source)} records)"


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class RandomClip:
  """(record index, record) + rng -> one sample: a clip, a source frame outside it, coefficients."""

  config: LoaderConfig

  def __call__(self, element: tuple[int, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    cfg = self.config
    index, data = element
    rec = data if isinstance(data, records.Record) else records.decode_record(data, copy_frames=False)
    n, f = rec.num_frames, cfg.num_frames
    if n < cfg.min_record_frames:
      raise ValueError(f"{rec.video_id}: a record of {n} frames cannot give {f} frames and a source frame outside")
    stride = max(1, min(cfg.stride, (n - 2) // (f - 1))) if f > 1 else 1
    span = (f - 1) * stride + 1
    start = int(rng.integers(0, n - span + 1))
    clip = start + stride * np.arange(f)
    k = int(rng.integers(0, n - span))  # one of the n - span frames outside [start, start + span)
    source = k if k < start else k + span
    flipped = bool(cfg.flip and rng.random() < 0.5)
    frames = np.stack([records.decode_frame(rec.frames[i], cfg.resolution) for i in clip])
    source_frame = records.decode_frame(rec.frames[source], cfg.source_resolution or cfg.resolution)
    coeffs = _select_dim(rec.coefficients, cfg.coefficient_dim, rec.video_id)
    motion, source_motion = coeffs[clip], coeffs[source]
    if flipped:
      frames, source_frame = frames[:, :, ::-1], source_frame[:, ::-1]
      motion, source_motion = mirror_coefficients(motion), mirror_coefficients(source_motion)
    if cfg.float_frames:
      frames, source_frame = frames.astype(np.float32) / 255.0, source_frame.astype(np.float32) / 255.0
    out = dict(
      frames=np.ascontiguousarray(frames),
      source_frame=np.ascontiguousarray(source_frame),
      motion=motion,
      source_motion=source_motion,
      identity=np.int32(rec.identity),
      frame_indices=rec.frame_indices[clip],
      source_index=np.int32(rec.frame_indices[source]),
      record_index=np.int32(index),
      flipped=np.bool_(flipped),
    )
    keys = ("frames", "motion", "frame_indices")
    if cfg.latents:
      if rec.latents is None:
        raise ValueError(f"{rec.video_id}: the loader was asked for latents and this record has none (expected "
                         "a `mimajax cache-latents` output)")  # fmt: skip
      out.update(
        latents=rec.latents[clip].astype(np.float32), render_latents=rec.render_latents[clip].astype(np.float32)
      )
      keys += ("latents", "render_latents")
    if f == 1:  # image mode: stage 1 has no frame axis
      for key in keys:
        out[key] = out[key][0]
    return out


def _tfds_record(index: int, example: dict) -> tuple[int, records.Record]:
  return index, records.from_tfds_example(example)


def _select_dim(coeffs: np.ndarray, dim: int | None, video_id: str) -> np.ndarray:
  if dim is None or coeffs.shape[1] == dim:
    return coeffs
  if dim < coeffs.shape[1]:
    return coeffs[:, :dim]
  raise ValueError(f"{video_id} has {coeffs.shape[1]}-column coefficients; the loader asks for {dim}")


# --------------------------------------------------------------------------- datasets


def _host_seed(seed: int, process_index: int) -> int:
  """A per-host seed, so hosts do not draw the same clip positions and flips for their i-th records."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
  return process_index, process_count


def dataset(data, config: LoaderConfig = LoaderConfig(), *, process_index: int | None = None,
            process_count: int | None = None) -> grain.MapDataset:  # fmt: skip
  """This host's batched MapDataset over `data`: a prepared folder, a shard list, or a TFDS data source."""
  process_index, process_count = _host(process_index, process_count)
  if isinstance(data, (str, os.PathLike, list, tuple)):
    paths, counts = find_shards(data)
    source = RecordSource(paths, counts, config.min_record_frames, config.exclude_identities)
    ds = grain.MapDataset.source(source)
  else:  # a random-access source of TFDS examples (see voxceleb2_mima.py)
    if config.exclude_identities:
      raise ValueError("exclude_identities needs prepared shards (a folder or shard list), not a TFDS source")
    ds = grain.MapDataset.source(data).map_with_index(_tfds_record)
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(
      f"host {process_index}/{process_count} has no records with >= {config.min_record_frames} frames in {data}"
    )
  seed = _host_seed(config.seed, process_index)
  if config.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(config.num_epochs)
  ds = ds.random_map(RandomClip(config), seed=seed)
  return ds.batch(config.batch_size, drop_remainder=config.drop_remainder)


def make_iterator(data, config: LoaderConfig = LoaderConfig(), *, process_index: int | None = None,
                  process_count: int | None = None, workers: int = 0, read_threads: int = 4,
                  prefetch_batches: int = 4) -> grain.DatasetIterator:  # fmt: skip
  """An iterator of host batches; `get_state()` / `set_state()` save and restore its position exactly.

  read_threads decode in the calling process (OpenCV releases the GIL); workers > 0 adds that many
  processes (`mp_prefetch`), each with its own read threads. The batches are the same for any of these;
  a saved state restores into an iterator built with the same data, config, host and workers.
  """
  ds = dataset(data, config, process_index=process_index, process_count=process_count)
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  it_ds = ds.to_iter_dataset(read)
  if workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; plain scripts never parse them
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch_batches)
    )
  return iter(it_ds)
