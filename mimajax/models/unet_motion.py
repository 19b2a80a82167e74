"""The video U-Net of MIMAFace stage 2: the SD U-Net applied per frame plus AnimateDiff motion modules.

Latents are (B, F, H, W, C). Spatial layers see the F frames as a batch of B*F images (timestep embedding and
text/appearance context repeated per frame, or given per frame); after every resnet(+spatial transformer)
layer of every down and up block (and, if configured, inside the mid block between its transformer and second
resnet) a `MotionModule` mixes information across frames. This is diffusers' `UNetMotionModel`, whose
parameter names it keeps (`down_blocks.i.motion_modules.j...` next to the 2D U-Net's keys). In stage 2 the
spatial weights are frozen and only the motion modules (`MOTION_PARAMS`) and W_cond train.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.models.motion_module import MotionModule
from mimajax.models.unet2d import DownBlock, MidBlock, UNet2DConditionModel, UpBlock
from mimajax.models.unet_config import (
  CROSS_DOWN,
  CROSS_MID,
  CROSS_UP,
  PLAIN_DOWN,
  PLAIN_UP,
  UNetConfig,
  per_block_values,
)

Dtype = Any

# Stage 2 trains the motion modules (and W_cond) and freezes the rest: nnx filters for the two parts.
MOTION_PARAMS = nnx.All(nnx.Param, nnx.PathContains("motion_modules"))
SPATIAL_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("motion_modules")))

# diffusers' UNetMotionModel block names <-> the 2D block names of UNetConfig.
_TO_2D = {
  "CrossAttnDownBlockMotion": CROSS_DOWN,
  "DownBlockMotion": PLAIN_DOWN,
  "CrossAttnUpBlockMotion": CROSS_UP,
  "UpBlockMotion": PLAIN_UP,
}
_TO_MOTION = {v: k for k, v in _TO_2D.items()}

# UNetMotionModel has no knob for these UNetConfig fields: it is built as if they had these values.
_SPATIAL_FIXED = {
  "center_input_sample": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "act_fn": "silu",  # UNetMotionModel's conv_act is a fixed SiLU
  "upcast_attention": False,
  "resnet_time_scale_shift": "default",
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "time_embedding_dim": None,
  "timestep_post_act": None,
  "num_class_embeds": None,
}

# UNetMotionModel config knobs that must keep these values (anything else changes the architecture).
# `reverse_motion_num_attention_heads` is absent on purpose: diffusers accepts and ignores it.
_MOTION_FIXED_KNOBS = {
  "reverse_transformer_layers_per_block": None,
  "reverse_temporal_transformer_layers_per_block": None,
  "mid_block_layers": 1,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "projection_class_embeddings_input_dim": None,
  "time_cond_proj_dim": None,
}

_UNET_FIELDS = (
  "sample_size",
  "in_channels",
  "out_channels",
  "block_out_channels",
  "layers_per_block",
  "downsample_padding",
  "mid_block_scale_factor",
  "act_fn",
  "norm_num_groups",
  "norm_eps",
  "cross_attention_dim",
  "transformer_layers_per_block",
  "use_linear_projection",
)


def _flat_ints(value, name: str):
  if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
    raise ValueError(f"{name}={value!r}: per-layer (nested) values are not supported; give one int per block")
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _scalar_if_uniform(values: tuple):
  return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class MotionConfig:
  """AnimateDiff motion modules; the defaults are v3's (mm_sd_v15_v3: 8 heads, 1 layer, 32 frames, no mid)."""

  num_attention_heads: int | Sequence[int] = 8  # per down block (reversed for the up blocks)
  transformer_layers_per_block: int | Sequence[int] = 1  # temporal transformer blocks per module, per down block
  transformer_layers_per_mid_block: int = 1
  max_seq_length: int = 32  # length of the sinusoidal frame-position table: the longest clip
  use_motion_mid_block: bool = False  # v3 has none; diffusers' default (and v2's) is True

  def per_block(self, n: int) -> "MotionConfig":
    """With per-block values expanded to n tuples."""
    return dataclasses.replace(
      self,
      num_attention_heads=per_block_values(
        _flat_ints(self.num_attention_heads, "num_attention_heads"), n, "motion heads"
      ),
      transformer_layers_per_block=per_block_values(
        _flat_ints(self.transformer_layers_per_block, "transformer_layers_per_block"), n, "motion layers"
      ),
    )


