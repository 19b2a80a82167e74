"""`mimajax cache-latents`: MIMAFace's frozen work done once per dataset instead of once per step.

  mimajax cache-latents --data data/vox --vae runs/vae --out data/vox_latents [--face-model FILE]
                        [--resolution 512] [--shading sh] [--batch 32] [--dtype float32]

Every frame of every record is encoded by the VAE (`conditioning.encode_frames`: the scaled posterior mean, as the
step encodes) and every frame's coefficients are rendered (I_R, `conditioning.render_latents`) and encoded, in
jitted batches; data_pipeline.latent_cache writes the shards (resumable, never half-written). `--vae` is a VAE-stage
workdir or a diffusers VAE folder (an SD folder's vae/); the face model is the dataset's face_model.npz, else
--face-model, else the synthetic one, as training picks it.

Training uses the cache when `config.data.path` is one and `config.data.latents` allows it ("auto", the default:
when it is the step's own; "always": an error otherwise; "never"): the cache's VAE and face-model digests, resolution
and shading must be the run's, and `config.data.flip` off. The release's blended training (`data.blend_source`)
renders rows that mix the source frame in, so it takes the frames' latents from the cache and renders in the step.
The log says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
DEFAULT_BATCH = 32


def vae_digest(vae) -> str:
  """SHA-256 over a VAE's parameters (path, dtype, shape, bytes) and its scaling: equal for equal latents."""
  from flax import nnx

  digest = hashlib.sha256(f"scale:{vae.config.scaling_factor}:{getattr(vae.config, 'shift_factor', None)};".encode())
  for path, value in sorted(nnx.to_flat_state(nnx.state(vae, nnx.Param)), key=lambda kv: str(kv[0])):
    x = np.ascontiguousarray(np.asarray(getattr(value, "value", value)))
    digest.update(f"{'/'.join(map(str, path))}:{x.dtype.str}:{x.shape};".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def compute_dtype(vae) -> str:
  """The dtype the VAE computes in ("float32", "bfloat16"): latents of one VAE differ between the two."""
  import jax.numpy as jnp

  return jnp.dtype(vae.dtype).name


def make_encoder(vae, face_model, resolution: int, shading: str, batch: int):
  """(frames (n, H, W, 3) uint8, coefficients (n, d)) -> (latents, render latents) as numpy, `batch` at a time
  (a fixed batch shape: one compilation; the last batch is padded)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mimajax.mimaface import conditioning

  graphdef, params = nnx.split(vae)

  @jax.jit  # the VAE's parameters and the face model are arguments, not constants folded into the program
  def encode_jit(params, face_model, frames, coeffs):
    vae = nnx.merge(graphdef, params)
    return conditioning.encode_frames(vae, frames), conditioning.render_latents(
      vae, face_model, coeffs, resolution, shading
    )

  encode = lambda frames, coeffs: encode_jit(params, face_model, frames, coeffs)  # noqa: E731

  def run(frames: np.ndarray, coeffs: np.ndarray):
    n, out = len(frames), ([], [])
    for i in range(0, n, batch):
      f, c = frames[i : i + batch], coeffs[i : i + batch]
      pad = batch - len(f)
      if pad:
        f = np.concatenate([f, np.repeat(f[-1:], pad, 0)])
        c = np.concatenate([c, np.repeat(c[-1:], pad, 0)])
      lat, ren = encode(jnp.asarray(f), jnp.asarray(c, jnp.float32))
      out[0].append(np.asarray(lat)[: batch - pad])
      out[1].append(np.asarray(ren)[: batch - pad])
    return np.concatenate(out[0]), np.concatenate(out[1])

  return run


@dataclasses.dataclass(frozen=True)
class EncoderFactory:
  """What a Beam worker needs to build the encoder itself (paths and settings: a few bytes to pickle, where the VAE
  would be hundreds of MiB): the VAE folder, its compute dtype, the face model, the resolution, shading, batch."""

  vae: str
  compute_dtype: str
  data: str
  face_model: str | None
  resolution: int
  shading: str
  batch: int

  def __call__(self):
    import jax.numpy as jnp

    from mimajax.convert import diffusers_format
    from mimajax.mimaface import vae_stage

    vae = diffusers_format.load_vae(vae_stage.vae_folder(self.vae), dtype=jnp.dtype(self.compute_dtype))
    face_model = _face_model(Path(self.data), self.face_model)
    return make_encoder(vae, face_model, self.resolution, self.shading, self.batch)


def _face_model(data: Path, path: str | None):
  from mimajax.face3d import load_face_model, synthetic_model
  from mimajax.mimaface import pretrained

  source = path or str(data / pretrained.FACE_MODEL_FILE)
  if Path(source).exists():
    return load_face_model(source)
  if path:
    raise ValueError(f"--face-model {path} does not exist")
  log.warning("no face_model.npz in %s: rendering with the synthetic morphable model (as training would)", data)
  return synthetic_model()


def add_arguments(p) -> None:
  p.add_argument("--data", required=True, help="a `mimajax prepare` output")
  p.add_argument("--vae", required=True, help="a VAE-stage workdir or a diffusers VAE folder (the run's frozen VAE)")
  p.add_argument("--out", required=True, help="the cache's folder (a dataset like --data, with latents)")
  p.add_argument("--face-model", default=None, help="default: --data's face_model.npz, else the synthetic model")
  p.add_argument("--resolution", type=int, default=None, help="frames resized to it first; default: as stored")
  p.add_argument("--shading", default="sh", help="the renders' shading (config.data.render_shading)")
  p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="frames per jitted encoding call")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored latents")
  p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="the VAE compute dtype: the run's config.model.dtype (sd15 configs: bfloat16)")  # fmt: skip
  from data_pipeline import beam_runner

  p.add_argument("--runner", default="local", choices=list(beam_runner.RUNNERS),
                 help="local: encode here; direct|dataflow|flink|spark: the shards as an Apache Beam pipeline, each "
                      "worker loading --vae itself (paths every worker sees)")  # fmt: skip
  p.add_argument("--workers", type=int, default=1, help="--runner direct: worker processes")
  p.add_argument("beam_args", nargs="*", metavar="BEAM_OPTION", help="after `--`: Beam pipeline options")
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  """0 on success; 2 with one line on stderr for bad input (nothing written that a rerun does not redo)."""
  from mimajax import cli_errors
  from mimajax.errors import CheckpointReadError

  try:
    return _run(args)
  except (ValueError, CheckpointReadError) as e:
    return cli_errors.fail("mimajax cache-latents", str(e))


def _run(args) -> int:
  import jax.numpy as jnp

  from data_pipeline import latent_cache, records
  from mimajax.convert import diffusers_format
  from mimajax.mimaface import pretrained, vae_stage

  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  data = Path(args.data)
  if not (data / latent_cache.MANIFEST).exists():
    raise ValueError(f"--data {data} has no {latent_cache.MANIFEST}: expected a `mimajax prepare` output")
  if args.batch < 1:
    raise ValueError(f"--batch {args.batch}; expected >= 1")
  vae = diffusers_format.load_vae(vae_stage.vae_folder(args.vae), dtype=jnp.dtype(args.compute_dtype))
  face_model = _face_model(data, args.face_model)
  resolution = args.resolution
  if resolution is None:
    from data_pipeline import loader

    paths, _ = loader.find_shards(data)
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(paths[0])
    resolution = records.decode_record(reader.read([0])[0]).height
    reader.close()
  info = dict(vae=str(Path(args.vae).absolute()), vae_digest=vae_digest(vae), compute_dtype=compute_dtype(vae),
              face_model_digest=pretrained.face_model_digest(face_model), shading=args.shading)  # fmt: skip
  factory = EncoderFactory(str(Path(args.vae).absolute()), args.compute_dtype, str(data.absolute()),
                           args.face_model and str(Path(args.face_model).absolute()), resolution, args.shading,
                           args.batch)  # fmt: skip
  local = args.runner == "local"
  encode = make_encoder(vae, face_model, resolution, args.shading, args.batch) if local else None
  totals = latent_cache.cache_latents(data, args.out, encode, info=info, resolution=resolution, dtype=args.dtype,
                                      progress=not args.no_progress, runner=args.runner,
                                      beam_args=tuple(args.beam_args), workers=args.workers,
                                      make_encoder=None if local else factory)  # fmt: skip
  print(f"shards={totals['shards']} written={totals['written']} records={totals['records']} "
        f"frames={totals['frames']} resolution={resolution} out={args.out}")  # fmt: skip
  return 0
