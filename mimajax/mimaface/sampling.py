"""Clip-by-clip sampling of MIMAFace (paper section "Inference"): DDIM or Euler, classifier-free guidance, ICA.

One clip is denoised from `noise` under the appearance context (CLIP + MIA tokens), the render latents of
the driving 3DMM coefficients, and ICA's conditioning latents + mask (the last k latents of the previous
clip, fixed over the denoising steps as in the paper; zeros for the first clip). Each step runs the U-Net on
`ica.unet_input(noisy, render, cond, mask)`, exactly as `MIMAFace.predict` does in training.

Classifier-free guidance runs the conditional and the unconditional branch in one batch of 2B (unconditional
first, as diffusers' pipelines order it); the unconditional context is zeros, which is how training drops the
condition (`mimajax.mimaface.mia.drop_condition`): eps = eps_u + w (eps_c - eps_u). w = 1 skips the second half.

The whole loop is one `jax.jit` program taking the model's state as an argument: the model is split once, so a
long video sampled clip by clip compiles once per input shapes (`ClipSampler.compilations` counts the traces).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.diffusion import schedulers
from mimajax.mimaface import ica
from mimajax.mimaface.model import MIMAFace

SCHEDULERS = ("ddim", "euler")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How a clip is denoised. The paper states no sampler; these defaults are ours (DDIM, 25 steps, w = 3.5,
  SD1.5's leading spacing). The release samples 25 Euler steps at w = 5.0 with linspace spacing
  (inference.RELEASE_SAMPLER, configs/release.py)."""

  scheduler: str = "ddim"  # or "euler"
  num_inference_steps: int = 25
  guidance_scale: float = 3.5  # classifier-free guidance on the appearance context; 1.0 = no CFG
  eta: float = 0.0  # DDIM only: 0 is deterministic DDIM; > 0 needs a `key`
  timestep_spacing: str = "leading"

  def __post_init__(self):
    if self.scheduler not in SCHEDULERS:
      raise ValueError(f"SamplerConfig.scheduler={self.scheduler!r} unknown; expected one of {SCHEDULERS}")
    if self.num_inference_steps < 1:
      raise ValueError(f"SamplerConfig.num_inference_steps={self.num_inference_steps} must be >= 1")
    if self.guidance_scale < 0:
      raise ValueError(f"SamplerConfig.guidance_scale={self.guidance_scale} must be >= 0 (1.0 = no guidance)")
    if self.eta < 0 or (self.eta and self.scheduler != "ddim"):
      raise ValueError(f"SamplerConfig.eta={self.eta} must be >= 0, and is only used by the 'ddim' scheduler")
    if self.timestep_spacing not in schedulers.TIMESTEP_SPACINGS:
      raise ValueError(
        f"SamplerConfig.timestep_spacing={self.timestep_spacing!r} unknown; expected one of "
        f"{schedulers.TIMESTEP_SPACINGS}"
      )

  @property
  def guided(self) -> bool:
    return self.guidance_scale != 1.0

  @classmethod
  def from_config(cls, sample) -> "SamplerConfig":
    """The sampler of a training config's `sample` section (or a saved export's "inference" entry): the fields
    it names, the defaults for the rest. The one reader of sampler settings (training samples, inference
    loading, export)."""
    sample = sample or {}
    return cls(**{f.name: sample[f.name] for f in dataclasses.fields(cls) if f.name in sample})


class ClipSampler:
  """Denoises one clip; the jitted loop is compiled once per input shapes and reused for every clip."""

  def __init__(self, model: MIMAFace, schedule: schedulers.NoiseSchedule, config: SamplerConfig = SamplerConfig()):
    self.config = config
    self.video = model.config.video
    self.schedule = schedule
    # Split once: the loop takes `state` as an argument, so new clips (or new weights of the same
    # structure, e.g. during training) reuse the compiled program.
    self.graphdef, self.state = nnx.split(model)
    n, spacing = config.num_inference_steps, config.timestep_spacing
    if config.scheduler == "ddim":
      timesteps = schedulers.ddim_timesteps(schedule, n, spacing)
      self.tables = (timesteps, schedulers.ddim_prev_timesteps(schedule, timesteps, n))
    else:
      sigmas, timesteps = schedulers.euler_sigmas_and_timesteps(schedule, n, spacing)
      self.tables = (sigmas, timesteps, schedulers.euler_init_noise_sigma(sigmas, spacing))
    self.compilations = 0
    self._loop = jax.jit(self._sample)

  def __call__(
    self,
    *,
    context: jax.Array,
    render_latents: jax.Array,
    noise: jax.Array,
    cond_latents: jax.Array | None = None,
    mask: jax.Array | None = None,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """Denoised latents (B, [F,] h, w, 4) from unit-variance `noise` of that shape.

    context (B, T, D), or per frame (B, F, T, D); render_latents like noise; cond_latents like noise and
    mask (B, [F,] h, w, 1) (ICA; zeros when None); key: DDIM with eta > 0 only.
    """
    noise = jnp.asarray(noise, jnp.float32)
    want_ndim = 5 if self.video else 4
    if noise.ndim != want_ndim or noise.shape[-1] != ica.LATENT_CHANNELS:
      stage = (
        "stage-2 (video) model takes (B, F, h, w, 4)" if self.video else "stage-1 (image) model takes (B, h, w, 4)"
      )
      raise ValueError(f"ClipSampler: a {stage} noise; got shape {noise.shape}")
    if cond_latents is None:
      cond_latents = jnp.zeros_like(noise)
    if mask is None:
      mask = jnp.zeros(noise.shape[:-1] + (1,), noise.dtype)
    # The four inputs' shapes, checked up front (shapes only) by the function that builds the U-Net input.
    jax.eval_shape(ica.unet_input, noise, render_latents, cond_latents, mask)
    context = jnp.asarray(context)
    if context.shape[0] != noise.shape[0] or context.ndim not in (3, 4):
      raise ValueError(
        f"ClipSampler: context must be (B={noise.shape[0]}, T, D) or per frame (B, F, T, D); got {context.shape}"
      )
    if key is None and self.config.eta:
      raise ValueError(f"ClipSampler: eta={self.config.eta} draws fresh noise every step and needs a PRNG `key`")
    return self._loop(
      self.state, self.schedule, self.tables, context, render_latents, noise, cond_latents, mask,
      key if self.config.eta else None,
    )  # fmt: skip

  def _sample(self, state, schedule, tables, context, render, noise, cond, mask, key):
    self.compilations += 1  # runs only while tracing
    model = nnx.merge(self.graphdef, state)
    cfg = self.config
    dtype = noise.dtype
    render, cond, mask = (jnp.asarray(a, dtype) for a in (render, cond, mask))
    if cfg.guided:  # [uncond | cond] in one batch; the unconditional appearance is zeros (drop_condition)
      context = jnp.concatenate([jnp.zeros_like(context), context])
      render, cond, mask = (jnp.concatenate([a, a]) for a in (render, cond, mask))

    def denoise(x, t):
      if not cfg.guided:
        return model.predict(x, t, context, render, cond, mask)
      uncond, conditional = jnp.split(model.predict(jnp.concatenate([x, x]), t, context, render, cond, mask), 2)
      return uncond + cfg.guidance_scale * (conditional - uncond)

    if cfg.scheduler == "ddim":
      timesteps, prev = tables
      return schedulers.ddim_sample(schedule, denoise, noise, timesteps, prev, eta=cfg.eta, key=key)
    sigmas, timesteps, init_sigma = tables
    return schedulers.euler_sample(schedule, denoise, noise, sigmas, timesteps, init_sigma)
