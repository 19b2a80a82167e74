"""Models from the experiment config (`config.model`), fresh or from a local pretrained folder."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mimajax.models.clip_vision import CLIPVisionConfig
from mimajax.models.ica import INPUT_CHANNELS
from mimajax.models.mia import MIAConfig
from mimajax.models.mimaface import MIMAFace, MIMAFaceConfig
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig
from mimajax.models.vae import AutoencoderKL, VAEConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown compute dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def unet_config(model_cfg: ml_collections.ConfigDict) -> UNetConfig:
  return UNetConfig(**model_cfg.unet.to_dict())


def vae_config(model_cfg: ml_collections.ConfigDict) -> VAEConfig:
  return VAEConfig(**model_cfg.vae.to_dict())


def build_unet(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> UNet2DConditionModel:
  return UNet2DConditionModel(
    unet_config(model_cfg),
    dtype=compute_dtype(model_cfg.dtype),
    attention_impl=model_cfg.attention_impl,
    rngs=rngs,
  )


def build_vae(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> AutoencoderKL:
  return AutoencoderKL(
    vae_config(model_cfg),
    dtype=compute_dtype(model_cfg.dtype),
    attention_impl=model_cfg.attention_impl,
    rngs=rngs,
  )


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
