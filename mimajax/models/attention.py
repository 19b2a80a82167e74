"""Attention blocks of the SD U-Net (LDM "SpatialTransformer") and the VAE's mid-block attention.

`implementation` comes from the config (`model.attention_impl`):
  "xla" / "cudnn" / None: `jax.nn.dot_product_attention` (cuDNN = fused flash attention on GPUs);
  "blockwise": memory-efficient attention (Rabe & Staats 2021) looping over heads and query
    blocks, recomputing scores in the backward pass. On CPU it is 3-5x faster than the XLA path
    (the scores of one block stay in cache) and it bounds memory for long video clips anywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mimajax.models.layers import GroupNorm, LayerNorm, linear

Dtype = Any


ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blockwise")
QUERY_BLOCK = 512


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_block: int = QUERY_BLOCK) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for (B, T, N, D) inputs, one head and query block at a time."""
  b, t, n, d = q.shape
  s = k.shape[1]
  qblk = query_block if t % query_block == 0 else t
  to_heads = lambda x, length: x.transpose(0, 2, 1, 3).reshape(b * n, length, d)
  qh = to_heads(q * jnp.asarray(d**-0.5, q.dtype), t).reshape(b * n, t // qblk, qblk, d)
  kh, vh = to_heads(k, s), to_heads(v, s)

  def one_head(args):
    q_blocks, kk, vv = args

    @jax.checkpoint  # keep only the block's output; scores are recomputed in the backward pass
    def one_block(qb):
      logits = (qb @ kk.T).astype(jnp.float32)
      return jax.nn.softmax(logits, axis=-1).astype(vv.dtype) @ vv

    return jax.lax.map(one_block, q_blocks)

  out = jax.lax.map(one_head, (qh, kh, vh))  # (B*N, T/qblk, qblk, D)
  return out.reshape(b, n, t, d).transpose(0, 2, 1, 3)


def dot_product_attention(q, k, v, implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention on (B, T, N, D) inputs by the configured implementation."""
  if implementation == "blockwise":
    return blockwise_attention(q, k, v)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r} unknown; expected one of {ATTENTION_IMPLEMENTATIONS}"
    )
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v projections (no bias) and a biased output projection."""

  def __init__(
    self,
    query_dim: int,
    *,
    heads: int,
    head_dim: int,
    context_dim: int | None = None,
    qkv_bias: bool = False,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
        f"attention implementation {implementation!r} unknown; expected one of {ATTENTION_IMPLEMENTATIONS}"
      )
    inner = heads * head_dim
    context_dim = context_dim or query_dim
    self.heads, self.head_dim = heads, head_dim
    self.implementation = implementation
    self.dtype = dtype
    self.to_q = linear(query_dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_k = linear(context_dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_v = linear(context_dim, inner, axes=("embed", "heads"), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_out = linear(inner, query_dim, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: (B, T, query_dim); context: (B, S, context_dim) or None for self-attention."""
    context = x if context is None else context
    b = x.shape[0]
    q = self.to_q(x).reshape(b, -1, self.heads, self.head_dim)
    k = self.to_k(context).reshape(b, -1, self.heads, self.head_dim)
    v = self.to_v(context).reshape(b, -1, self.heads, self.head_dim)
    q, k, v = (t.astype(self.dtype) for t in (q, k, v))
    out = dot_product_attention(q, k, v, self.implementation)
    out = checkpoint_name(out, "attention_out")  # remat policies of the training config refer to it
    return self.to_out(out.reshape(b, -1, self.heads * self.head_dim))


class GEGLUFeedForward(nnx.Module):
  """Transformer MLP with a GEGLU gate: proj_in -> (h, gate) -> h * gelu(gate) -> proj_out."""

  def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    inner = dim * mult
    self.proj_in = linear(dim, inner * 2, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.proj_out = linear(inner, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(h * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
  """Pre-norm block: self-attention, cross-attention on the context, GEGLU MLP."""

  def __init__(
    self,
    dim: int,
    *,
    heads: int,
    head_dim: int,
    context_dim: int,
    only_cross_attention: bool = False,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.only_cross_attention = only_cross_attention
    kw = dict(heads=heads, head_dim=head_dim, implementation=implementation, dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, dtype=dtype)
    # With only_cross_attention (SD x4 upscaler) attn1 also attends to the context.
    self.attn1 = Attention(dim, context_dim=context_dim if only_cross_attention else None, **kw)
    self.norm2 = LayerNorm(dim, dtype=dtype)
    self.attn2 = Attention(dim, context_dim=context_dim, **kw)
    self.norm3 = LayerNorm(dim, dtype=dtype)
    self.ff = GEGLUFeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
  """Transformer over the H*W tokens of a feature map, conditioned on a context by cross-attention.

  The input/output projections are 1x1 convs in SD1.x and linears in SD2.x; on channels-last
  maps both are the same matrix product, so one Linear serves and only the PyTorch weight
  shape differs (the converter handles it from `use_linear_projection`).
  """

  def __init__(
    self,
    channels: int,
    *,
    heads: int,
    context_dim: int,
    num_layers: int = 1,
    norm_num_groups: int = 32,
    only_cross_attention: bool = False,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if channels % heads:
      raise ValueError(f"SpatialTransformer: channels={channels} not divisible by heads={heads}")
    head_dim = channels // heads
    self.norm = GroupNorm(norm_num_groups, channels, epsilon=1e-6, dtype=dtype)
    self.proj_in = linear(channels, channels, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List(
      [
        TransformerBlock(
          channels,
          heads=heads,
          head_dim=head_dim,
          context_dim=context_dim,
          only_cross_attention=only_cross_attention,
          implementation=implementation,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(num_layers)
      ]
    )
    self.proj_out = linear(channels, channels, axes=("embed_out", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    return x + self.proj_out(tokens).reshape(b, h, w, c)


class VAEAttention(Attention):
  """Single-head self-attention over H*W with a GroupNorm in front and a residual (VAE mid-block)."""

  def __init__(
    self,
    channels: int,
    *,
    norm_num_groups: int = 32,
    epsilon: float = 1e-6,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      channels,
      heads=1,
      head_dim=channels,
      qkv_bias=True,
      implementation=implementation,
      dtype=dtype,
      rngs=rngs,
    )
    self.group_norm = GroupNorm(norm_num_groups, channels, epsilon=epsilon, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)
