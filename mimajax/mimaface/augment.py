"""Photometric augmentations for the identity contrastive loss (MIMAFace, "Identity Modulation").

The augmented source image I_aug gives the positive ID token of eq. 2: the RGB values change
(grayscale, colour jitter, blur / sharpen / edge-enhance filters, lighting, vignetting, contrast,
noise) while the geometry, hence the identity, stays. Each sample draws its own operations and
strengths from the rng; everything is pure jnp, so `photometric_augment` is jittable and
deterministic given the rng.

Images are (B, H, W, 3), channels-last, in `config.value_range` ((0, 1) by default; use (-1, 1)
for the VAE/pipeline convention); the output has the input's range, shape and dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma, as PIL's and torchvision's grayscale.
_LUMA = jnp.array([0.299, 0.587, 0.114], jnp.float32)
# PIL's ImageFilter.SHARPEN and EDGE_ENHANCE kernels (normalised to sum 1).
_SHARPEN = jnp.array([[-2, -2, -2], [-2, 32, -2], [-2, -2, -2]], jnp.float32) / 16
_EDGE_ENHANCE = jnp.array([[-1, -1, -1], [-1, 10, -1], [-1, -1, -1]], jnp.float32) / 2
_BLUR_RADIUS = 4  # taps either side of the separable Gaussian kernel (9 taps: sigma up to ~2)


@dataclasses.dataclass(frozen=True)
class PhotometricConfig:
  """Per-sample probabilities and strength ranges of each photometric operation."""

  value_range: tuple[float, float] = (0.0, 1.0)
  p_color_jitter: float = 0.8
  brightness: float = 0.4  # factor in [1 - b, 1 + b]
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1  # rotation in [-h, h] turns of the hue circle
  p_grayscale: float = 0.2
  p_filter: float = 0.5  # one of blur / sharpen / edge enhance, uniformly
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  filter_strength: tuple[float, float] = (0.5, 1.0)  # blend of the sharpen / edge-enhance result
  p_lighting: float = 0.3
  lighting_strength: float = 0.4  # max relative brightness change at the image border
  p_vignette: float = 0.3
  vignette_strength: float = 0.5  # max darkening in the corners
  p_gamma_contrast: float = 0.3
  gamma: float = 1.6  # gamma in [1/g, g], log-uniform
  p_noise: float = 0.3
  noise_std: float = 0.05  # max std of the additive Gaussian noise, in [0, 1] units

  def __post_init__(self):
    lo, hi = self.value_range
    if not lo < hi:
      raise ValueError(f"PhotometricConfig.value_range {self.value_range} must be (low, high) with low < high")


def _per_sample(x: jax.Array) -> jax.Array:
  return x[:, None, None, None]


def _uniform(rng, b, lo, hi):
  return jax.random.uniform(rng, (b,), jnp.float32, lo, hi)


def _gray(x: jax.Array) -> jax.Array:
  return jnp.sum(x * _LUMA, axis=-1, keepdims=True)


def _blend(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  """a + t (b - a) with per-sample t."""
  return a + _per_sample(t) * (b - a)


def _rotate_hue(x: jax.Array, turns: jax.Array) -> jax.Array:
  """Hue rotation as a rotation of the chroma plane in YIQ (linear, so cheap and differentiable)."""
  to_yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], jnp.float32)
  from_yiq = jnp.linalg.inv(to_yiq)
  angle = 2 * jnp.pi * turns
  c, s = jnp.cos(angle), jnp.sin(angle)
  one, zero = jnp.ones_like(c), jnp.zeros_like(c)
  rot = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, c, -s], -1), jnp.stack([zero, s, c], -1)], -2)
  m = jnp.einsum("ij,bjk,kl->bil", from_yiq, rot, to_yiq)  # (B, 3, 3)
  return jnp.einsum("bhwc,bdc->bhwd", x, m)


def color_jitter(rng, x, cfg: PhotometricConfig):
  """Brightness, contrast, saturation and hue, in that fixed order, each with a per-sample factor."""
  b = x.shape[0]
  kb, kc, ks, kh = jax.random.split(rng, 4)
  x = x * _per_sample(_uniform(kb, b, 1 - cfg.brightness, 1 + cfg.brightness))
  mean = _gray(x).mean(axis=(1, 2, 3))
  x = _blend(_per_sample(mean), x, _uniform(kc, b, 1 - cfg.contrast, 1 + cfg.contrast))
  x = _blend(_gray(x), x, _uniform(ks, b, 1 - cfg.saturation, 1 + cfg.saturation))
  return _rotate_hue(x, _uniform(kh, b, -cfg.hue, cfg.hue))


def _shift_sum(x: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
  """Per-sample 1D correlation along `axis` (1 or 2) with (B, taps) weights, edge-padded."""
  r = weights.shape[1] // 2
  pad = [(0, 0)] * 4
  pad[axis] = (r, r)
  xp = jnp.pad(x, pad, mode="edge")
  n = x.shape[axis]
  out = 0.0
  for t in range(2 * r + 1):
    out = out + _per_sample(weights[:, t]) * jax.lax.slice_in_dim(xp, t, t + n, axis=axis)
  return out


def gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
  """Separable Gaussian blur with a per-sample sigma (B,)."""
  taps = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(taps[None, :] / sigma[:, None]))
  w = w / w.sum(axis=1, keepdims=True)
  return _shift_sum(_shift_sum(x, w, 1), w, 2)


def filter3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A fixed 3x3 filter on every channel, edge-padded."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  return sum(kernel[i, j] * xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3))


def _unit_grid(h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """Pixel-centre coordinates in [-1, 1]: (H, 1) rows and (1, W) columns."""
  v = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h * 2 - 1
  u = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w * 2 - 1
  return v[:, None], u[None, :]


def lighting(x: jax.Array, angle: jax.Array, strength: jax.Array) -> jax.Array:
  """Light from direction `angle`: brightness scaled by 1 + strength * (projection on the direction)."""
  v, u = _unit_grid(*x.shape[1:3])
  proj = jnp.cos(angle)[:, None, None] * u + jnp.sin(angle)[:, None, None] * v  # (B, H, W) in ~[-1.4, 1.4]
  return x * (1 + strength[:, None, None, None] * proj[..., None] / jnp.sqrt(2.0))


def vignette(x: jax.Array, strength: jax.Array) -> jax.Array:
  """Darkens towards the corners: scale 1 - strength * r^2 / 2 (r = 1.41 in the corners)."""
  v, u = _unit_grid(*x.shape[1:3])
  r2 = (jnp.square(u) + jnp.square(v))[None, :, :, None] / 2
  return x * (1 - _per_sample(strength) * r2)


def photometric_augment(
  rng: jax.Array, images: jax.Array, config: PhotometricConfig = PhotometricConfig()
) -> jax.Array:
  """(B, H, W, 3) images in config.value_range -> augmented images, same range, shape and dtype."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"photometric_augment expects (B, H, W, 3) images; got shape {images.shape}")
  cfg = config
  lo, hi = cfg.value_range
  b = images.shape[0]
  x = (images.astype(jnp.float32) - lo) / (hi - lo)  # ops work in [0, 1]
  keys = iter(jax.random.split(rng, 24))  # more than the draws below

  def maybe(p, y, x):
    return jnp.where(_per_sample(jax.random.bernoulli(next(keys), p, (b,))), y, x)

  x = maybe(cfg.p_color_jitter, jnp.clip(color_jitter(next(keys), x, cfg), 0, 1), x)
  x = maybe(cfg.p_grayscale, jnp.broadcast_to(_gray(x), x.shape), x)

  # One filter per sample: 0 blur, 1 sharpen, 2 edge enhance.
  which = jax.random.randint(next(keys), (b,), 0, 3)
  strength = _uniform(next(keys), b, *cfg.filter_strength)
  blurred = gaussian_blur(x, _uniform(next(keys), b, *cfg.blur_sigma))
  sharpened = _blend(x, filter3x3(x, _SHARPEN), strength)
  edged = _blend(x, filter3x3(x, _EDGE_ENHANCE), strength)
  filtered = jnp.select([_per_sample(which == 0), _per_sample(which == 1)], [blurred, sharpened], edged)
  x = maybe(cfg.p_filter, jnp.clip(filtered, 0, 1), x)

  angle = _uniform(next(keys), b, 0, 2 * jnp.pi)
  x = maybe(cfg.p_lighting, lighting(x, angle, _uniform(next(keys), b, 0, cfg.lighting_strength)), x)
  x = maybe(cfg.p_vignette, vignette(x, _uniform(next(keys), b, 0, cfg.vignette_strength)), x)
  x = jnp.clip(x, 0, 1)
  log_g = jnp.log(cfg.gamma)
  gamma = jnp.exp(_uniform(next(keys), b, -log_g, log_g))
  x = maybe(cfg.p_gamma_contrast, jnp.power(jnp.maximum(x, 1e-6), _per_sample(gamma)), x)
  noise = jax.random.normal(next(keys), x.shape) * _per_sample(_uniform(next(keys), b, 0, cfg.noise_std))
  x = maybe(cfg.p_noise, x + noise, x)
  x = jnp.clip(x, 0, 1)
  return (x * (hi - lo) + lo).astype(images.dtype)
