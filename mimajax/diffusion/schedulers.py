"""Noise schedules and samplers (DDPM noising, DDIM, Euler) matching diffusers, in pure JAX.

Host-side functions (`make_noise_schedule`, `ddim_timesteps`, `euler_sigmas_and_timesteps`) build
small tables with numpy once; everything that touches samples is jittable and takes traced
timesteps / step indices, so sampling loops can run inside `jax.lax.fori_loop` / `scan`.
Layout-agnostic: per-sample coefficients broadcast over all trailing dims ((B,H,W,C), (B,F,H,W,C), ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(name: str, value, allowed: tuple) -> None:
  """Raise a ValueError naming the bad value and the allowed ones."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Discrete DDPM noise schedule: per-timestep betas and cumulative alpha products (float32)."""

  betas: jax.Array  # (T,)
  alphas_cumprod: jax.Array  # (T,)
  # Static: it selects code paths (target / weighting), so it must be part of the jit cache key.
  prediction_type: str = dataclasses.field(default="epsilon", metadata=dict(static=True))

  def __post_init__(self):
    """Reject unknown prediction types, which would otherwise silently take the v path."""
    _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)

  @property
  def num_train_timesteps(self) -> int:
    """Number of training timesteps T (static: taken from the array shape)."""
    return self.betas.shape[0]


jax.tree_util.register_dataclass(NoiseSchedule)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Glide cosine schedule (diffusers' betas_for_alpha_bar), in float64 Python math like diffusers."""

  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def make_noise_schedule(
  num_train_timesteps: int = 1000,
  beta_start: float = 0.00085,
  beta_end: float = 0.012,
  beta_schedule: str = "scaled_linear",
  prediction_type: str = "epsilon",
) -> NoiseSchedule:
  """Build the schedule exactly as diffusers' DDPM/DDIM/Euler schedulers do (defaults: SD1.5)."""
  _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
  _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
  if num_train_timesteps < 1:
    raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 1")
  n = num_train_timesteps
  # diffusers builds betas with torch.linspace in float32; a float64 linspace rounded to float32
  # agrees with it to <= 1 ulp (torch's float32 linspace itself varies by 1 ulp across SIMD widths).
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, n).astype(np.float32)
  elif beta_schedule == "scaled_linear":
    # Latent-diffusion schedule: linear in sqrt(beta); the square is taken in float32 like diffusers.
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32) ** 2
  else:
    betas = _cosine_betas(n).astype(np.float32)
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  # torch.cumprod on CPU accumulates float32 in double and rounds each output; this is bit-exact.
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  return NoiseSchedule(jnp.asarray(betas), jnp.asarray(alphas_cumprod), prediction_type)


# ----------------------------------------------------------------------------------------------
# Per-sample coefficient lookup.


def _per_sample(values: jax.Array, ndim: int) -> jax.Array:
  """Reshape a scalar or (B,) coefficient so it broadcasts over a rank-`ndim` batch-first array."""
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape[:1] + (1,) * (ndim - 1))


def _alpha_bar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """alphas_cumprod[t] for integer t (scalar or (B,)), float32."""
  return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
  a = _alpha_bar(schedule, t)
  return a / (1.0 - a)


# ----------------------------------------------------------------------------------------------
# Training: forward noising, targets and loss weights.


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, with t of shape (B,)."""
  a = _alpha_bar(schedule, t)
  # Coefficients are computed in float32 then cast, so bf16 inputs stay bf16 (as in diffusers).
  s = _per_sample(a**0.5, x0.ndim).astype(x0.dtype)
  n = _per_sample((1.0 - a) ** 0.5, x0.ndim).astype(x0.dtype)
  return s * x0 + n * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v-prediction target: sqrt(a_t) * noise - sqrt(1 - a_t) * x0."""
  a = _alpha_bar(schedule, t)
  s = _per_sample(a**0.5, x0.ndim).astype(x0.dtype)
  n = _per_sample((1.0 - a) ** 0.5, x0.ndim).astype(x0.dtype)
  return s * noise - n * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Regression target for the denoiser: the noise (epsilon) or the velocity (v_prediction)."""
  if schedule.prediction_type == "epsilon":
    return noise
  return velocity(schedule, x0, noise, t)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0) -> jax.Array:
  """Per-sample Min-SNR-gamma loss weight (Hang et al. 2023), shape of t."""
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, gamma)
  # The MSE on epsilon equals SNR * MSE on x0, so dividing by SNR turns it into min(SNR, gamma) * x0-MSE;
  # the v-MSE equals (SNR + 1) * x0-MSE, hence the different denominator.
  if schedule.prediction_type == "epsilon":
    return clipped / ratio
  return clipped / (ratio + 1.0)


# ----------------------------------------------------------------------------------------------
# DDIM.


def _check_steps(schedule: NoiseSchedule, num_inference_steps: int, timestep_spacing: str) -> None:
  """Validate a sampler's step count and spacing."""
  _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
  if not 1 <= num_inference_steps <= schedule.num_train_timesteps:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {schedule.num_train_timesteps}]")


