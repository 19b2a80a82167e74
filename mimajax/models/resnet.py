"""Residual blocks and resamplers of the SD U-Net and VAE (channels-last)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.models.layers import GroupNorm, activation, conv, linear

Dtype = Any


class ResnetBlock2D(nnx.Module):
  """GroupNorm-act-conv twice, with an optional timestep embedding added (or scale/shift) in between."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    temb_channels: int | None,
    groups: int = 32,
    eps: float = 1e-5,
    act_fn: str = "silu",
    time_embedding_norm: str = "default",
    output_scale_factor: float = 1.0,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if time_embedding_norm not in ("default", "scale_shift"):
      raise ValueError(
        f"resnet_time_scale_shift={time_embedding_norm!r} is not supported; expected 'default' or 'scale_shift'"
      )
    self.act = activation(act_fn)
    self.time_embedding_norm = time_embedding_norm
    self.output_scale_factor = output_scale_factor
    self.norm1 = GroupNorm(groups, in_channels, epsilon=eps, dtype=dtype)
    self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    if temb_channels is not None:
      proj_out = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
      self.time_emb_proj = linear(temb_channels, proj_out, axes=("embed", "conv_out"), dtype=dtype, rngs=rngs)
    else:
      self.time_emb_proj = None
    self.norm2 = GroupNorm(groups, out_channels, epsilon=eps, dtype=dtype)
    self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (
      conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
    )

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      t = self.time_emb_proj(self.act(temb))
      # Broadcast (B, C) over every spatial (and frame) axis between batch and channels.
      t = t.reshape(t.shape[:1] + (1,) * (h.ndim - 2) + t.shape[-1:])
      if self.time_embedding_norm == "default":
        h = self.norm2(h + t)
      else:
        scale, shift = jnp.split(t, 2, axis=-1)
        h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h)
    h = self.conv2(self.act(h))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv; padding 0 means the LDM VAE's asymmetric (0, 1) padding."""

  def __init__(self, channels: int, *, padding: int = 1, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    pad = ((padding, padding), (padding, padding)) if padding else ((0, 1), (0, 1))
    self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour resize of (B, H, W, C) to `size` (default 2x), as torch's F.interpolate."""
  b, h, w, c = x.shape
  th, tw = size or (2 * h, 2 * w)
  if (th, tw) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (jnp.arange(th) * h) // th
  cols = (jnp.arange(tw) * w) // tw
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Nearest 2x (or to an explicit size, for odd skip shapes) then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    return self.conv(upsample_nearest(x, size))
