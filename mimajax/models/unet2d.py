"""The Stable Diffusion 1.x/2.x conditional U-Net (Rombach et al. 2022) in Flax NNX, channels-last.

Module and attribute names follow diffusers' `UNet2DConditionModel` so that a parameter path
reads like the PyTorch key it converts to (`mimajax/convert/diffusers_format.py`). MIMAFace
widens `conv_in` (`in_channels`) for its render / previous-clip / mask inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.models import remat
from mimajax.models.attention import SpatialTransformer
from mimajax.models.layers import (
  GroupNorm,
  TimestepEmbedding,
  activation,
  conv,
  sinusoidal_timestep_embedding,
)
from mimajax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from mimajax.models.unet_config import CROSS_DOWN, CROSS_UP, UNetConfig

Dtype = Any


def unet_resnet(cfg: UNetConfig, in_channels: int, out_channels: int, *, dtype, rngs, output_scale_factor=1.0):
  """A ResnetBlock2D with the U-Net's time embedding, norms and activation."""
  return ResnetBlock2D(in_channels, out_channels, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                       eps=cfg.norm_eps, act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
                       output_scale_factor=output_scale_factor, dtype=dtype, rngs=rngs)  # fmt: skip


class DownBlock(nnx.Module):
  """`layers_per_block` resnets (each followed by a spatial transformer if `cross`), then a downsampler."""

  def __init__(self, cfg: UNetConfig, index: int, in_channels: int, *, implementation, dtype, rngs):
    out = cfg.block_out_channels[index]
    self.cross = cfg.down_block_types[index] == CROSS_DOWN
    self.resnets = nnx.List(
      [
        unet_resnet(cfg, in_channels if j == 0 else out, out, dtype=dtype, rngs=rngs)
        for j in range(cfg.layers_per_block[index])
      ]
    )
    self.attentions = (
      nnx.List(
        [
          SpatialTransformer(
            out,
            heads=cfg.attention_head_dim[index],
            context_dim=cfg.cross_attention_dim,
            num_layers=cfg.transformer_layers_per_block[index],
            norm_num_groups=cfg.norm_num_groups,
            only_cross_attention=cfg.only_cross_attention[index],
            implementation=implementation,
            dtype=dtype,
            rngs=rngs,
          )
          for _ in range(cfg.layers_per_block[index])
        ]
      )
      if self.cross
      else None
    )
    is_final = index == len(cfg.block_out_channels) - 1
    self.downsamplers = (
      nnx.List([Downsample2D(out, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)]) if not is_final else None
    )

  def layer(self, j, x, temb, context):
    """Layer j: resnet (+ spatial transformer); the video U-Net extends it with a motion module."""
    x = self.resnets[j](x, temb)
    return self.attentions[j](x, context) if self.attentions is not None else x

  remat_policy = "none"  # see mimajax/models/remat.py

  def __call__(self, x, temb, context, **layer_kw):
    skips = []
    for j in range(len(self.resnets)):
      x = remat.call(self.remat_policy, remat.bind_layer(type(self).layer, j, **layer_kw), self, x, temb, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """resnet -> spatial transformer -> resnet at the lowest resolution."""

  def __init__(self, cfg: UNetConfig, *, implementation, dtype, rngs):
    c = cfg.block_out_channels[-1]
    kw = dict(dtype=dtype, rngs=rngs, output_scale_factor=cfg.mid_block_scale_factor)
    self.resnets = nnx.List([unet_resnet(cfg, c, c, **kw), unet_resnet(cfg, c, c, **kw)])
    self.attentions = nnx.List(
      [
        SpatialTransformer(
          c,
          heads=cfg.attention_head_dim[-1],
          context_dim=cfg.cross_attention_dim,
          num_layers=cfg.transformer_layers_per_block[-1],
          norm_num_groups=cfg.norm_num_groups,
          implementation=implementation,
          dtype=dtype,
          rngs=rngs,
        )
      ]
    )

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
  """`layers_per_block + 1` resnets on [x; skip] (each followed by a transformer if `cross`), then 2x up."""

  def __init__(self, cfg: UNetConfig, index: int, prev_channels: int, *, implementation, dtype, rngs):
    rev_channels = cfg.block_out_channels[::-1]
    n = len(rev_channels)
    out = rev_channels[index]
    skip_in = rev_channels[min(index + 1, n - 1)]  # channels of the block's last skip (its down input)
    num_layers = cfg.layers_per_block[::-1][index] + 1
    self.cross = cfg.up_block_types[index] == CROSS_UP
    self.resnets = nnx.List(
      [
        unet_resnet(
          cfg,
          (prev_channels if j == 0 else out) + (skip_in if j == num_layers - 1 else out),
          out,
          dtype=dtype,
          rngs=rngs,
        )
        for j in range(num_layers)
      ]
    )
    rev = lambda values: values[::-1][index]
    self.attentions = (
      nnx.List(
        [
          SpatialTransformer(
            out,
            heads=rev(cfg.attention_head_dim),
            context_dim=cfg.cross_attention_dim,
            num_layers=rev(cfg.transformer_layers_per_block),
            norm_num_groups=cfg.norm_num_groups,
            only_cross_attention=rev(cfg.only_cross_attention),
            implementation=implementation,
            dtype=dtype,
            rngs=rngs,
          )
          for _ in range(num_layers)
        ]
      )
      if self.cross
      else None
    )
    self.upsamplers = nnx.List([Upsample2D(out, dtype=dtype, rngs=rngs)]) if index < n - 1 else None

  def layer(self, j, x, skip, temb, context):
    """Layer j on [x; skip]: resnet (+ spatial transformer); the video U-Net adds a motion module."""
    x = self.resnets[j](jnp.concatenate([x, skip], axis=-1), temb)
    return self.attentions[j](x, context) if self.attentions is not None else x

  remat_policy = "none"  # see mimajax/models/remat.py

  def __call__(self, x, skips, temb, context, upsample_size=None, **layer_kw):
    for j in range(len(self.resnets)):
      layer = remat.bind_layer(type(self).layer, j, **layer_kw)
      x = remat.call(self.remat_policy, layer, self, x, skips.pop(), temb, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNet2DConditionModel(nnx.Module):
  """eps/v(x_t, t, context): the SD U-Net on channels-last latents (B, H, W, in_channels)."""

  def __init__(
    self, config: UNetConfig, *, dtype: Dtype = jnp.float32, attention_impl: str | None = None, rngs: nnx.Rngs
  ):
    cfg = self.config = config
    self.dtype = dtype
    self.attention_impl = attention_impl
    kw = dict(implementation=attention_impl, dtype=dtype, rngs=rngs)
    c0 = cfg.block_out_channels[0]
    self.conv_in = conv(cfg.in_channels, c0, cfg.conv_in_kernel, dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(
      c0, cfg.time_embed_dim, act_fn=cfg.act_fn, post_act_fn=cfg.timestep_post_act, dtype=dtype, rngs=rngs
    )
    self.class_embedding = (
      nnx.Embed(cfg.num_class_embeds, cfg.time_embed_dim, param_dtype=jnp.float32, dtype=dtype, rngs=rngs)
      if cfg.num_class_embeds
      else None
    )
    blocks, channels = [], c0
    for i in range(len(cfg.block_out_channels)):
      blocks.append(self._down_block(cfg, i, channels, **kw))
      channels = cfg.block_out_channels[i]
    self.down_blocks = nnx.List(blocks)
    self.mid_block = self._mid_block(cfg, **kw) if cfg.mid_block_type else None
    blocks = []
    for i in range(len(cfg.block_out_channels)):
      blocks.append(self._up_block(cfg, i, channels, **kw))
      channels = cfg.block_out_channels[::-1][i]
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, epsilon=cfg.norm_eps, dtype=dtype)
    self.act = activation(cfg.act_fn)
    self.conv_out = conv(c0, cfg.out_channels, cfg.conv_out_kernel, dtype=dtype, rngs=rngs)

  # Block constructors, overridden by the video U-Net (unet_motion.py) to add motion modules.
  def _down_block(self, cfg, index, in_channels, **kw):
    return DownBlock(cfg, index, in_channels, **kw)

  def _mid_block(self, cfg, **kw):
    return MidBlock(cfg, **kw)

  def _up_block(self, cfg, index, prev_channels, **kw):
    return UpBlock(cfg, index, prev_channels, **kw)

  def time_embed(self, timesteps: jax.Array, batch: int, class_labels: jax.Array | None = None) -> jax.Array:
    """Timestep (and optional class) embedding, (batch, time_embed_dim)."""
    cfg = self.config
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
    emb = self.time_embedding(
      sinusoidal_timestep_embedding(
        t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift
      ).astype(self.dtype)
    )
    if self.class_embedding is not None:
      if class_labels is None:
        raise ValueError("this U-Net has num_class_embeds set: class_labels are required")
      emb = emb + self.class_embedding(class_labels)
    return emb

  def __call__(
    self,
    sample: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    class_labels: jax.Array | None = None,
  ) -> jax.Array:
    """sample (B, H, W, in_channels), timesteps () or (B,), encoder_hidden_states (B, S, cross_dim)."""
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects channels-last latents (B, H, W, {cfg.in_channels}); got {sample.shape}")
    if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
      raise ValueError(
        f"encoder_hidden_states last dim {encoder_hidden_states.shape[-1]} != "
        f"cross_attention_dim {cfg.cross_attention_dim}"
      )
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    temb = self.time_embed(timesteps, sample.shape[0], class_labels)
    return self._denoise(sample, temb, encoder_hidden_states)

  def _denoise(self, sample: jax.Array, temb: jax.Array, context: jax.Array, **block_kw) -> jax.Array:
    """conv_in -> down -> mid -> up -> conv_out on (N, H, W, C); `block_kw` reaches every block."""
    context = context.astype(self.dtype)
    x = self.conv_in(sample.astype(self.dtype))
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context, **block_kw)
      skips.extend(block_skips)
    if self.mid_block is not None:
      x = self.mid_block(x, temb, context, **block_kw)
    for block in self.up_blocks:
      n = len(block.resnets)
      block_skips, skips = skips[-n:], skips[:-n]
      # Upsample to the next skip's size so latents not divisible by 2**depth still work.
      up_size = skips[-1].shape[1:3] if skips else None
      x = block(x, block_skips, temb, context, up_size, **block_kw)
    x = self.conv_out(self.act(self.conv_norm_out(x)))
    return x.astype(jnp.float32)