def _spaced_timesteps(T: int, n: int, timestep_spacing: str, steps_offset: int) -> np.ndarray:
  """Descending timesteps (float64) per Table 2 of Lin et al. 2023, as diffusers computes them."""
  if timestep_spacing == "linspace":
    return np.linspace(0, T - 1, n)[::-1].copy()
  if timestep_spacing == "leading":
    return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
  # trailing: a float stride, so the first step always starts at T - 1.
  return np.round(np.arange(T, 0, -T / n)) - 1


def ddim_timesteps(
  schedule: NoiseSchedule,
  num_inference_steps: int,
  timestep_spacing: str = "leading",
  steps_offset: int = 1,
) -> jax.Array:
  """Descending int32 DDIM timesteps, as DDIMScheduler.set_timesteps (SD1.5: leading, offset 1)."""
  _check_steps(schedule, num_inference_steps, timestep_spacing)
  t = _spaced_timesteps(schedule.num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset)
  if timestep_spacing == "linspace":
    t = t.round()  # DDIM rounds linspace timesteps to integers; Euler keeps them fractional.
  return jnp.asarray(t.astype(np.int32))


def ddim_prev_timesteps(schedule: NoiseSchedule, timesteps: jax.Array, num_inference_steps: int) -> jax.Array:
  """Timesteps each DDIM step jumps to: t - T // n, as diffusers does for every spacing (< 0 = final)."""
  return timesteps - schedule.num_train_timesteps // num_inference_steps


