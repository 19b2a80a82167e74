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
) -> nnx.Conv:
  """A 2D conv (kernel HWIO) with PyTorch-style symmetric padding (k-1)//2 by default."""
  if padding is None:
    padding = (kernel_size - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(kernel_size, kernel_size),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_partitioned(kernel_init, CONV_KERNEL_AXES),
      bias_init=_partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
      rngs=rngs,
  )


class GroupNorm(nnx.Module):
  """GroupNorm over channels-last inputs of any rank, statistics in fp32 (as torch.nn.GroupNorm)."""

  def __init__(self, num_groups: int, num_channels: int, *, epsilon: float = 1e-5,
               dtype: Dtype = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(
          f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    c = shape[-1]
    xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
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

  def __init__(self, in_features: int, time_embed_dim: int, *, act_fn: str = "silu",
               post_act_fn: str | None = None, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = linear(in_features, time_embed_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.linear_2 = linear(time_embed_dim, time_embed_dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.act = activation(act_fn)
    self.post_act = activation(post_act_fn) if post_act_fn else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_2(self.act(self.linear_1(x)))
    return self.post_act(x) if self.post_act else x
