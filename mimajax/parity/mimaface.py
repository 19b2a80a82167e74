"""End-to-end parity of MIMAFace (stage 2): JAX against its PyTorch export, stage by stage.

`mimajax parity --component mimaface --size tiny` builds the stage-2 model (CLIP, MIA, motion U-Net), a VAE and
a synthetic face model with random weights, exports them (`mimajax.mimaface.export`), loads the folder
with `mimajax.mimaface.pytorch.MIMAFacePipeline`, and runs both on the same source portrait, driving coefficients,
initial noise and ICA conditioning. Printed, each as ||jax - torch|| / ||torch||:

  clip         CLIP hidden states and e_id of the source
  mia          the appearance context (per frame)
  render       VAE latents of the 3DMM renders (rasterised once, in JAX; encoded by each framework's VAE)
  unet_step    one U-Net prediction on identical inputs
  sampling     the denoised latents of a full DDIM loop with CFG, each framework from its own context/renders
  decoded      the decoded frames (unclipped): the end-to-end error, returned

When a stage is above tolerance the largest stage error is returned instead (the command fails whenever any
stage does); `fail_fast` stops there.

Every parameter is drawn at random (fan-in scaled), so zero-initialised paths (MIA's motion attention
output, the motion modules' output projections, conv_in's ICA channels) carry signal and are compared.
torch, diffusers and transformers are imported only inside the functions here.
"""

from __future__ import annotations

import math
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import common
from mimajax.convert.state_dict import merge_params
from mimajax.diffusion import schedulers
from mimajax.face3d import synthetic_model
from mimajax.face3d.morphable_model import MorphableModel
from mimajax.mimaface import conditioning, ica
from mimajax.mimaface import factory as mimaface_factory
from mimajax.mimaface.export import export_mimaface
from mimajax.mimaface.inference import load_inference
from mimajax.mimaface.model import MIMAFace, normalize_for_clip
from mimajax.mimaface.sampling import ClipSampler, SamplerConfig
from mimajax.models import factory
from mimajax.models.vae import AutoencoderKL
from mimajax.parity.common import PARITY_TOLERANCE, rel_err

# (frames, frame pixels) per size: tiny's VAE downsamples by 2 (16x16 latents, the tiny U-Net's sample_size);
# sd15's by 8, and 32x32 latents keep a PyTorch run on CPU usable.
GEOMETRY = {"tiny": (4, 32), "sd15": (8, 256)}


def random_weights(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
  """A concrete module from an abstract one (`nnx.eval_shape`), every parameter random; no XLA compilation.

  Kernels ~ N(0, 1 / fan_in), norm scales 1 + N(0, 0.1^2), everything else N(0, 0.05^2): nothing is zero.
  """
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape, leaf = tuple(var.shape), str(path[-1])
    x = rng.standard_normal(shape, dtype=np.float32)
    if leaf == "kernel":
      x *= 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
    elif leaf == "scale":
      x = 1.0 + 0.1 * x
    else:
      x *= 0.05
    arrays[tuple(path)] = x
  return merge_params(abstract, arrays)


def build_random(size: str = "tiny", *, stage: int = 2, variant: str = "paper", seed: int = 0,
                 attention_impl: str | None = None) -> tuple[MIMAFace, AutoencoderKL]:  # fmt: skip
  """The MIMAFace and VAE of `configs.common.model_config(size)` with random weights."""
  model_cfg = common.model_config(size)
  model_cfg.mia.variant = variant
  impl = attention_impl or ("xla" if size == "tiny" else model_cfg.attention_impl)
  config = mimaface_factory.mimaface_config(model_cfg, stage=stage)
  model = random_weights(nnx.eval_shape(lambda: MIMAFace(config, attention_impl=impl, rngs=nnx.Rngs(0))), seed)
  vae_cfg = factory.vae_config(model_cfg)
  vae = random_weights(nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, attention_impl=impl, rngs=nnx.Rngs(0))), seed + 1)
  return model, vae


