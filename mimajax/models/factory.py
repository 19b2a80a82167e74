"""Shared building blocks from the experiment config (`config.model`): compute dtype, SD U-Net, VAE."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
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
