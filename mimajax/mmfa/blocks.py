"""face-vid2vid's building blocks (its modules/util.py), channels-last, for MMFA's networks (appendix A.1).

MMFA builds on face-vid2vid (Wang et al. 2021b); its networks are face-vid2vid's, so the blocks here follow
zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis `modules/util.py` layer for layer, with its
attribute names (conv1, norm1, down_blocks, ...) so that a released checkpoint maps onto them key for key. What
changes is the layout only: images (N, H, W, C), feature volumes (N, D, H, W, C), conv kernels (*k, in, out).

Numerics follow PyTorch where face-vid2vid relies on them: BatchNorm (batch statistics and an unbiased running
variance in training, running averages in eval), F.grid_sample (bilinear, zeros padding, align_corners=False),
F.interpolate (nearest; linear with align_corners=False), AvgPool, and the default Conv / Linear initialisation
(kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)) for kernel and bias), so a network trained from scratch starts
where face-vid2vid's does.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONV2D_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
CONV3D_AXES = ("conv_depth", "conv_height", "conv_width", "conv_in", "conv_out")
LINEAR_AXES = ("embed", "mlp")


def _uniform(key: jax.Array, size: int, bound: float, dtype=jnp.float32) -> jax.Array:
  """U(-bound, bound) of `size` values, drawn as the first `size` of a power-of-two-long draw: eagerly (a network
  built outside jit), threefry compiles once per distinct length, which dominates construction time on CPU; the
  buckets cut the distinct lengths of a network from one per layer shape to about a dozen."""
  bucket = max(64, 1 << (size - 1).bit_length())
  return jax.random.uniform(key, (bucket,), dtype, -bound, bound)[:size]


def torch_kernel_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """torch's default Conv*d / Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), for a kernel
  (*k, in, out) (fan_in = prod(k) * in)."""
  fan_in = int(np.prod(shape[:-1]))
  return _uniform(key, int(np.prod(shape)), 1.0 / np.sqrt(fan_in), dtype).reshape(shape)


def torch_bias_init(key: jax.Array, fan_in: int, size: int) -> jax.Array:
  """torch's default bias init: U(+-1/sqrt(fan_in)) with the kernel's fan-in."""
  return _uniform(key, size, 1.0 / np.sqrt(fan_in))


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (value,) * n if isinstance(value, int) else tuple(value)


# ----------------------------------------------------------------------------- layers


class _Conv(nnx.Module):
  """A torch Conv{2,3}d channels-last: kernel (*k, in, out), torch's symmetric zero padding and default init."""

  spatial_dims = 2
  axes = CONV2D_AXES

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    use_bias: bool = True,
    rngs: nnx.Rngs,
    kernel_init=torch_kernel_init,
  ):
    n = self.spatial_dims
    self.kernel_size, self.stride, self.padding = _tuple(kernel_size, n), _tuple(stride, n), _tuple(padding, n)
    shape = (*self.kernel_size, in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32), out_sharding=self.axes)
    fan_in = in_features * int(np.prod(self.kernel_size))
    self.bias = (
      nnx.Param(torch_bias_init(rngs.params(), fan_in, out_features), out_sharding=("conv_out",)) if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    pointwise = all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)
    if pointwise and not any(self.padding):
      y = x @ kernel.reshape(kernel.shape[-2:])  # a 1x1 conv is a matmul over channels
    else:
      spec = ("NHWC", "HWIO", "NHWC") if self.spatial_dims == 2 else ("NDHWC", "DHWIO", "NDHWC")
      y = jax.lax.conv_general_dilated(
        x, kernel, self.stride, [(p, p) for p in self.padding], dimension_numbers=spec
      )  # fmt: skip
    return y if self.bias is None else y + self.bias[...]


class Conv2D(_Conv):
  """torch nn.Conv2d on (N, H, W, C); kernel (kh, kw, in, out)."""


class Conv3D(_Conv):
  """torch nn.Conv3d on (N, D, H, W, C); kernel (kd, kh, kw, in, out)."""

  spatial_dims = 3
  axes = CONV3D_AXES


