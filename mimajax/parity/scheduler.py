"""mimajax.diffusion.schedulers against diffusers' DDPM, DDIM and Euler schedulers on SD1.5's config.

No network is involved: a deterministic stand-in for the U-Net (`_fake_model`, written once for numpy, torch
and jax) drives both sampling loops. torch and diffusers are imported only inside `scheduler_parity`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimajax.diffusion.schedulers import (
  PREDICTION_TYPES,
  add_noise,
  ddim_prev_timesteps,
  ddim_sample,
  ddim_timesteps,
  euler_init_noise_sigma,
  euler_sample,
  euler_sigmas_and_timesteps,
  make_noise_schedule,
  velocity,
)
from mimajax.parity.common import rel_err

SHAPES = {"tiny": (2, 8, 8, 4), "sd15": (2, 64, 64, 4)}  # NHWC latents


def _fake_model(xp, x, t):
  """Deterministic stand-in for the UNet, written once for numpy/torch/jax via the array module xp."""
  return 0.8 * xp.tanh(x) + 0.1 * xp.cos(0.01 * t) * x + 0.05 * xp.sin(0.003 * t)


def scheduler_parity(
  size: str = "tiny", seed: int = 0, num_inference_steps: int = 25, log: Callable[[str], None] = print
) -> float:
  """Max relative L2 error of add_noise/velocity/DDIM/Euler vs diffusers on SD1.5's config."""
  if size not in SHAPES:
    raise ValueError(f"size={size!r} is not supported; expected one of {tuple(SHAPES)}")
  import torch
  from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

  base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  rng = np.random.default_rng(seed)
  shape = SHAPES[size]
  x0 = rng.standard_normal(shape).astype(np.float32)
  noise = rng.standard_normal(shape).astype(np.float32)
  t_train = rng.integers(0, 1000, size=shape[0])

  def to_torch(x):  # NHWC numpy -> NCHW torch
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

  def from_torch(x):  # NCHW torch -> NHWC numpy
    return np.moveaxis(x.detach().cpu().numpy(), 1, -1)

  errors = []
  for pred in PREDICTION_TYPES:
    sched = make_noise_schedule(prediction_type=pred)
    ddpm = DDPMScheduler(**base, prediction_type=pred, clip_sample=False)
    tt = torch.from_numpy(t_train)
    errors.append(rel_err(sched.alphas_cumprod, ddpm.alphas_cumprod.numpy()))
    ref = from_torch(ddpm.add_noise(to_torch(x0), to_torch(noise), tt))
    errors.append(rel_err(add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t_train)), ref))
    ref = from_torch(ddpm.get_velocity(to_torch(x0), to_torch(noise), tt))
    errors.append(rel_err(velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t_train)), ref))

    # DDIM: SD1.5 pipeline config (leading spacing, steps_offset=1, final alpha = alphas_cumprod[0]).
    ddim = DDIMScheduler(**base, prediction_type=pred, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ddim.set_timesteps(num_inference_steps)
    x = to_torch(noise)
    for t in ddim.timesteps:
      x = ddim.step(_fake_model(torch, x, t.float()), t, x).prev_sample
    ts = ddim_timesteps(sched, num_inference_steps)
    errors.append(rel_err(ts, ddim.timesteps.numpy()))
    prev = ddim_prev_timesteps(sched, ts, num_inference_steps)
    fn = lambda x, t: _fake_model(jnp, x, t.astype(jnp.float32))
    ours = jax.jit(ddim_sample, static_argnums=1)(sched, fn, jnp.asarray(noise), ts, prev)
    errors.append(rel_err(ours, from_torch(x)))

    # Euler with leading spacing (what from_config(SD1.5 scheduler config) gives) and with trailing.
    for spacing in ("leading", "trailing"):
      euler = EulerDiscreteScheduler(**base, prediction_type=pred, steps_offset=1, timestep_spacing=spacing)
      euler.set_timesteps(num_inference_steps)
      x = to_torch(noise) * euler.init_noise_sigma
      for t in euler.timesteps:
        x = euler.step(_fake_model(torch, euler.scale_model_input(x, t), t), t, x).prev_sample
      sigmas, ts = euler_sigmas_and_timesteps(sched, num_inference_steps, spacing)
      errors.append(rel_err(sigmas, euler.sigmas.numpy()))
      errors.append(rel_err(ts, euler.timesteps.numpy()))
      init = euler_init_noise_sigma(sigmas, spacing)
      errors.append(rel_err(init, float(euler.init_noise_sigma)))
      ours = jax.jit(euler_sample, static_argnums=1)(sched, fn, jnp.asarray(noise), sigmas, ts, init)
      errors.append(rel_err(ours, from_torch(x)))
  err = max(errors)
  log(f"scheduler[{size}] DDPM noising/velocity, DDIM and Euler loops (eps and v): max rel_err={err:.3e}")
  return err