def predict_x0_eps(
  schedule: NoiseSchedule, model_output: jax.Array, timestep: jax.Array, sample: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(predicted x0, predicted noise) from the model output at integer timestep(s)."""
  a = _per_sample(_alpha_bar(schedule, timestep), sample.ndim)
  b = 1.0 - a
  if schedule.prediction_type == "epsilon":
    return (sample - b**0.5 * model_output) / a**0.5, model_output
  return a**0.5 * sample - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * sample


def ddim_step(
  schedule: NoiseSchedule,
  model_output: jax.Array,
  timestep: jax.Array,
  prev_timestep: jax.Array,
  sample: jax.Array,
  eta: float = 0.0,
  noise: jax.Array | None = None,
  set_alpha_to_one: bool = False,
  clip_sample: bool = False,
  clip_sample_range: float = 1.0,
) -> jax.Array:
  """One DDIM update x_t -> x_prev (DDIMScheduler.step); timesteps may be traced scalars or (B,)."""
  if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError(f"eta={eta!r} != 0 needs the `noise` argument (this function draws no randomness)")
  a_t = _per_sample(_alpha_bar(schedule, timestep), sample.ndim)
  prev_timestep = jnp.asarray(prev_timestep, jnp.int32)
  # Past the last step there is no alphas_cumprod[prev]; SD1.5 (set_alpha_to_one=False) reuses alphas_cumprod[0].
  final = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
  a_prev = jnp.where(prev_timestep >= 0, _alpha_bar(schedule, jnp.maximum(prev_timestep, 0)), final)
  a_prev = _per_sample(a_prev, sample.ndim)
  x0, eps = predict_x0_eps(schedule, model_output, timestep, sample)
  if clip_sample:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  # sigma_t of DDIM eq. (16); eta=0 is deterministic DDIM, eta=1 is DDPM-like ancestral sampling.
  variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev)
  std = eta * variance**0.5
  prev = a_prev**0.5 * x0 + (1.0 - a_prev - std**2) ** 0.5 * eps
  if noise is not None:
    prev = prev + std * noise
  return prev.astype(sample.dtype)


# ----------------------------------------------------------------------------------------------
# Euler (EulerDiscreteScheduler, deterministic s_churn = 0 path).


def euler_sigmas_and_timesteps(
  schedule: NoiseSchedule,
  num_inference_steps: int,
  timestep_spacing: str = "leading",
  steps_offset: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """(sigmas (n+1,) ending in 0, float timesteps (n,)) as EulerDiscreteScheduler.set_timesteps."""
  _check_steps(schedule, num_inference_steps, timestep_spacing)
  t = _spaced_timesteps(schedule.num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset)
  # diffusers holds timesteps in float32 and interpolates the float32 sigma table in float64.
  t = t.astype(np.float32)
  a = np.asarray(schedule.alphas_cumprod, np.float32)
  train_sigmas = ((1 - a) / a) ** np.float32(0.5)
  sigmas = np.interp(t, np.arange(len(train_sigmas)), train_sigmas)  # interpolation_type="linear"
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final_sigmas_type="zero"
  return jnp.asarray(sigmas), jnp.asarray(t)


def euler_init_noise_sigma(sigmas: jax.Array, timestep_spacing: str = "leading") -> jax.Array:
  """Std of the initial latent noise: max sigma (linspace/trailing) or sqrt(max^2 + 1) (leading)."""
  _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
  max_sigma = jnp.max(sigmas)
  # With leading spacing the first timestep is < T-1, so diffusers uses the variance-preserving std.
  if timestep_spacing in ("linspace", "trailing"):
    return max_sigma
  return (max_sigma**2 + 1) ** 0.5


def euler_scale_model_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
  """Divide by sqrt(sigma^2 + 1) so the UNet sees a unit-variance (VP) input."""
  return (sample / (sigma**2 + 1) ** 0.5).astype(sample.dtype)


def euler_step(
  model_output: jax.Array,
  sample: jax.Array,
  sigma: jax.Array,
  sigma_next: jax.Array,
  prediction_type: str = "epsilon",
) -> jax.Array:
  """One Euler ODE step from sigma to sigma_next (EulerDiscreteScheduler.step, s_churn=0)."""
  _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
  x = sample.astype(jnp.float32)  # diffusers upcasts the sample for the update
  if prediction_type == "epsilon":
    x0 = x - sigma * model_output
  else:
    # v-prediction in the sigma (VE) parameterisation: c_out = -sigma/sqrt(sigma^2+1), c_skip = 1/(sigma^2+1).
    x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
  derivative = (x - x0) / sigma
  return (x + derivative * (sigma_next - sigma)).astype(model_output.dtype)


# ----------------------------------------------------------------------------------------------
# Sampling loops (jittable; the denoiser closure handles conditioning and guidance).

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (model_input, timestep) -> model_output


def ddim_sample(
  schedule: NoiseSchedule,
  denoise_fn: DenoiseFn,
  latents: jax.Array,
  timesteps: jax.Array,
  prev_timesteps: jax.Array,
  eta: float = 0.0,
  key: jax.Array | None = None,
) -> jax.Array:
  """Run DDIM over the given timestep tables with lax.fori_loop; `key` is required when eta > 0."""
  if key is None and not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError(f"eta={eta!r} != 0 needs a PRNG `key`")

  def body(i, x):
    t = timesteps[i]
    noise = None if key is None else jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return ddim_step(schedule, denoise_fn(x, t), t, prev_timesteps[i], x, eta=eta, noise=noise)

  return jax.lax.fori_loop(0, timesteps.shape[0], body, latents)


def euler_sample(
  schedule: NoiseSchedule,
  denoise_fn: DenoiseFn,
  noise: jax.Array,
  sigmas: jax.Array,
  timesteps: jax.Array,
  init_noise_sigma: jax.Array,
) -> jax.Array:
  """Run deterministic Euler from unit-variance `noise` with lax.fori_loop."""

  def body(i, x):
    sigma = sigmas[i]
    out = denoise_fn(euler_scale_model_input(x, sigma), timesteps[i])
    return euler_step(out, x, sigma, sigmas[i + 1], schedule.prediction_type)

  return jax.lax.fori_loop(0, timesteps.shape[0], body, noise * init_noise_sigma)
