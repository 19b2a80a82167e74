"""The Stable Diffusion KL autoencoder (AutoencoderKL) in Flax NNX, channels-last.

Images in [-1, 1] (B, H, W, 3) <-> latents (B, H/8, W/8, 4); `scaling_factor` (0.18215 for SD1.x)
maps posterior samples to the unit-variance latents the U-Net is trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.models.attention import VAEAttention
from mimajax.models.layers import GroupNorm, activation, conv
from mimajax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of diffusers' `AutoencoderKL` (field names as in its config.json)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"VAE block_out_channels {self.block_out_channels} must be divisible by "
          f"norm_num_groups={self.norm_num_groups}"
        )

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      bad = [t for t in config.get(key, ()) if t != ok]
      if bad:
        raise ValueError(f"AutoencoderKL {key} {bad} not supported; expected only {ok!r}")
    for key in ("latents_mean", "latents_std"):
      if config.get(key) is not None:
        raise ValueError(f"AutoencoderKL config {key} is not supported (SD1.x/2.x VAEs leave it None)")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields})

  def to_diffusers(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["block_out_channels"] = list(self.block_out_channels)
    n = len(self.block_out_channels)
    out["down_block_types"] = ["DownEncoderBlock2D"] * n
    out["up_block_types"] = ["UpDecoderBlock2D"] * n
    out["_class_name"] = "AutoencoderKL"
    return out


def _resnets(cfg: VAEConfig, in_ch: int, out_ch: int, count: int, *, dtype, rngs) -> nnx.List:
  """`count` time-embedding-free resnets, the first taking `in_ch` channels."""
  return nnx.List(
    [
      ResnetBlock2D(
        in_ch if j == 0 else out_ch,
        out_ch,
        temb_channels=None,
        groups=cfg.norm_num_groups,
        eps=1e-6,
        act_fn=cfg.act_fn,
        dtype=dtype,
        rngs=rngs,
      )  # fmt: skip
      for j in range(count)
    ]
  )


class EncoderDownBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, downsample: bool, *, dtype, rngs):
    self.resnets = _resnets(cfg, in_ch, out_ch, cfg.layers_per_block, dtype=dtype, rngs=rngs)
    self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, dtype=dtype, rngs=rngs)]) if downsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderUpBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, upsample: bool, *, dtype, rngs):
    self.resnets = _resnets(cfg, in_ch, out_ch, cfg.layers_per_block + 1, dtype=dtype, rngs=rngs)
    self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if upsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class VAEMidBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, channels: int, *, implementation, dtype, rngs):
    kw = dict(temb_channels=None, groups=cfg.norm_num_groups, eps=1e-6, act_fn=cfg.act_fn, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw), ResnetBlock2D(channels, channels, **kw)])
    self.attentions = (
      nnx.List(
        [
          VAEAttention(
            channels,
            norm_num_groups=cfg.norm_num_groups,
            implementation=implementation,
            dtype=dtype,
            rngs=rngs,
          )
        ]
      )
      if cfg.mid_block_add_attention
      else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image -> 2*latent_channels moments (mean, logvar)."""

  def __init__(self, cfg: VAEConfig, *, implementation=None, dtype=jnp.float32, rngs: nnx.Rngs):
    ch = cfg.block_out_channels
    self.conv_in = conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List(
      [EncoderDownBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, dtype=dtype, rngs=rngs) for i in range(len(ch))]
    )
    self.mid_block = VAEMidBlock(cfg, ch[-1], implementation=implementation, dtype=dtype, rngs=rngs)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], epsilon=1e-6, dtype=dtype)
    self.act = activation(cfg.act_fn)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent -> image."""

  def __init__(self, cfg: VAEConfig, *, implementation=None, dtype=jnp.float32, rngs: nnx.Rngs):
    rev = cfg.block_out_channels[::-1]
    self.conv_in = conv(cfg.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = VAEMidBlock(cfg, rev[0], implementation=implementation, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List(
      [
        DecoderUpBlock(cfg, rev[max(i - 1, 0)], rev[i], i < len(rev) - 1, dtype=dtype, rngs=rngs)
        for i in range(len(rev))
      ]
    )
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, rev[-1], epsilon=1e-6, dtype=dtype)
    self.act = activation(cfg.act_fn)
    self.conv_out = conv(rev[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(self.act(self.conv_norm_out(x)))


@dataclasses.dataclass
class DiagonalGaussian:
  """Posterior q(z|x) = N(mean, exp(logvar)); logvar clipped to [-30, 20] as in LDM."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL to N(0, I), summed over latent dims, per sample."""
    kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return kl.sum(axis=tuple(range(1, kl.ndim)))


class AutoencoderKL(nnx.Module):
  """SD's VAE: `encode` -> DiagonalGaussian, `decode` latents -> images; `encode_latents` scales."""

  def __init__(
    self, config: VAEConfig, *, dtype: Dtype = jnp.float32, attention_impl: str | None = None, rngs: nnx.Rngs
  ):
    cfg = self.config = config
    self.dtype = dtype
    self.encoder = Encoder(cfg, implementation=attention_impl, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(cfg, implementation=attention_impl, dtype=dtype, rngs=rngs)
    lc = cfg.latent_channels
    self.quant_conv = conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(lc, lc, 1, dtype=dtype, rngs=rngs) if cfg.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images (B, H, W, in_channels) in [-1, 1] -> posterior over unscaled latents."""
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"VAE.encode expects (B, H, W, {self.config.in_channels}) images; got {images.shape}")
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, 8h, 8w, out_channels), fp32."""
    if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
      raise ValueError(f"VAE.decode expects (B, h, w, {self.config.latent_channels}) latents; got {latents.shape}")
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def encode_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images -> the scaled latents the diffusion model sees (a posterior sample, or its mean)."""
    post = self.encode(images)
    z = post.sample(rng) if rng is not None else post.mode()
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images in [-1, 1] (not clipped)."""
    shift = self.config.shift_factor or 0.0
    return self.decode(latents / self.config.scaling_factor + shift)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    post = self.encode(images)
    return self.decode(post.sample(rng) if rng is not None else post.mode())