class Linear(nnx.Module):
  """torch nn.Linear: kernel (in, out) with logical axes ("embed", "mlp"), torch's default init unless given."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, zero_init: bool = False):
    if zero_init:
      kernel = jnp.zeros((in_features, out_features), jnp.float32)
      bias = jnp.zeros((out_features,), jnp.float32)
    else:
      kernel = torch_kernel_init(rngs.params(), (in_features, out_features), jnp.float32)
      bias = torch_bias_init(rngs.params(), in_features, out_features)
    self.kernel = nnx.Param(kernel, out_sharding=LINEAR_AXES)
    self.bias = nnx.Param(bias, out_sharding=(LINEAR_AXES[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...] + self.bias[...]


class BatchNorm(nnx.Module):
  """torch BatchNorm{2,3}d (affine) over the last axis, with nnx.BatchNorm's names and mode flag.

  Training (`use_running_average=False`, what `Module.train()` sets): normalise with the batch's biased variance and
  update the running averages with the UNBIASED variance, as torch does (nnx.BatchNorm stores the biased one).
  Eval (`Module.eval()`): the running averages. `momentum` is nnx's (1 - torch's 0.1); eps torch's 1e-5. Under jit
  over a sharded batch the statistics are the global batch's, which is what face-vid2vid's SynchronizedBatchNorm
  computes across GPUs. Leaves: scale/bias (torch weight/bias), mean/var (torch running_mean/running_var).
  """

  def __init__(
    self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5, use_running_average: bool = False
  ):
    self.momentum, self.epsilon, self.use_running_average = momentum, epsilon, use_running_average
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running = self.use_running_average if use_running_average is None else use_running_average
    if use_running:
      mean, var = self.mean[...], self.var[...]
    else:
      count = x.size // x.shape[-1]
      if count < 2:
        raise ValueError(f"BatchNorm in training needs more than 1 value per channel (got input {x.shape}), as torch")
      # Means of row means (equal rows: the same value) keep fp32 sums short over large volumes.
      axes = tuple(range(x.ndim - 2))
      mean = x.mean(axis=-2).mean(axis=axes)
      var = jnp.square(x - mean).mean(axis=-2).mean(axis=axes)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var) * (count / (count - 1))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


# ----------------------------------------------------------------------------- resampling


def avg_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """torch AvgPool{2,3}d(kernel_size=window) on the spatial axes of (N, *spatial, C): stride = window, no padding."""
  dims = (1, *window, 1)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, dims, "VALID") / float(np.prod(window))


def upsample_nearest(x: jax.Array, factors: Sequence[int]) -> jax.Array:
  """torch F.interpolate(scale_factor=factors) (mode 'nearest') for integer factors: out[i] = in[i // f]."""
  for axis, f in enumerate(factors, start=1):
    if f != 1:
      x = jnp.repeat(x, f, axis=axis)
  return x


def interpolate_linear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """torch F.interpolate(size=size, mode='bilinear' / 'trilinear', align_corners=False) on (N, *spatial, C).

  Separable: on each axis the source coordinate is (i + 0.5) * in / out - 0.5, clamped at 0 (torch's
  area_pixel_compute_source_index), between its floor and the next sample (the last one repeated at the edge).
  """
  for axis, out_size in enumerate(size, start=1):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue
    src = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (in_size / out_size) - 0.5
    src = jnp.maximum(src, 0.0)
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    hi = jnp.minimum(lo + 1, in_size - 1)
    frac = (src - lo).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    x = jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac
  return x


def make_coordinate_grid_2d(spatial_size: Sequence[int]) -> jax.Array:
  """face-vid2vid's make_coordinate_grid_2d: (h, w, 2) of (x, y) in [-1, 1], x along the width."""
  h, w = spatial_size
  x = 2 * (jnp.arange(w, dtype=jnp.float32) / (w - 1)) - 1
  y = 2 * (jnp.arange(h, dtype=jnp.float32) / (h - 1)) - 1
  return jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)


def make_coordinate_grid_3d(spatial_size: Sequence[int]) -> jax.Array:
  """face-vid2vid's make_coordinate_grid: (d, h, w, 3) of (x, y, z) in [-1, 1], ordered as grid_sample reads them."""
  d, h, w = spatial_size
  x = 2 * (jnp.arange(w, dtype=jnp.float32) / (w - 1)) - 1
  y = 2 * (jnp.arange(h, dtype=jnp.float32) / (h - 1)) - 1
  z = 2 * (jnp.arange(d, dtype=jnp.float32) / (d - 1)) - 1
  return jnp.stack(jnp.broadcast_arrays(x[None, None, :], y[None, :, None], z[:, None, None]), axis=-1)


make_coordinate_grid = make_coordinate_grid_3d  # face-vid2vid's name for the 3-D grid


