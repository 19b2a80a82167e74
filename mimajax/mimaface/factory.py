"""The MIMAFace model from the experiment config (`config.model`)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from mimajax.mimaface.ica import INPUT_CHANNELS
from mimajax.mimaface.mia import MIAConfig
from mimajax.mimaface.model import MIMAFace, MIMAFaceConfig
from mimajax.models.clip_vision import CLIPVisionConfig
from mimajax.models.factory import compute_dtype, unet_config
from mimajax.models.unet_motion import MotionConfig


def mimaface_config(model_cfg: ml_collections.ConfigDict, *, stage: int = 1, **overrides) -> MIMAFaceConfig:
  """The MIMAFace model of `config.model`: its U-Net widened to 13 inputs; motion modules in stage 2."""
  if stage not in (1, 2):
    raise ValueError(f"MIMAFace stage must be 1 (images) or 2 (clips); got {stage}")
  return MIMAFaceConfig(
    unet=unet_config(model_cfg).replace(in_channels=INPUT_CHANNELS),
    clip=CLIPVisionConfig(**model_cfg.clip.to_dict()),
    mia=MIAConfig(**model_cfg.mia.to_dict()),
    motion=MotionConfig(**model_cfg.motion.to_dict()) if stage == 2 else None,
    **overrides,
  )


def build_mimaface(model_cfg: ml_collections.ConfigDict, *, stage: int = 1, rngs: nnx.Rngs, **overrides) -> MIMAFace:
  return MIMAFace(
    mimaface_config(model_cfg, stage=stage, **overrides),
    dtype=compute_dtype(model_cfg.dtype),
    attention_impl=model_cfg.attention_impl,
    rngs=rngs,
  )
