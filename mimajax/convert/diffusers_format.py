"""diffusers-format folders (config.json + safetensors or .bin) <-> mimajax NNX models.

`load_unet(folder)` / `load_vae(folder)` read what `UNet2DConditionModel.save_pretrained` /
`AutoencoderKL.save_pretrained` write; `save_unet` / `save_vae` write folders those classes'
`from_pretrained` load. Nothing is loaded partially: every key and shape is checked first, and
a folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import atomic
from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.errors import CheckpointReadError
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


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
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
  if not isinstance(sd, dict):
    raise CheckpointReadError(
      f"PyTorch checkpoint {path} holds {_describe(sd)}; expected a state dict (name -> tensor)"
    )
  out = {}
  for k, v in sd.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointReadError(
        f"PyTorch checkpoint {path}: key {k!r} holds {_describe(v)}; expected a tensor (a flat state dict, as "
        "save_pretrained writes)"
      )
    out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def _describe(value) -> str:
  """'an int (3)', 'a dict': what a value is, for a message."""
  name = type(value).__name__
  article = "an" if name[:1].lower() in "aeiou" else "a"
  shown = f" ({value!r})" if isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 40 else ""
  return f"{article} {name}{shown}"


def read_state_dict(
  folder: str | os.PathLike, weights_name: str = WEIGHTS_NAME, variant: str | None = None
) -> dict[str, np.ndarray]:
  """All tensors of a diffusers folder: single or sharded safetensors, else a .bin."""
  folder = Path(folder)
  stem = f"{weights_name}.{variant}" if variant else weights_name
  single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
  if single.is_file():
    return read_safetensors(single)
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointReadError(f"cannot read shard index {index}: {e}") from e
    out = {}
    for shard in shards:
      out.update(read_safetensors(folder / shard))
    return out
  if (folder / f"{stem}.bin").is_file():
    return _read_torch_bin(folder / f"{stem}.bin")
  raise CheckpointReadError(
    f"no weights in {folder}: expected {stem}.safetensors, {stem}.safetensors.index.json or {stem}.bin"
  )


def write_folder(
  folder: str | os.PathLike,
  config: Mapping[str, Any],
  state: Mapping[str, np.ndarray],
  weights_name: str = WEIGHTS_NAME,
  overwrite: bool = False,
  stamp_diffusers_version: bool = True,
) -> Path:
  """Writes config.json + safetensors into a temporary folder, then renames it into place.

  `stamp_diffusers_version=False` for folders that transformers (not diffusers) reads.
  """
  from safetensors.numpy import save_file

  folder = Path(folder)
  if folder.exists() and any(folder.iterdir()) and not overwrite:
    raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = atomic.temp_dir(folder)  # readable as the umask allows (tempfile.mkdtemp would make it 0700)
  try:
    cfg = dict(config)
    if stamp_diffusers_version:
      cfg.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(
      {k: np.ascontiguousarray(v) for k, v in state.items()},
      str(tmp / f"{weights_name}.safetensors"),
      metadata={"format": "pt"},
    )
    atomic.default_mode(tmp / f"{weights_name}.safetensors")  # safetensors writes 0600
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


# ----------------------------------------------------------------------------- models


def _sd1_conv_projections(config: UNetConfig) -> Callable[[str], bool]:
  """SD1.x stores the spatial transformers' proj_in/proj_out as 1x1 convs, SD2.x as linears."""
  if config.use_linear_projection:
    return lambda key: False
  return lambda key: (
    ".attentions." in key and (".proj_in." in key or ".proj_out." in key) and ".transformer_blocks." not in key
  )


@dataclasses.dataclass(frozen=True)
class Component:
  """How one model family maps onto its diffusers class."""

  model_cls: type
  config_cls: type
  renames: tuple
  conv1x1: Callable[[Any], Callable[[str], bool]] = lambda config: lambda key: False

  def key_map(self, model) -> KeyMap:
    return KeyMap(nnx.state(model, nnx.Param), self.renames, self.conv1x1(model.config), what=self.model_cls.__name__)

  def to_torch_state(self, model) -> dict[str, np.ndarray]:
    return self.key_map(model).to_torch(nnx.state(model, nnx.Param))

  def from_torch_state(
    self,
    config,
    state: Mapping[str, np.ndarray],
    *,
    dtype=jnp.float32,
    attention_impl: str | None = None,
    assumed: str = "",
  ):
    abstract = nnx.eval_shape(
      lambda: self.model_cls(config, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0))
    )
    arrays = self.key_map(abstract).to_flax(state, assumed or f"the given {self.config_cls.__name__}")
    return merge_params(abstract, arrays)

  def load(
    self,
    folder,
    *,
    dtype=jnp.float32,
    attention_impl: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
  ):
    folder = Path(folder) / subfolder if subfolder else Path(folder)
    config = self.config_cls.from_diffusers(read_config(folder))
    return self.from_torch_state(
      config,
      read_state_dict(folder, variant=variant),
      dtype=dtype,
      attention_impl=attention_impl,
      assumed=f"{folder}/config.json",
    )

  def save(self, model, folder, overwrite: bool = False) -> Path:
    return write_folder(folder, model.config.to_diffusers(), self.to_torch_state(model), overwrite=overwrite)


UNET = Component(UNet2DConditionModel, UNetConfig, UNET_RENAMES, _sd1_conv_projections)
VAE = Component(AutoencoderKL, VAEConfig, VAE_RENAMES)

unet_key_map, vae_key_map = UNET.key_map, VAE.key_map
unet_to_torch_state, vae_to_torch_state = UNET.to_torch_state, VAE.to_torch_state
unet_from_torch_state, vae_from_torch_state = UNET.from_torch_state, VAE.from_torch_state
# load_unet("sd-v1-5", subfolder="unet") reads a pipeline folder; save_unet writes what
# UNet2DConditionModel.from_pretrained loads. The same for the VAE.
load_unet, load_vae = UNET.load, VAE.load
save_unet, save_vae = UNET.save, VAE.save