@dataclasses.dataclass(frozen=True)
class UNetMotionConfig(UNetConfig):
  """A `UNetConfig` (the spatial U-Net) plus its `MotionConfig`; reads/writes diffusers' UNetMotionModel config."""

  motion: MotionConfig = MotionConfig()

  def __post_init__(self):
    super().__post_init__()
    fixed = {**_SPATIAL_FIXED, "only_cross_attention": (False,) * len(self.block_out_channels)}
    fixed["mid_block_type"] = CROSS_MID
    bad = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
    if bad:
      raise ValueError(f"UNetMotionModel cannot express {bad}; it fixes them to { ({k: fixed[k] for k in bad}) }")
    object.__setattr__(self, "motion", self.motion.per_block(len(self.block_out_channels)))

  @classmethod
  def from_unet(cls, unet: UNetConfig, motion: MotionConfig = MotionConfig()) -> "UNetMotionConfig":
    """The video U-Net of an image U-Net config (as diffusers' `UNetMotionModel.from_unet2d`)."""
    return cls(**{f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}, motion=motion)

  def spatial(self) -> UNetConfig:
    """The image U-Net config: the per-frame part of this model."""
    return UNetConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(UNetConfig)})

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetMotionConfig":
    """Reads a diffusers `UNetMotionModel` config dict; refuses knobs this implementation does not have."""
    bad = {k: config[k] for k, v in _MOTION_FIXED_KNOBS.items() if config.get(k, v) != v}
    for key in ("down_block_types", "up_block_types"):
      bad.update({key: config[key]} if any(t not in _TO_2D for t in config.get(key, ())) else {})
    cross = config.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
      bad.update({"cross_attention_dim": cross} if len(set(cross)) != 1 else {})
      cross = cross[0]
    tl = _flat_ints(config.get("transformer_layers_per_block", 1), "transformer_layers_per_block")
    tl_mid = config.get("transformer_layers_per_mid_block")
    if tl_mid is not None and tl_mid != (tl[-1] if isinstance(tl, tuple) else tl):
      bad["transformer_layers_per_mid_block"] = tl_mid
    if bad:
      raise ValueError(f"unsupported UNetMotionModel config values {bad}; mimajax implements SD1.x/2.x + AnimateDiff")
    unet = {k: (tuple(config[k]) if isinstance(config[k], list) else config[k]) for k in _UNET_FIELDS if k in config}
    if unet.get("sample_size") is None:
      unet.pop("sample_size", None)
    unet.update(
      cross_attention_dim=cross,
      transformer_layers_per_block=tl,
      attention_head_dim=_flat_ints(config.get("num_attention_heads", 8), "num_attention_heads"),
    )
    for key in ("down_block_types", "up_block_types"):
      if key in config:
        unet[key] = tuple(_TO_2D[t] for t in config[key])
    mid_layers = _flat_ints(config.get("temporal_transformer_layers_per_mid_block", 1) or 1, "mid layers")
    motion = MotionConfig(
      num_attention_heads=_flat_ints(config.get("motion_num_attention_heads", 8), "motion_num_attention_heads"),
      transformer_layers_per_block=_flat_ints(config.get("temporal_transformer_layers_per_block", 1), "temporal"),
      transformer_layers_per_mid_block=mid_layers[0] if isinstance(mid_layers, tuple) else mid_layers,
      max_seq_length=config.get("motion_max_seq_length", 32),
      use_motion_mid_block=config.get("use_motion_mid_block", True),
    )
    return cls(**unet, motion=motion)

  def to_diffusers(self) -> dict[str, Any]:
    """The config.json dict that diffusers' `UNetMotionModel(**config)` accepts."""
    m = self.motion
    out = {k: getattr(self, k) for k in _UNET_FIELDS}
    out.update(
      _class_name="UNetMotionModel",
      block_out_channels=list(self.block_out_channels),
      layers_per_block=_scalar_if_uniform(self.layers_per_block),
      transformer_layers_per_block=_scalar_if_uniform(self.transformer_layers_per_block),
      num_attention_heads=_scalar_if_uniform(self.attention_head_dim),
      down_block_types=[_TO_MOTION[t] for t in self.down_block_types],
      up_block_types=[_TO_MOTION[t] for t in self.up_block_types],
      transformer_layers_per_mid_block=self.transformer_layers_per_block[-1],
      temporal_transformer_layers_per_block=_scalar_if_uniform(m.transformer_layers_per_block),
      temporal_transformer_layers_per_mid_block=m.transformer_layers_per_mid_block,
      motion_num_attention_heads=_scalar_if_uniform(m.num_attention_heads),
      motion_max_seq_length=m.max_seq_length,
      use_motion_mid_block=m.use_motion_mid_block,
      **_MOTION_FIXED_KNOBS,
    )
    return out


