"""The official MIMAFace PyTorch release (MIMAFace2024/MIMAFace) -> the release-variant MIMAFace model.

A release model folder, as `infer_video.py` reads it (docs/release_layout.md):

  <image_model>/pretrained_unet/   stage-1 U-Net, a diffusers UNet2DConditionModel folder
  <model>/3dunet.pth               stage-2 U-Net state dict (original AnimateDiff UNet3DConditionModel); the
                                   release takes only `motion_modules.*` and the 13-channel `conv_in.*` from it
  <model>/vision_encoder/          transformers CLIPVisionModel (ViT-L/14)
  <model>/mim.pth                  MIMAFacePostfuseModule state dict (the release's MIA)

Every key that the release itself loads must land on a parameter, and every parameter must be
covered; anything else raises `CheckpointKeyError` listing the keys, before any weight is used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert import animatediff_format as animatediff
from mimajax.convert import clip_format
from mimajax.convert.diffusers_format import read_config, read_state_dict
from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.mimaface.ica import INPUT_CHANNELS
from mimajax.mimaface.mia import MIAConfig, ReleaseMIA
from mimajax.mimaface.model import MIMAFace, MIMAFaceConfig
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import UNetMotionConfig

UNET_FOLDER, UNET3D_FILE, CLIP_FOLDER, MIA_FILE = "pretrained_unet", "3dunet.pth", "vision_encoder", "mim.pth"
_RELEASE_UNET3D_KEYS = re.compile(r"(^|\.)(motion_modules\.|conv_in\.)")  # what infer_video.py reads


def mia_key_map(mia: ReleaseMIA) -> KeyMap:
  """The release's post-fuse module keys are its attribute names: a one-to-one map."""
  return KeyMap(nnx.state(mia, nnx.Param), what="MIMAFacePostfuseModule (mim.pth)")


def mia_config_from_state(state: Mapping[str, np.ndarray]) -> MIAConfig:
  """Sizes of the release MIA read off its weights (all Linear weights are [out, in])."""

  def shape(key):
    if key not in state:
      raise CheckpointKeyError(f"mim.pth has no {key}; it is not a MIMAFacePostfuseModule state dict")
    return np.shape(state[key])

  d, clip_dim = shape("transform_dim_clip.weight")
  layers = len({m.group(1) for m in map(re.compile(r"mapper\.resblocks\.(\d+)\.").match, state) if m})
  return MIAConfig(
    variant="release",
    clip_dim=clip_dim,
    cross_attention_dim=d,
    face_recognition_dim=shape("transform_dim_arcface.weight")[1],
    gaze_dim=shape("transform_dim_gaze.weight")[1],
    expression_dim=shape("transform_dim_exp.weight")[1],
    texture_dim=shape("transform_dim_tex.weight")[1],
    gamma_dim=shape("transform_dim_gamma.weight")[1],
    angle_dim=shape("transform_dim_angles.weight")[1],
    translation_dim=shape("transform_dim_translation.weight")[1],
    mlp_ratio=shape("mapper.resblocks.0.mlp.c_fc.weight")[0] // d,
    release_layers=layers,
    num_heads=1,
  )


