"""Configuration of the SD1.x/2.x conditional U-Net, readable from and writable to diffusers' config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

# diffusers knobs that SD1.x/2.x leave at these values; anything else is refused with a clear error
# rather than silently ignored (it would change the architecture).
_FIXED_KNOBS = {
  "class_embed_type": None,
  "addition_embed_type": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "time_cond_proj_dim": None,
  "dual_cross_attention": False,
  "attention_type": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "cross_attention_norm": None,
  "mid_block_only_cross_attention": None,
  "reverse_transformer_layers_per_block": None,
  "class_embeddings_concat": False,
  "addition_time_embed_dim": None,
  "projection_class_embeddings_input_dim": None,
  "num_attention_heads": None,
}


_PER_BLOCK = (
  "only_cross_attention",
  "layers_per_block",
  "transformer_layers_per_block",
  "attention_head_dim",
)


def per_block_values(value, n: int, name: str) -> tuple:
  """A per-block config value (a scalar for every block, or one entry per block) as an n-tuple."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"config {name}={list(value)} has {len(value)} entries, expected {n} (one per block)")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of `UNet2DConditionModel` as used by SD1.x/2.x (field names as in diffusers)."""

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  mid_block_type: str | None = CROSS_MID
  up_block_types: Sequence[str] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  only_cross_attention: bool | Sequence[bool] = False
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int | Sequence[int] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: int | Sequence[int] = 1
  # diffusers calls the number of heads `attention_head_dim` (a historical misnomer kept in every
  # SD config.json); SD1.x uses 8 heads everywhere, SD2.x (5, 10, 20, 20) i.e. 64-dim heads.
  attention_head_dim: int | Sequence[int] = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  time_embedding_dim: int | None = None
  timestep_post_act: str | None = None
  num_class_embeds: int | None = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
        f"and block_out_channels ({n}) must have the same length"
      )
    for t in self.down_block_types:
      if t not in (CROSS_DOWN, PLAIN_DOWN):
        raise ValueError(f"down block type {t!r} not supported; expected {CROSS_DOWN!r} or {PLAIN_DOWN!r}")
    for t in self.up_block_types:
      if t not in (CROSS_UP, PLAIN_UP):
        raise ValueError(f"up block type {t!r} not supported; expected {CROSS_UP!r} or {PLAIN_UP!r}")
    if self.mid_block_type not in (CROSS_MID, None):
      raise ValueError(f"mid_block_type {self.mid_block_type!r} not supported; expected {CROSS_MID!r} or None")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"block_out_channels {tuple(self.block_out_channels)} must be divisible by "
          f"norm_num_groups={self.norm_num_groups}"
        )
    # Normalise per-block values so every consumer sees tuples.
    for name in _PER_BLOCK:
      object.__setattr__(self, name, per_block_values(getattr(self, name), n, name))
    object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
    object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Reads a diffusers `UNet2DConditionModel` config dict; refuses knobs SD1.x/2.x do not use."""
    bad = {
      k: config[k]
      for k, default in _FIXED_KNOBS.items()
      if k in config and config[k] != default and config[k] is not None
    }
    if bad:
      raise ValueError(
        f"unsupported UNet2DConditionModel config values {bad}; mimajax implements the "
        f"SD1.x/2.x architecture (expected { ({k: _FIXED_KNOBS[k] for k in bad}) })"
      )
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """The config.json dict that diffusers' `UNet2DConditionModel(**config)` accepts."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in _PER_BLOCK and len(set(v)) == 1:
        v = v[0]  # SD's own configs store uniform per-block values as scalars
      out[f.name] = list(v) if isinstance(v, tuple) else v
    out["_class_name"] = "UNet2DConditionModel"
    return out

  def replace(self, **kw) -> "UNetConfig":
    return dataclasses.replace(self, **kw)