def _grid_sample(inp: jax.Array, grid: jax.Array) -> jax.Array:
  """F.grid_sample(bilinear, zeros, align_corners=False) for (N, *spatial, C) and a grid (N, *out, rank)."""
  n, *spatial, c = inp.shape
  rank = len(spatial)
  if grid.shape[0] != n or grid.shape[-1] != rank:
    raise ValueError(f"grid_sample: grid {grid.shape} does not fit input {inp.shape} (want (N, ..., {rank}))")
  out_shape = grid.shape[1:-1]
  g = grid.reshape(n, -1, rank)
  sizes = spatial[::-1]  # grid channel k (x, y, z) indexes spatial axis rank-1-k (W, H, D)
  strides = [int(np.prod(sizes[:k])) for k in range(rank)]  # flat-index stride of x, y, z
  # Unnormalise as torch (align_corners=False): pixel centres at -1 + (2i + 1) / size.
  coords = [((g[..., k] + 1) * sizes[k] - 1) / 2 for k in range(rank)]
  lows = [jnp.floor(u) for u in coords]
  flat = inp.reshape(n, -1, c)
  gather = jax.vmap(lambda values, index: values[index])
  out = jnp.zeros((n, g.shape[1], c), inp.dtype)
  for corner in itertools.product((0, 1), repeat=rank):
    weight, index, valid = 1.0, 0, True
    for k in range(rank):
      i = lows[k] + corner[k]
      # torch's corner weights: (x - x_low) towards the high corner, (x_low + 1 - x) towards the low one.
      weight = weight * ((coords[k] - lows[k]) if corner[k] else (lows[k] + 1 - coords[k]))
      valid = valid & (i >= 0) & (i <= sizes[k] - 1)
      index = index + jnp.clip(i, 0, sizes[k] - 1).astype(jnp.int32) * strides[k]
    weight = jnp.where(valid, weight, 0.0)  # zeros padding: an outside corner contributes nothing
    out = out + weight[..., None].astype(inp.dtype) * gather(flat, index)
  return out.reshape(n, *out_shape, c)


def grid_sample_2d(image: jax.Array, grid: jax.Array) -> jax.Array:
  """torch F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False), channels-last.

  image (N, H, W, C), grid (N, h, w, 2) of (x, y) in [-1, 1] -> (N, h, w, C). Differentiable in both.
  """
  return _grid_sample(image, grid)


def grid_sample_3d(volume: jax.Array, grid: jax.Array) -> jax.Array:
  """torch F.grid_sample on a 5-D input (trilinear; zeros padding; align_corners=False), channels-last.

  volume (N, D, H, W, C), grid (N, d, h, w, 3) of (x, y, z) in [-1, 1] -> (N, d, h, w, C). The grid's spatial
  shape is free (face-vid2vid's deformed features sample K + 1 grids from one volume: pass them as (N, (K+1) d, h,
  w, 3) instead of repeating the volume). Differentiable in both.
  """
  return _grid_sample(volume, grid)


def kp2gaussian(kp: jax.Array, spatial_size: Sequence[int], kp_variance: float) -> jax.Array:
  """face-vid2vid's kp2gaussian: keypoints (N, K, 3) -> Gaussians exp(-|p - kp|^2 / (2 var)), (N, d, h, w, K)."""
  grid = make_coordinate_grid_3d(spatial_size)  # (d, h, w, 3)
  diff = grid[None, :, :, :, None, :] - kp[:, None, None, None, :, :]
  return jnp.exp(-0.5 * jnp.square(diff).sum(-1) / kp_variance)


@functools.lru_cache(maxsize=None)
def _gaussian_kernel(scale: float) -> np.ndarray:
  """AntiAliasInterpolation2d's kernel (k, k), computed in float32 as face-vid2vid does."""
  sigma = (1 / scale - 1) / 2
  size = 2 * round(sigma * 4) + 1
  mgrid = np.arange(size, dtype=np.float32)
  g = np.exp(-((mgrid - (size - 1) / 2) ** 2) / np.float32(2 * sigma**2)).astype(np.float32)
  kernel = g[:, None] * g[None, :]
  return (kernel / kernel.sum()).astype(np.float32)