def _torch_file(path: Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise CheckpointReadError(f"release folder is missing {path.name} (expected at {path})")
  return animatediff.read_animatediff_checkpoint(path)


def load_release(
  model_dir: str | os.PathLike,
  image_model_dir: str | os.PathLike | None = None,
  *,
  release_heads: int = 1,
  motion_heads: int = 8,
  dtype=jnp.float32,
  attention_impl: str | None = None,
) -> MIMAFace:
  """The stage-2, release-variant MIMAFace of a release folder (`image_model_dir` holds pretrained_unet/)."""
  model_dir = Path(model_dir)
  unet_dir = Path(image_model_dir or model_dir) / UNET_FOLDER
  if not unet_dir.is_dir():
    raise CheckpointReadError(f"release folder is missing {UNET_FOLDER}/ (expected at {unet_dir})")
  spatial_cfg = UNetConfig.from_diffusers(read_config(unet_dir))
  spatial = read_state_dict(unet_dir)

  unet3d = _torch_file(model_dir / UNET3D_FILE)
  taken = {k: v for k, v in unet3d.items() if _RELEASE_UNET3D_KEYS.search(k)}
  if "conv_in.weight" not in taken:
    raise CheckpointKeyError(f"{UNET3D_FILE} has no conv_in.weight: not a MIMAFace stage-2 U-Net")
  spatial.update({k: taken.pop(k) for k in ("conv_in.weight", "conv_in.bias") if k in taken})
  in_channels = np.shape(spatial["conv_in.weight"])[1]
  if in_channels != INPUT_CHANNELS:
    raise CheckpointKeyError(
      f"conv_in.weight of {UNET3D_FILE} takes {in_channels} channels; MIMAFace's U-Net takes {INPUT_CHANNELS}"
    )
  spatial_cfg = spatial_cfg.replace(in_channels=INPUT_CHANNELS)
  motion_cfg = animatediff.motion_config_from_original(taken, spatial_cfg, motion_heads)
  unet_cfg = UNetMotionConfig.from_unet(spatial_cfg, motion_cfg)
  motion = animatediff.motion_state_from_original(taken)
  where = f"{unet_dir} + {model_dir / UNET3D_FILE}"
  unet = animatediff.unet_motion_from_torch_state(
    unet_cfg, {**spatial, **motion}, dtype=dtype, attention_impl=attention_impl, assumed=where
  )

  clip = clip_format.load_clip_vision(model_dir / CLIP_FOLDER, with_projection=False, dtype=dtype,
                                      attention_impl=attention_impl)  # fmt: skip
  mia_state = _torch_file(model_dir / MIA_FILE)
  mia_cfg = mia_config_from_state(mia_state)
  mia_cfg = dataclasses.replace(mia_cfg, release_heads=release_heads, clip_tokens=clip.config.num_positions)
  abstract_mia = nnx.eval_shape(lambda: ReleaseMIA(mia_cfg, implementation=attention_impl, dtype=dtype,
                                                   rngs=nnx.Rngs(0)))  # fmt: skip
  mia = merge_params(abstract_mia, mia_key_map(abstract_mia).to_flax(mia_state, f"{model_dir / MIA_FILE}"))

  config = MIMAFaceConfig(unet=spatial_cfg, clip=clip.config, mia=mia_cfg, motion=unet_cfg.motion, min_snr_gamma=5.0)
  return assemble(config, clip=clip, mia=mia, unet=unet)


def assemble(config: MIMAFaceConfig, *, clip, mia, unet) -> MIMAFace:
  """A MIMAFace whose three parts are the given (already loaded) modules; no parameter is initialised."""
  model = nnx.eval_shape(lambda: MIMAFace(config, dtype=unet.dtype, attention_impl=unet.attention_impl,
                                          rngs=nnx.Rngs(0)))  # fmt: skip
  for name, part in (("clip", clip), ("mia", mia), ("unet", unet)):
    want = jax_shapes(getattr(model, name))
    got = jax_shapes(part)
    if want != got:
      raise CheckpointKeyError(f"the loaded {name} does not fit the MIMAFace config: "
                               f"{sorted(set(want.items()) ^ set(got.items()))[:20]}")  # fmt: skip
    setattr(model, name, part)
  return model


def jax_shapes(module: nnx.Module) -> dict[tuple, tuple]:
  return {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def save_release_mia(mia: ReleaseMIA, path: str | os.PathLike) -> Path:
  """Writes a release MIA as the release's `mim.pth` (a torch pickle of its state dict)."""
  import torch

  state = mia_key_map(mia).to_torch(nnx.state(mia, nnx.Param))
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, str(tmp))
  os.replace(tmp, path)
  return path
