"""A latent cache: a prepared dataset rewritten with the frozen VAE's latents of every frame and of every frame's
render I_R stored in its records, so the train step reads them instead of encoding (the VAE is frozen in both
stages, and its encoder is most of the step's frozen work at 512 px).

  mimajax cache-latents --data data/vox --vae runs/vae --out data/vox_latents [--batch 32] [--dtype float32]

The output is a dataset like the input (same shard names, records, stats files, face_model.npz) whose records carry
`latents` and `render_latents` (records.py), and whose manifest.json gains a "latents" section: the VAE folder and
a digest of its parameters, the face model's digest, the resolution, the render shading and the dtype. The loader
hands them to the step as `latents` / `render_latents` only when they are the step's own (the family checks the
section against its VAE and face model, and says in the log whether it uses the cache). The encoding itself is the
family's (`encode`: frames and coefficients -> the two latent arrays); this module reads and writes shards.

Resumable and never half-written: each shard is written under a `.tmp` name and renamed when complete, its stats
file after it; a rerun skips complete shards (after checking the manifest's "latents" section is the same) and the
manifest is written last, so a folder with a manifest is a complete cache.

`--runner direct|dataflow|flink|spark` writes the shards as a Beam pipeline (beam_runner.py) with the same
`write_cache_shard`; each worker builds the encoder once (from the encoder factory: the VAE is loaded on the worker,
not shipped) and the bytes are those of the local run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline import beam_runner, records

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FACE_MODEL = "face_model.npz"
SECTION = "latents.json"  # the manifest's "latents" section, written before the first shard
# frames (n, H, W, 3) uint8 at the cache's resolution, coefficients (n, d) -> (latents, render_latents) (n, h, w, c)
Encoder = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def manifest_latents(data: str | os.PathLike) -> dict | None:
  """The "latents" section of a prepared folder's manifest (None: not a latent cache)."""
  path = Path(data) / MANIFEST
  if not Path(data).is_dir() or not path.exists():
    return None
  return json.loads(path.read_text()).get("latents")


def _stats(shard: Path) -> Path:
  return shard.with_suffix(".json")