def parity_inputs(model: MIMAFace, frames: int, latent: int, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
  """Source (B, S, S, 3) in [0, 1], coefficients (B, F, 261), noise and ICA latents (B, F, h, w, 4), mask."""
  rng = np.random.default_rng(seed + 100)
  side = model.config.clip.image_size
  lead = (batch, frames)
  k = ica.inference_overlap(frames)  # the first k frames carry the previous clip's latents
  mask = np.zeros(lead + (latent, latent, 1), np.float32)
  mask[:, :k] = 1.0
  return dict(
    source=rng.uniform(0, 1, (batch, side, side, 3)).astype(np.float32),
    motion=(0.1 * rng.standard_normal(lead + (261,))).astype(np.float32),  # small: a face near frontal
    noise=rng.standard_normal(lead + (latent, latent, 4)).astype(np.float32),
    cond_latents=(rng.standard_normal(lead + (latent, latent, 4)) * mask).astype(np.float32),
    mask=mask,
    face_features=rng.standard_normal((batch, model.config.mia.face_recognition_dim)).astype(np.float32),
  )


def _jitted(fn: Callable, *modules: nnx.Module) -> Callable:
  """jax.jit of fn(*modules, *args) taking the modules' states as arguments, so no weight is baked into the program."""
  graphdefs, states = zip(*(nnx.split(m) for m in modules))
  run = jax.jit(lambda states, *args: fn(*(nnx.merge(g, s) for g, s in zip(graphdefs, states)), *args))
  return lambda *args: run(states, *args)


def _video_to_torch(x) -> np.ndarray:
  """(B, F, H, W, C) -> (B, C, F, H, W)."""
  return np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3))


def _numpy(x) -> np.ndarray:
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _video_from_torch(x) -> np.ndarray:
  """(B, C, F, H, W) torch -> (B, F, H, W, C) numpy."""
  return _numpy(x).transpose(0, 2, 3, 4, 1)


class _StageFailed(Exception):
  """A stage exceeded the tolerance and fail_fast was asked for."""