def _motion_modules(cfg: UNetMotionConfig, channels: int, heads: int, layers: int, count: int, kw) -> nnx.List:
  return nnx.List(
    [
      MotionModule(
        channels,
        heads=heads,
        num_layers=layers,
        norm_num_groups=cfg.norm_num_groups,
        max_seq_length=cfg.motion.max_seq_length,
        **kw,
      )
      for _ in range(count)
    ]
  )


class DownBlockMotion(DownBlock):
  """The 2D down block with a motion module after each resnet(+transformer) layer."""

  def __init__(self, cfg: UNetMotionConfig, index: int, in_channels: int, *, implementation, dtype, rngs):
    super().__init__(cfg, index, in_channels, implementation=implementation, dtype=dtype, rngs=rngs)
    m, kw = cfg.motion, dict(implementation=implementation, dtype=dtype, rngs=rngs)
    count = len(self.resnets)
    self.motion_modules = _motion_modules(
      cfg, cfg.block_out_channels[index], m.num_attention_heads[index], m.transformer_layers_per_block[index], count, kw
    )

  def layer(self, j, x, temb, context, *, num_frames: int):
    return self.motion_modules[j](super().layer(j, x, temb, context), num_frames)


class UpBlockMotion(UpBlock):
  """The 2D up block with a motion module after each resnet(+transformer) layer."""

  def __init__(self, cfg: UNetMotionConfig, index: int, prev_channels: int, *, implementation, dtype, rngs):
    super().__init__(cfg, index, prev_channels, implementation=implementation, dtype=dtype, rngs=rngs)
    m, kw = cfg.motion, dict(implementation=implementation, dtype=dtype, rngs=rngs)
    rev = lambda values: values[::-1][index]
    self.motion_modules = _motion_modules(
      cfg,
      rev(cfg.block_out_channels),
      rev(m.num_attention_heads),
      rev(m.transformer_layers_per_block),
      len(self.resnets),
      kw,
    )

  def layer(self, j, x, skip, temb, context, *, num_frames: int):
    return self.motion_modules[j](super().layer(j, x, skip, temb, context), num_frames)


class MidBlockMotion(MidBlock):
  """resnet -> spatial transformer -> [motion module] -> resnet; without `use_motion_mid_block` the 2D mid block."""

  def __init__(self, cfg: UNetMotionConfig, *, implementation, dtype, rngs):
    super().__init__(cfg, implementation=implementation, dtype=dtype, rngs=rngs)
    m, kw = cfg.motion, dict(implementation=implementation, dtype=dtype, rngs=rngs)
    self.motion_modules = (
      _motion_modules(
        cfg, cfg.block_out_channels[-1], m.num_attention_heads[-1], m.transformer_layers_per_mid_block, 1, kw
      )
      if m.use_motion_mid_block
      else None
    )

  def __call__(self, x, temb, context, *, num_frames: int):
    if self.motion_modules is None:
      return super().__call__(x, temb, context)
    x = self.attentions[0](self.resnets[0](x, temb), context)
    return self.resnets[1](self.motion_modules[0](x, num_frames), temb)