class AntiAliasInterpolation2d(nnx.Module):
  """face-vid2vid's band-limited downsampling: a Gaussian blur (sigma = (1/scale - 1) / 2), then every
  int(1/scale)-th pixel. No parameters (torch keeps the kernel as a buffer `weight`; here it is recomputed)."""

  def __init__(self, channels: int, scale: float):
    self.channels, self.scale = channels, float(scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.scale == 1.0:
      return x
    kernel = _gaussian_kernel(self.scale)
    pad = kernel.shape[0] // 2  # odd kernel: torch pads (ka, kb) with kb == ka
    step = int(1 / self.scale)
    weight = jnp.broadcast_to(jnp.asarray(kernel)[:, :, None, None], (*kernel.shape, 1, x.shape[-1]))
    return jax.lax.conv_general_dilated(
      x, weight, (step, step), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
    )  # fmt: skip


# ----------------------------------------------------------------------------- blocks


class ResBottleneck(nnx.Module):
  """face-vid2vid's ResBottleneck (HEEstimator): 1x1 -> 3x3 (stride) -> 1x1 at in/4 channels, BN + ReLU, and a
  1x1 strided skip (conv + BN) when stride != 1."""

  def __init__(self, in_features: int, stride: int, *, rngs: nnx.Rngs):
    mid = in_features // 4
    self.conv1 = Conv2D(in_features, mid, 1, rngs=rngs)
    self.conv2 = Conv2D(mid, mid, 3, padding=1, stride=stride, rngs=rngs)
    self.conv3 = Conv2D(mid, in_features, 1, rngs=rngs)
    self.norm1, self.norm2, self.norm3 = BatchNorm(mid), BatchNorm(mid), BatchNorm(in_features)
    self.stride = stride
    if stride != 1:
      self.skip = Conv2D(in_features, in_features, 1, stride=stride, rngs=rngs)
      self.norm4 = BatchNorm(in_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.norm1(self.conv1(x)))
    out = jax.nn.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    if self.stride != 1:
      x = self.norm4(self.skip(x))
    return jax.nn.relu(out + x)


class _ResBlock(nnx.Module):
  conv_class = Conv2D

  def __init__(self, in_features: int, kernel_size: int = 3, padding: int = 1, *, rngs: nnx.Rngs):
    self.conv1 = self.conv_class(in_features, in_features, kernel_size, padding=padding, rngs=rngs)
    self.conv2 = self.conv_class(in_features, in_features, kernel_size, padding=padding, rngs=rngs)
    self.norm1, self.norm2 = BatchNorm(in_features), BatchNorm(in_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.conv1(jax.nn.relu(self.norm1(x)))
    out = self.conv2(jax.nn.relu(self.norm2(out)))
    return out + x


class ResBlock2d(_ResBlock):
  """face-vid2vid's pre-activation residual block (BN -> ReLU -> conv, twice), resolution preserved."""


class ResBlock3d(_ResBlock):
  """ResBlock2d on feature volumes (N, D, H, W, C)."""

  conv_class = Conv3D


class _ConvNormBlock(nnx.Module):
  conv_class = Conv2D

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1, *, rngs: nnx.Rngs):
    self.conv = self.conv_class(in_features, out_features, kernel_size, padding=padding, rngs=rngs)
    self.norm = BatchNorm(out_features)


class UpBlock2d(_ConvNormBlock):
  """face-vid2vid's UpBlock2d: nearest x2 upsampling -> conv -> BN -> ReLU."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(upsample_nearest(x, (2, 2)))))


class UpBlock3d(_ConvNormBlock):
  """face-vid2vid's UpBlock3d: nearest (1, 2, 2) upsampling (the depth is kept) -> conv -> BN -> ReLU."""

  conv_class = Conv3D

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(upsample_nearest(x, (1, 2, 2)))))


class DownBlock2d(_ConvNormBlock):
  """face-vid2vid's DownBlock2d: conv -> BN -> ReLU -> 2x2 average pooling."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return avg_pool(jax.nn.relu(self.norm(self.conv(x))), (2, 2))


class DownBlock3d(_ConvNormBlock):
  """face-vid2vid's DownBlock3d: conv -> BN -> ReLU -> (1, 2, 2) average pooling (the depth is kept)."""

  conv_class = Conv3D

  def __call__(self, x: jax.Array) -> jax.Array:
    return avg_pool(jax.nn.relu(self.norm(self.conv(x))), (1, 2, 2))