def _replace(path: Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # an attempt's own name
  tmp.write_text(text)
  os.replace(tmp, path)


def write_cache_shard(src: Path, dst: Path, name: str, encode: Encoder, resolution: int, dtype: str) -> dict:
  """One shard of `src` -> the same shard with latents in `dst` (under this attempt's own temporary name, renamed
  when complete, then its stats file); returns {"records", "frames"}."""
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  target = dst / name
  tmp = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
  reader, writer = ArrayRecordReader(str(src / name)), ArrayRecordWriter(str(tmp), records.WRITER_OPTIONS)
  record_frames = []
  try:
    for k in range(reader.num_records()):
      rec = records.decode_record(reader.read([k])[0])
      frames = np.stack([records.decode_frame(f, resolution) for f in rec.frames])
      latents, renders = encode(frames, rec.coefficients)
      rec.latents, rec.render_latents = (np.asarray(x).astype(dtype) for x in (latents, renders))
      rec.__post_init__()  # the shapes checked before anything is written
      writer.write(records.encode_record(rec))
      record_frames.append(rec.num_frames)
  finally:
    writer.close()
    reader.close()
  os.replace(tmp, target)
  if _stats(src / name).exists():
    _replace(_stats(target), _stats(src / name).read_text())  # the stats file marks the shard done: atomically
  else:
    _replace(_stats(target), json.dumps(dict(shard=name, record_frames=record_frames)))
  return dict(records=len(record_frames), frames=sum(record_frames))


class BeamCacheShard:
  """write_cache_shard on a Beam worker: the encoder is built by `make_encoder()` on the first shard a worker
  takes and kept for the rest (the factory, not the VAE, is what travels)."""

  def __init__(self, src: Path, dst: Path, make_encoder: Callable[[], Encoder], resolution: int, dtype: str):
    self.src, self.dst, self.make_encoder, self.resolution, self.dtype = src, dst, make_encoder, resolution, dtype
    self._encode = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_encode"} | {"_encode": None}

  def __call__(self, name: str) -> dict[str, int]:
    if self._encode is None:
      self._encode = self.make_encoder()
    done = write_cache_shard(self.src, self.dst, name, self._encode, self.resolution, self.dtype)
    return dict(shards_written=1, records_written=done["records"], frames_encoded=done["frames"])


def cache_latents(data: str | os.PathLike, out: str | os.PathLike, encode: Encoder | None, *, info: dict,
                  resolution: int, dtype: str = "float32", progress: bool = True, runner: str = "local",
                  beam_args: tuple[str, ...] = (), workers: int = 1,
                  make_encoder: Callable[[], Encoder] | None = None) -> dict:  # fmt: skip
  """Writes the cache of `data` into `out` (see the module docstring); returns {"shards", "written", "records",
  "frames"}. `info` (JSON-able: what produced the latents) lands in the manifest's "latents" section.

  runner "local" encodes here with `encode`; a Beam runner (beam_runner.RUNNERS) runs the shards on its workers,
  each building its encoder with `make_encoder` (picklable, no arguments)."""
  beam_runner.check_runner(runner, beam_args, (data, out))
  if runner != "local" and make_encoder is None:
    raise ValueError(f"runner {runner!r} needs make_encoder: the encoder is built on each Beam worker")
  if runner == "local" and encode is None:
    raise ValueError("runner 'local' needs encode")
  if dtype not in records.LATENT_DTYPES:
    raise ValueError(f"dtype {dtype!r}; expected one of {records.LATENT_DTYPES}")
  src, dst = Path(data), Path(out)
  if not (src / MANIFEST).exists():
    raise ValueError(f"--data {src} has no {MANIFEST}: expected a `mimajax prepare` output")
  if src.resolve() == dst.resolve():
    raise ValueError(f"--out {dst} is --data: a cache is written beside the dataset, never over it")
  manifest = json.loads((src / MANIFEST).read_text())
  section = dict(info, resolution=int(resolution), dtype=dtype, source=str(src.absolute()))
  # What the shards already there were made with: the manifest of a complete cache, or latents.json of one in
  # progress (written before its first shard), so a rerun never mixes shards of two VAEs or settings.
  for record in (dst / MANIFEST, dst / SECTION):
    if record.exists():
      old = json.loads(record.read_text())
      old = old.get("latents") if record.name == MANIFEST else old
      if old != section:
        raise ValueError(f"--out {dst} holds latents made otherwise ({old}); this run makes {section}: use a new "
                         "folder, or the same --vae, --resolution, --shading and --dtype to resume")  # fmt: skip
  dst.mkdir(parents=True, exist_ok=True)
  _replace(dst / SECTION, json.dumps(section, indent=1))
  for leftover in dst.glob("*.tmp"):  # a killed run's partial files; no attempt of this run has started yet
    leftover.unlink()
  shards = [s["path"] for s in manifest["shards"]]
  todo = [name for name in shards if not ((dst / name).exists() and _stats(dst / name).exists())]
  totals = dict(shards=len(shards), written=len(todo), records=0, frames=0)
  if runner == "local":
    for name in todo:
      done = write_cache_shard(src, dst, name, encode, resolution, dtype)
      totals["records"] += done["records"]
      totals["frames"] += done["frames"]
      if progress:
        log.info("latent cache: shard %d/%d (%s) written", shards.index(name) + 1, len(shards), name)
  else:
    beam_runner.run_shards(todo, BeamCacheShard(src, dst, make_encoder, resolution, dtype), runner, beam_args, workers,
                           name="cache-latents")  # fmt: skip
    for name in todo:  # what the workers wrote, from the shards' stats
      frames = json.loads(_stats(dst / name).read_text())["record_frames"]
      totals["records"] += len(frames)
      totals["frames"] += sum(frames)
  if (src / FACE_MODEL).exists():
    shutil.copyfile(src / FACE_MODEL, dst / FACE_MODEL)
  _replace(dst / MANIFEST, json.dumps(dict(manifest, latents=section), indent=1))
  return totals
