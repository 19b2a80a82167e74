"""diffusers-format folders (config.json + safetensors or .bin) <-> mimajax NNX models.

`load_unet(folder)` / `load_vae(folder)` read what `UNet2DConditionModel.save_pretrained` /
`AutoencoderKL.save_pretrained` write; `save_unet` / `save_vae` write folders those classes'
`from_pretrained` load. Nothing is loaded partially: every key and shape is checked first, and
a folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert.errors import CheckpointReadError
from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model"
DIFFUSERS_VERSION = "0.30.0"  # written into config.json; any diffusers >= this reads these folders

# Where mimajax's module names differ from diffusers' (diffusers wraps some layers in lists).
UNET_RENAMES = (("to_out", "to_out.0"), ("ff.proj_in", "ff.net.0.proj"), ("ff.proj_out", "ff.net.2"))
VAE_RENAMES = (("to_out", "to_out.0"),)


# ----------------------------------------------------------------------------- reading / writing

def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointReadError(f"{folder} is not a diffusers model folder: no config.json")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointReadError(f"cannot read {path}: {e}") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointReadError(f"cannot read safetensors file {path}: {e}") from e
  except TypeError as e:  # bf16 tensors: numpy has no bf16, so go through ml_dtypes by hand
    raise CheckpointReadError(f"cannot read {path} as numpy ({e}); convert it to fp32/fp16 first") from e


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # only for legacy .bin checkpoints
  except ImportError as e:
    raise CheckpointReadError(f"{path} is a PyTorch pickle; install the torch extra to read it") from e
  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt pickles
    raise CheckpointReadError(f"cannot read PyTorch checkpoint {path}: {e}") from e
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def read_state_dict(folder: str | os.PathLike, weights_name: str = WEIGHTS_NAME,
                    variant: str | None = None) -> dict[str, np.ndarray]:
  """All tensors of a diffusers folder: single or sharded safetensors, else a .bin."""
  folder = Path(folder)
  stem = f"{weights_name}.{variant}" if variant else weights_name
  single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
  if single.is_file():
    return _read_safetensors(single)
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointReadError(f"cannot read shard index {index}: {e}") from e
    out = {}
    for shard in shards:
      out.update(_read_safetensors(folder / shard))
    return out
  if (folder / f"{stem}.bin").is_file():
    return _read_torch_bin(folder / f"{stem}.bin")
  raise CheckpointReadError(
      f"no weights in {folder}: expected {stem}.safetensors, {stem}.safetensors.index.json or {stem}.bin")


def write_folder(folder: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                 weights_name: str = WEIGHTS_NAME, overwrite: bool = False) -> Path:
  """Writes config.json + safetensors into a temporary folder, then renames it into place."""
  from safetensors.numpy import save_file
  folder = Path(folder)
  if folder.exists() and any(folder.iterdir()) and not overwrite:
    raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  try:
    cfg = dict(config)
    cfg.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / f"{weights_name}.safetensors"),
              metadata={"format": "pt"})
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


# ----------------------------------------------------------------------------- U-Net

def unet_key_map(model: UNet2DConditionModel) -> KeyMap:
  cfg = model.config
  # SD1.x stores the spatial transformers' proj_in/proj_out as 1x1 convs, SD2.x as linears.
  conv1x1 = (lambda key: False) if cfg.use_linear_projection else (
      lambda key: ".attentions." in key and (".proj_in." in key or ".proj_out." in key)
      and ".transformer_blocks." not in key)
  return KeyMap(nnx.state(model, nnx.Param), UNET_RENAMES, conv1x1, what="UNet2DConditionModel")


def unet_to_torch_state(model: UNet2DConditionModel) -> dict[str, np.ndarray]:
  return unet_key_map(model).to_torch(nnx.state(model, nnx.Param))


def unet_from_torch_state(config: UNetConfig, state: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                          attention_impl: str | None = None, assumed: str = "") -> UNet2DConditionModel:
  abstract = nnx.eval_shape(lambda: UNet2DConditionModel(config, dtype=dtype, attention_impl=attention_impl,
                                                         rngs=nnx.Rngs(0)))
  arrays = unet_key_map(abstract).to_flax(state, assumed or "the given UNetConfig")
  return merge_params(abstract, arrays)


def load_unet(folder: str | os.PathLike, *, dtype=jnp.float32, attention_impl: str | None = None,
              subfolder: str | None = None, variant: str | None = None) -> UNet2DConditionModel:
  """A diffusers `UNet2DConditionModel` folder (or a pipeline folder with subfolder='unet')."""
  folder = Path(folder) / subfolder if subfolder else Path(folder)
  config = UNetConfig.from_diffusers(read_config(folder))
  return unet_from_torch_state(config, read_state_dict(folder, variant=variant), dtype=dtype,
                               attention_impl=attention_impl, assumed=f"{folder}/config.json")


def save_unet(model: UNet2DConditionModel, folder: str | os.PathLike, overwrite: bool = False) -> Path:
  return write_folder(folder, model.config.to_diffusers(), unet_to_torch_state(model), overwrite=overwrite)


# ----------------------------------------------------------------------------- VAE

def vae_key_map(model: AutoencoderKL) -> KeyMap:
  return KeyMap(nnx.state(model, nnx.Param), VAE_RENAMES, what="AutoencoderKL")


def vae_to_torch_state(model: AutoencoderKL) -> dict[str, np.ndarray]:
  return vae_key_map(model).to_torch(nnx.state(model, nnx.Param))


def vae_from_torch_state(config: VAEConfig, state: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                         attention_impl: str | None = None, assumed: str = "") -> AutoencoderKL:
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, attention_impl=attention_impl,
                                                  rngs=nnx.Rngs(0)))
  arrays = vae_key_map(abstract).to_flax(state, assumed or "the given VAEConfig")
  return merge_params(abstract, arrays)


def load_vae(folder: str | os.PathLike, *, dtype=jnp.float32, attention_impl: str | None = None,
             subfolder: str | None = None, variant: str | None = None) -> AutoencoderKL:
  folder = Path(folder) / subfolder if subfolder else Path(folder)
  config = VAEConfig.from_diffusers(read_config(folder))
  return vae_from_torch_state(config, read_state_dict(folder, variant=variant), dtype=dtype,
                              attention_impl=attention_impl, assumed=f"{folder}/config.json")


def save_vae(model: AutoencoderKL, folder: str | os.PathLike, overwrite: bool = False) -> Path:
  return write_folder(folder, model.config.to_diffusers(), vae_to_torch_state(model), overwrite=overwrite)