def mimaface_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  log: Callable[[str], None] = print,
  *,
  num_inference_steps: int = 10,
  guidance_scale: float = 3.5,
  scheduler: str = "ddim",
  variant: str = "paper",
  models: tuple[MIMAFace, AutoencoderKL, MorphableModel] | None = None,
  after_export: Callable[[MIMAFace], None] | None = None,
  fail_fast: bool = False,
) -> float:
  """JAX vs the PyTorch export, per stage; returns the decoded frames' relative L2 error (end to end).

  If a stage is above PARITY_TOLERANCE, the largest stage error is returned instead, so the command fails
  whenever any stage does; fail_fast stops at the first such stage.
  pretrained: a trained model (`mimaface.inference.load_inference`: workdir, step, export or release folder);
  models: (stage-2 MIMAFace, VAE, face model) to use instead of random ones. after_export(model) may edit the
  JAX model once the export is written (tests use it to show that a changed weight fails the check).
  """
  import torch

  from mimajax.mimaface.pytorch import MIMAFacePipeline

  if size not in GEOMETRY:
    raise ValueError(f"mimaface parity size {size!r} unknown; expected one of {sorted(GEOMETRY)}")
  frames, resolution = GEOMETRY[size]
  train_cfg = None
  if pretrained:
    inf = load_inference(pretrained)
    model, vae, face_model, train_cfg = inf.model, inf.vae, inf.face_model, inf.config
    frames, resolution = inf.num_frames, inf.resolution
  elif models is not None:
    model, vae, face_model = models
  else:
    model, vae = build_random(size, variant=variant, seed=seed)
    face_model = synthetic_model(seed)
  if not model.config.video:
    raise ValueError("mimaface parity runs a stage-2 (video) model; this one is stage 1")
  schedule_cfg = (train_cfg.noise_schedule if train_cfg is not None else common.noise_schedule()).to_dict()
  schedule = schedulers.make_noise_schedule(**schedule_cfg)
  sampler_cfg = SamplerConfig(scheduler=scheduler, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale)  # fmt: skip
  latent = resolution // conditioning.vae_scale(vae)
  x = parity_inputs(model, frames, latent, seed)
  if model.config.mia.variant == "paper":
    x["motion"] = x["motion"][..., :257]  # the paper's MIA reads 257 (no gaze); the release needs 261
  face = x["face_features"] if model.config.mia.variant == "release" else None

  with tempfile.TemporaryDirectory() as tmp:
    export_mimaface(model, vae, f"{tmp}/export", config=train_cfg, num_frames=frames, resolution=resolution)
    if after_export is not None:
      after_export(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = MIMAFacePipeline.from_pretrained(f"{tmp}/export", device=device)
  t = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731  (a writable copy)
  vid = lambda a: t(_video_to_torch(a))  # noqa: E731
  tag = f"mimaface[{size}{', pretrained' if pretrained else ''}]"
  log(f"{tag} {frames} frames at {resolution}px, {num_inference_steps} {scheduler} steps, guidance {guidance_scale}")
  errors = {}

  def report(name, ours, ref):
    errors[name] = err = rel_err(ours, _numpy(ref))
    over = err > PARITY_TOLERANCE
    log(f"{tag} {name} rel_err={err:.3e}" + (f"  <- above {PARITY_TOLERANCE:g}" if over else ""))
    if over and fail_fast:
      raise _StageFailed(err)

  try:
    # CLIP and MIA on the source and driving coefficients.
    clip = _jitted(lambda m, s: m.clip(normalize_for_clip(s)), model)(x["source"])
    source_t = t(x["source"].transpose(0, 3, 1, 2))
    hidden_t, e_id_t = pipe.clip_features(source_t)
    ours = np.concatenate([clip.last_hidden_state, clip.e_id[:, None]], 1)  # every token, then the pooled e_id
    report("clip", ours, torch.cat([hidden_t, e_id_t[:, None]], 1))
    context = _jitted(lambda m, s, c, f: m.encode_appearance(s, c, f).context, model)(x["source"], x["motion"], face)
    context_t = pipe.encode_appearance(source_t, t(x["motion"]), None if face is None else t(face))
    report("mia", context, context_t)

    # Renders: drawn once by the JAX rasterizer, VAE-encoded on each side.
    images = jax.jit(conditioning.render_images, static_argnums=2)(face_model, jnp.asarray(x["motion"]), resolution)
    render = _jitted(conditioning.encode_frames, vae)(images)
    render_t = pipe.encode(vid(images))
    report("render", render, _video_from_torch(render_t))

    # One U-Net step on identical inputs (JAX's), at the first sampling timestep.
    t0 = int(schedulers.ddim_timesteps(schedule, num_inference_steps)[0])
    inputs = (x["noise"], context, render, x["cond_latents"], x["mask"])
    eps = _jitted(lambda m, n, c, r, q, k: m.predict(n, jnp.asarray(t0), c, r, q, k), model)(*inputs)
    eps_t = pipe.predict(vid(x["noise"]), torch.tensor(t0, device=device), t(context), *(vid(a) for a in inputs[2:]))
    report("unet_step", eps, _video_from_torch(eps_t))

    # The full loop with CFG and ICA, each side from its own appearance context and render latents.
    latents = ClipSampler(model, schedule, sampler_cfg)(
      context=context, render_latents=render, noise=x["noise"], cond_latents=x["cond_latents"], mask=x["mask"]
    )
    latents_t = pipe(
      source_t, t(x["motion"]), render_t, vid(x["noise"]), vid(x["cond_latents"]), vid(x["mask"]),
      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
      face_features=None if face is None else t(face),
    )  # fmt: skip
    report("sampling", latents, _video_from_torch(latents_t))

    # Decoded frames in [-1, 1], unclipped (clipping would hide differences in saturated pixels).
    decode = lambda v, z: v.decode_latents(z.reshape(-1, *z.shape[2:])).reshape(*z.shape[:2], -1)  # noqa: E731
    decoded = _jitted(decode, vae)(latents)
    decoded_t = _video_from_torch(pipe.decode(latents_t, clip=False) * 2 - 1)
    report("decoded", decoded, decoded_t.reshape(decoded.shape))
  except _StageFailed as failed:
    return failed.args[0]
  worst = max(errors.values())
  return errors["decoded"] if worst <= PARITY_TOLERANCE else worst
