"""AnimateDiff motion modules (Guo et al. 2023; v3 in MIMAFace stage 2): temporal self-attention over frames.

A motion module sits after every resnet(+spatial transformer) layer of the video U-Net. For each spatial
position of each clip it runs a small transformer over the F frames: GroupNorm (statistics over the whole
clip) -> proj_in -> blocks of [self-attn, self-attn, GEGLU MLP], each attention fed the normed tokens plus a
sinusoidal frame-position table -> proj_out, added to the input. Names follow diffusers'
`AnimateDiffTransformer3D` / `BasicTransformerBlock(double_self_attention=True)`, so a parameter path reads like
its `MotionAdapter` key. `proj_out` starts at zero: a freshly built module is the identity.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.models.attention import Attention, GEGLUFeedForward
from mimajax.models.layers import GroupNorm, LayerNorm, linear

Dtype = Any


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """(length, dim) table: sin at even, cos at odd channels (AnimateDiff's PositionalEncoding, diffusers' `pe`)."""
  if dim % 2:
    raise ValueError(f"sinusoidal frame positions need an even channel count; got {dim}")
  position = np.arange(length, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(position * div_term)
  table[:, 1::2] = np.cos(position * div_term)
  return table


def temporal_implementation(implementation: str | None) -> str | None:
  """Attention implementation for the F x F temporal scores.

  The scores are tiny (F <= 32) but there are B*H*W*heads of them: the blockwise path would loop over
  every one, and cuDNN's fused kernel refuses SD1.5's 160-dim heads, so both fall back to XLA here.
  """
  return "xla" if implementation in ("blockwise", "cudnn") else implementation


class TemporalTransformerBlock(nnx.Module):
  """Pre-norm block over a (N, F, D) frame sequence: two position-aware self-attentions, then a GEGLU MLP."""

  def __init__(self, dim: int, *, heads: int, head_dim: int, implementation, dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(heads=heads, head_dim=head_dim, implementation=implementation, dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, dtype=dtype)
    self.attn1 = Attention(dim, **kw)
    self.norm2 = LayerNorm(dim, dtype=dtype)
    self.attn2 = Attention(dim, **kw)
    self.norm3 = LayerNorm(dim, dtype=dtype)
    self.ff = GEGLUFeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    # Positions enter the attention inputs only, never the residual stream (as in AnimateDiff).
    x = x + self.attn1(self.norm1(x) + positions)
    x = x + self.attn2(self.norm2(x) + positions)
    return x + self.ff(self.norm3(x))


class MotionModule(nnx.Module):
  """Temporal transformer on (B*F, H, W, C) feature maps of B clips of F frames; returns the same shape."""

  def __init__(
    self,
    channels: int,
    *,
    heads: int = 8,
    num_layers: int = 1,
    norm_num_groups: int = 32,
    max_seq_length: int = 32,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if channels < heads:
      raise ValueError(f"MotionModule: channels={channels} is fewer than heads={heads}")
    head_dim = channels // heads  # diffusers: inner width heads * (channels // heads)
    inner = heads * head_dim
    self.max_seq_length = max_seq_length
    self.inner = inner
    self.dtype = dtype
    self.norm = GroupNorm(norm_num_groups, channels, epsilon=1e-6, dtype=dtype)
    self.proj_in = linear(channels, inner, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    impl = temporal_implementation(implementation)
    self.transformer_blocks = nnx.List(
      [
        TemporalTransformerBlock(inner, heads=heads, head_dim=head_dim, implementation=impl, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)
      ]
    )
    # Zero-initialised (AnimateDiff's zero_module) so inserting fresh modules leaves the image U-Net unchanged.
    self.proj_out = linear(
      inner, channels, axes=("embed_out", "embed"), dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.zeros_init()
    )

  def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
    bf, h, w, c = x.shape
    if num_frames > self.max_seq_length:
      raise ValueError(
        f"clip of {num_frames} frames is longer than the motion module's positional table "
        f"(max_seq_length={self.max_seq_length})"
      )
    if bf % num_frames:
      raise ValueError(f"MotionModule: leading axis {bf} is not a whole number of {num_frames}-frame clips")
    b = bf // num_frames
    # GroupNorm statistics span the whole clip (diffusers norms (B, C, F, H, W)), hence the clip axis first.
    y = self.norm(x.reshape(b, num_frames, h, w, c))
    tokens = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, num_frames, c)
    tokens = self.proj_in(tokens)
    positions = jnp.asarray(sinusoidal_positions(num_frames, self.inner), self.dtype)
    for block in self.transformer_blocks:
      tokens = block(tokens, positions)
    y = self.proj_out(tokens).reshape(b, h, w, num_frames, c).transpose(0, 3, 1, 2, 4)
    return x + y.reshape(bf, h, w, c)