class SameBlock2d(nnx.Module):
  """face-vid2vid's SameBlock2d: conv -> BN -> ReLU (or LeakyReLU(0.01), torch's default slope, with lrelu)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    padding: int = 1,
    *,
    lrelu: bool = False,
    rngs: nnx.Rngs,
  ):
    self.conv = Conv2D(in_features, out_features, kernel_size, padding=padding, rngs=rngs)
    self.norm = BatchNorm(out_features)
    self.lrelu = lrelu

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.norm(self.conv(x))
    return jax.nn.leaky_relu(out, 0.01) if self.lrelu else jax.nn.relu(out)


def _width(block_expansion: int, level: int, max_features: int) -> int:
  return min(max_features, block_expansion * (2**level))


class Encoder(nnx.Module):
  """face-vid2vid's 3-D hourglass encoder: DownBlock3d's doubling the width; returns every level, input first."""

  def __init__(
    self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256, *, rngs: nnx.Rngs
  ):
    widths = [in_features] + [_width(block_expansion, i + 1, max_features) for i in range(num_blocks)]
    self.down_blocks = nnx.List([DownBlock3d(widths[i], widths[i + 1], rngs=rngs) for i in range(num_blocks)])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outs = [x]
    for block in self.down_blocks:
      outs.append(block(outs[-1]))
    return outs


class Decoder(nnx.Module):
  """face-vid2vid's 3-D hourglass decoder: UpBlock3d's, each followed by concat([up, skip]); then conv -> BN -> ReLU
  at block_expansion + in_features channels (the input itself is the last skip)."""

  def __init__(
    self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256, *, rngs: nnx.Rngs
  ):
    blocks = []
    for i in reversed(range(num_blocks)):
      in_filters = (1 if i == num_blocks - 1 else 2) * _width(block_expansion, i + 1, max_features)
      blocks.append(UpBlock3d(in_filters, _width(block_expansion, i, max_features), rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.out_filters = block_expansion + in_features
    self.conv = Conv3D(self.out_filters, self.out_filters, 3, padding=1, rngs=rngs)
    self.norm = BatchNorm(self.out_filters)

  def __call__(self, levels: list[jax.Array]) -> jax.Array:
    levels = list(levels)
    out = levels.pop()
    for block in self.up_blocks:
      out = jnp.concatenate([block(out), levels.pop()], axis=-1)
    return jax.nn.relu(self.norm(self.conv(out)))


class Hourglass(nnx.Module):
  """face-vid2vid's 3-D U-Net (dense motion network): encoder + decoder; out_filters = block_expansion + in."""

  def __init__(
    self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256, *, rngs: nnx.Rngs
  ):
    self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features, rngs=rngs)
    self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features, rngs=rngs)
    self.out_filters = self.decoder.out_filters

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decoder(self.encoder(x))


class KPHourglass(nnx.Module):
  """face-vid2vid's keypoint hourglass: 2-D DownBlock2d's, a 1x1 conv to reshape_features channels, reshaped to a
  volume of reshape_depth slices (torch's view(bs, c // D, D, h, w): channel = c' * D + depth), then UpBlock3d's.
  (torch's Sequential names down0.. / up0.. are list indices here.)"""

  def __init__(
    self,
    block_expansion: int,
    in_features: int,
    reshape_features: int,
    reshape_depth: int,
    num_blocks: int = 3,
    max_features: int = 256,
    *,
    rngs: nnx.Rngs,
  ):
    widths = [in_features] + [_width(block_expansion, i + 1, max_features) for i in range(num_blocks)]
    self.down_blocks = nnx.List([DownBlock2d(widths[i], widths[i + 1], rngs=rngs) for i in range(num_blocks)])
    in_filters = _width(block_expansion, num_blocks, max_features)
    if reshape_features != in_filters * reshape_depth:
      raise ValueError(
        f"KPHourglass: reshape_features={reshape_features} must be reshape_depth ({reshape_depth}) x the first up "
        f"block's width min(max_features, block_expansion * 2^num_blocks) = {in_filters}"
      )
    self.conv = Conv2D(in_filters, reshape_features, 1, rngs=rngs)
    widths = [_width(block_expansion, num_blocks - i, max_features) for i in range(num_blocks + 1)]
    self.up_blocks = nnx.List([UpBlock3d(widths[i], widths[i + 1], rngs=rngs) for i in range(num_blocks)])
    self.reshape_depth = reshape_depth
    self.out_filters = _width(block_expansion, 0, max_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.down_blocks:
      x = block(x)
    x = self.conv(x)
    x = channels_to_volume(x, self.reshape_depth)
    for block in self.up_blocks:
      x = block(x)
    return x


def channels_to_volume(x: jax.Array, depth: int) -> jax.Array:
  """(N, H, W, C * depth) -> (N, depth, H, W, C): torch's view(bs, C, depth, h, w) of an NCHW map."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, c // depth, depth).transpose(0, 4, 1, 2, 3)


def volume_to_channels(x: jax.Array) -> jax.Array:
  """(N, D, H, W, C) -> (N, H, W, C * D): torch's view(bs, c * d, h, w) of an NCDHW volume (channel = c * D + d)."""
  n, d, h, w, c = x.shape
  return x.transpose(0, 2, 3, 4, 1).reshape(n, h, w, c * d)
