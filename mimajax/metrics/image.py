"""Full-reference image metrics on batches of channels-last images: PSNR and SSIM, jitted.

Both take float arrays [N, H, W, C] with values in [0, data_range] and return one value per image, [N].

PSNR = 10 log10(data_range^2 / MSE), the MSE over all pixels and channels of an image (skimage's
`peak_signal_noise_ratio`). Identical images have MSE 0 and PSNR +inf; that is kept (it is the true value), so
callers that average over frames should cap it or report it separately.

SSIM (Wang et al. 2004), as `skimage.metrics.structural_similarity(x, y, channel_axis=-1, data_range=data_range,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` computes it:
  - per channel, local statistics come from a separable Gaussian window, sigma 1.5, 11 taps (radius
    int(3.5 * 1.5 + 0.5) = 5), weights exp(-t^2 / (2 sigma^2)) normalised to sum 1:
    mu_x = G*x, mu_y = G*y, var_x = G*(x^2) - mu_x^2, var_y likewise, cov = G*(x y) - mu_x mu_y
    (population moments: use_sample_covariance=False);
  - S = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
    C1 = (0.01 data_range)^2, C2 = (0.03 data_range)^2;
  - the SSIM of a channel is the mean of S after cropping (11 - 1) // 2 = 5 pixels from every border, then the
    channels are averaged (all channels have the same area, so that is one mean over the cropped maps).
skimage filters with mode='reflect', but the 5-pixel crop removes exactly the pixels whose window reaches the
padding, so the kept maps are a 'VALID' convolution: no padding is done here at all. Images must be at least 11
pixels on each side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_WIN = 11  # 2 * int(3.5 * sigma + 0.5) + 1, skimage's truncate=3.5 with sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def gaussian_taps(sigma: float = SSIM_SIGMA, win: int = SSIM_WIN) -> np.ndarray:
  """The normalised 1-D Gaussian window (scipy.ndimage's kernel for this sigma and radius)."""
  t = np.arange(win, dtype=np.float64) - (win - 1) / 2
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _check(x, y):
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"expected two [N, H, W, C] arrays of one shape, got {x.shape} and {y.shape}")


@jax.jit
def _psnr(x, y, data_range):
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / mse)


def psnr(x, y, data_range: float = 1.0) -> jax.Array:
  """PSNR in dB per image, [N]; +inf for identical images (see the module docstring)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _check(x, y)
  return _psnr(x, y, jnp.float32(data_range))


def _blur_valid(maps: jax.Array) -> jax.Array:
  """Separable Gaussian filter of [B, H, W, 1] maps, 'VALID' region only: [B, H - 10, W - 10, 1]."""
  taps = jnp.asarray(gaussian_taps())
  dn = ("NHWC", "HWIO", "NHWC")
  # HIGHEST: accelerators would otherwise run fp32 convolutions at reduced (TF32 / bf16) precision.
  conv = lambda v, k: jax.lax.conv_general_dilated(
    v, k, (1, 1), "VALID", dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST
  )
  maps = conv(maps, taps.reshape(SSIM_WIN, 1, 1, 1))
  return conv(maps, taps.reshape(1, SSIM_WIN, 1, 1))


@jax.jit
def _ssim(x, y, data_range):
  n, h, w, c = x.shape
  # Channels become batch entries so one single-channel filter serves all of them.
  to_maps = lambda v: jnp.moveaxis(v, -1, 1).reshape(n * c, h, w, 1)
  x, y = to_maps(x), to_maps(y)
  # One filter call for all five moment maps.
  mu_x, mu_y, xx, yy, xy = jnp.split(_blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=0)), 5)
  var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s.reshape(n, -1), axis=1)


def ssim(x, y, data_range: float = 1.0) -> jax.Array:
  """Mean SSIM per image, [N] (Gaussian window; the definition is in the module docstring)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _check(x, y)
  if min(x.shape[1:3]) < SSIM_WIN:
    raise ValueError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {x.shape[1:3]}")
  return _ssim(x, y, jnp.float32(data_range))
