"""Primitive layers shared by every model: linear, conv, group norm, layer norm, sinusoidal embeddings.

All tensors are channels-last (NHWC / NTC). Parameters are fp32 and carry logical axis
names (see `configs/common.py` for the rules that map them onto the mesh); compute runs
in `dtype` (fp32 or bf16) with normalisation statistics always in fp32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

# Logical axis names of parameters. The config's rules map them to mesh axes.
CONV_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def _partitioned(init, axes):
  return nnx.with_partitioning(init, axes)


def linear(
  in_features: int,
  out_features: int,
  *,
  axes: tuple[str | None, str | None] = ("embed", "mlp"),
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  rngs: nnx.Rngs,
  kernel_init=nnx.initializers.lecun_normal(),
) -> nnx.Linear:
  """A Linear whose kernel (in, out) and bias carry logical axis names."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_partitioned(kernel_init, axes),
    bias_init=_partitioned(nnx.initializers.zeros_init(), (axes[1],)),
    rngs=rngs,
  )


# On CPU, XLA's convolution kernels are slow for small feature maps with many channels (the SD
# U-Net's 1280-channel 8x8 blocks: 4x slower than a GEMM in the backward pass). There a conv is
# computed as one matrix product over extracted patches (im2col); elsewhere lax.conv is used.
IM2COL_MAX_PIXELS = 1024


def _use_im2col(impl: str, out_pixels: int) -> bool:
  if impl == "auto":
    return jax.default_backend() == "cpu" and out_pixels <= IM2COL_MAX_PIXELS
  return impl == "im2col"


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  """NHWC x HWIO conv as patches @ kernel; same result as lax.conv_general_dilated."""
  kh, kw, cin, cout = kernel.shape
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  b, hp, wp, _ = x.shape
  oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  patches = [
    x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :]
    for i in range(kh)
    for j in range(kw)
  ]
  cols = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  return (cols.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)).reshape(b, oh, ow, cout)


class Conv2D(nnx.Module):
  """2D conv on NHWC with an HWIO kernel and PyTorch-style explicit padding."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] | None = None,
    impl: str = "auto",
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
    kernel_init=nnx.initializers.lecun_normal(),
  ):
    if impl not in ("auto", "lax", "im2col"):
      raise ValueError(f"conv impl {impl!r} unknown; expected 'auto', 'lax' or 'im2col'")
    if padding is None:
      padding = (kernel_size - 1) // 2
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    self.padding = tuple(tuple(p) for p in padding)
    self.stride, self.impl, self.dtype = stride, impl, dtype
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32), out_sharding=CONV_KERNEL_AXES)
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32), out_sharding=("conv_out",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    kh = kernel.shape[0]
    oh = (x.shape[1] + sum(self.padding[0]) - kh) // self.stride + 1
    ow = (x.shape[2] + sum(self.padding[1]) - kh) // self.stride + 1
    if kh == 1 and self.stride == 1 and self.padding == ((0, 0), (0, 0)):
      y = x @ kernel[0, 0]  # a 1x1 conv is a matmul over channels
    elif _use_im2col(self.impl, x.shape[0] * oh * ow):
      y = im2col_conv(x, kernel, self.stride, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    return y + self.bias[...].astype(self.dtype)


def conv(
  in_features: int,
  out_features: int,
  kernel_size: int = 3,
  *,
  stride: int = 1,
  padding: int | Sequence[tuple[int, int]] | None = None,
  dtype: Dtype = jnp.float32,
  rngs: nnx.Rngs,
  kernel_init=nnx.initializers.lecun_normal(),
) -> Conv2D:
  """A 2D conv (kernel HWIO) with PyTorch-style symmetric padding (k-1)//2 by default."""
  return Conv2D(
    in_features,
    out_features,
    kernel_size,
    stride=stride,
    padding=padding,
    dtype=dtype,
    rngs=rngs,
    kernel_init=kernel_init,
  )


class GroupNorm(nnx.Module):
  """GroupNorm over channels-last inputs of any rank, statistics in fp32 (as torch.nn.GroupNorm)."""

  def __init__(self, num_groups: int, num_channels: int, *, epsilon: float = 1e-5, dtype: Dtype = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    c = shape[-1]
    xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
    # Two-stage means (channels of a group, then positions): one fp32 sum over a 256 px map's 262k values
    # drifts by ~1e-4 with the batch size on CPU; summing short rows first keeps it at ~1e-6.
    mean = xg.mean(axis=3, keepdims=True).mean(axis=1, keepdims=True)
    var = jnp.square(xg - mean).mean(axis=3, keepdims=True).mean(axis=1, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = xg.reshape(shape) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in fp32 (as torch.nn.LayerNorm)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Dtype = jnp.float32):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def activation(name: str):
  """The activation functions diffusers' configs name (`act_fn`)."""
  table = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
  return table[name]


def sinusoidal_timestep_embedding(
  timesteps: jax.Array,
  dim: int,
  *,
  flip_sin_to_cos: bool = True,
  downscale_freq_shift: float = 0.0,
  max_period: float = 10000.0,
) -> jax.Array:
  """DDPM sinusoidal embedding of (batch,) timesteps -> (batch, dim), fp32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """MLP on the sinusoidal timestep features: linear_1 -> act -> linear_2 (-> post act)."""

  def __init__(
    self,
    in_features: int,
    time_embed_dim: int,
    *,
    act_fn: str = "silu",
    post_act_fn: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.linear_1 = linear(in_features, time_embed_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.linear_2 = linear(time_embed_dim, time_embed_dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.act = activation(act_fn)
    self.post_act = activation(post_act_fn) if post_act_fn else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_2(self.act(self.linear_1(x)))
    return self.post_act(x) if self.post_act else x


# ----------------------------------------------------------------------------- torch-layout inference layers


class TorchConv(nnx.Module):
  """A bias-free conv with torch's symmetric padding k // 2, HWIO kernel: the convs of the imported torchvision-style
  networks (Deep3DFaceRecon's ResNet-50, CurricularFace's IR-101), whose checkpoints keep one `kernel` leaf each.
  precision: None (XLA's default) or jax.lax.Precision.HIGHEST (no TF32 on GPUs)."""

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, precision=None, rngs: nnx.Rngs):
    self.stride, self.pad, self.precision = stride, k // 2, precision
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, cin, cout), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((self.pad, self.pad), (self.pad, self.pad))
    return jax.lax.conv_general_dilated(
      x, self.kernel[...], (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=self.precision,
    )  # fmt: skip


class InferenceBatchNorm(nnx.Module):
  """Inference-mode BatchNorm over the last axis with torch's leaf names (scale <-> weight, running_mean / var) and
  eps (1e-5, what the imported checkpoints were trained with). `affine=False` (a BatchNorm1d(affine=False)) has no
  scale or bias, exactly like its checkpoint. Only evaluation: there is no batch-statistics path."""

  def __init__(self, channels: int, *, affine: bool = True, eps: float = 1e-5):
    self.affine, self.eps = affine, eps
    if affine:
      self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = (x - self.running_mean[...]) * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return y * self.scale[...] + self.bias[...] if self.affine else y