class UNetMotionModel(UNet2DConditionModel):
  """eps/v(x_t, t, context) on video latents (B, F, H, W, in_channels): SD U-Net per frame + motion modules."""

  def __init__(
    self,
    config: UNetMotionConfig,
    *,
    dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    rngs: nnx.Rngs,
  ):
    if not isinstance(config, UNetMotionConfig):
      raise ValueError(
        f"UNetMotionModel needs a UNetMotionConfig (UNetMotionConfig.from_unet(unet_config, motion)); "
        f"got {type(config).__name__}"
      )
    super().__init__(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)

  def _down_block(self, cfg, index, in_channels, **kw):
    return DownBlockMotion(cfg, index, in_channels, **kw)

  def _mid_block(self, cfg, **kw):
    return MidBlockMotion(cfg, **kw)

  def _up_block(self, cfg, index, prev_channels, **kw):
    return UpBlockMotion(cfg, index, prev_channels, **kw)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
    """sample (B, F, H, W, C), timesteps () or (B,), encoder_hidden_states (B, S, D) or per frame (B, F, S, D)."""
    cfg = self.config
    if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNetMotionModel expects video latents (B, F, H, W, {cfg.in_channels}); got {sample.shape}")
    b, f, h, w, c = sample.shape
    if f > cfg.motion.max_seq_length:
      raise ValueError(
        f"clip of {f} frames is longer than the motion modules' positional table "
        f"(max_seq_length={cfg.motion.max_seq_length})"
      )
    ctx = encoder_hidden_states
    if ctx.shape[-1] != cfg.cross_attention_dim or ctx.ndim not in (3, 4) or ctx.shape[0] != b:
      raise ValueError(
        f"encoder_hidden_states must be (B={b}, S, {cfg.cross_attention_dim}) or per frame "
        f"(B={b}, F={f}, S, {cfg.cross_attention_dim}); got {ctx.shape}"
      )
    if ctx.ndim == 4:
      if ctx.shape[1] != f:
        raise ValueError(f"per-frame encoder_hidden_states have {ctx.shape[1]} frames; the latents have {f}")
      ctx = ctx.reshape(b * f, *ctx.shape[2:])
    else:
      ctx = jnp.repeat(ctx, f, axis=0)  # frame-major within each clip, as diffusers' repeat_interleave
    temb = jnp.repeat(self.time_embed(timesteps, b), f, axis=0)
    out = self._denoise(sample.reshape(b * f, h, w, c), temb, ctx, num_frames=f)
    return out.reshape(b, f, *out.shape[1:])

  @classmethod
  def from_unet2d(
    cls,
    unet: UNet2DConditionModel,
    motion: MotionConfig = MotionConfig(),
    *,
    attention_impl: str | None = None,
    rngs: nnx.Rngs,
  ) -> "UNetMotionModel":
    """The image U-Net's weights with fresh (identity) motion modules: the start of stage 2."""
    model = cls(
      UNetMotionConfig.from_unet(unet.config, motion), dtype=unet.dtype, attention_impl=attention_impl, rngs=rngs
    )
    nnx.update(model, nnx.state(unet, nnx.Param))
    return model

  def spatial_unet(self, *, attention_impl: str | None = None) -> UNet2DConditionModel:
    """The per-frame image U-Net: this model without its motion modules."""
    abstract = nnx.eval_shape(
      lambda: UNet2DConditionModel(
        self.config.spatial(), dtype=self.dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0)
      )
    )
    nnx.update(abstract, nnx.state(self, SPATIAL_PARAMS))
    return abstract
