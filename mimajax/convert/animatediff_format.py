"""AnimateDiff motion modules and diffusers' UNetMotionModel <-> mimajax `UNetMotionModel`.

Three on-disk layouts:
  * a diffusers `UNetMotionModel` folder (`load_unet_motion` / `save_unet_motion`);
  * a diffusers `MotionAdapter` folder, combined with an SD U-Net (folder or in-memory model) for the spatial
    weights (`load_motion_adapter` / `save_motion_adapter`);
  * the original AnimateDiff checkpoint (`mm_sd_v15_v3.ckpt`, or .safetensors), whose keys differ from the
    adapter's by `ORIGINAL_RENAMES` (`load_animatediff_checkpoint` / `save_animatediff_checkpoint`).

Positional tables: diffusers stores `...transformer_blocks.k.pos_embed.pe` (1, max_seq_length, C) and the
original stores the same table as `...attention_blocks.{0,1}.pos_encoder.pe`. They are not parameters here:
mimajax recomputes the sinusoidal table, so on loading each table is checked (shape, and values against the
sinusoid, so a checkpoint with learned or edited positions is refused rather than silently replaced) and
dropped; on saving the tables are written so that diffusers / AnimateDiff load the files strictly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import atomic
from mimajax.convert.diffusers_format import (
  UNET,
  UNET_RENAMES,
  read_config,
  read_safetensors,
  read_state_dict,
  write_folder,
)
from mimajax.convert.state_dict import KeyMap, key_error, merge_params
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.models.motion_module import sinusoidal_positions
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig, UNetMotionConfig, UNetMotionModel

# Motion modules are named as diffusers names them; they only share the 2D U-Net's list wrappers
# (attn.to_out -> to_out.0, ff.proj_in -> ff.net.0.proj, ff.proj_out -> ff.net.2).
MOTION_UNET_RENAMES = UNET_RENAMES
# Key maps only: use load_unet_motion / save_unet_motion, which also handle the positional tables.
UNET_MOTION = dataclasses.replace(
  UNET, model_cls=UNetMotionModel, config_cls=UNetMotionConfig, renames=MOTION_UNET_RENAMES
)

# (diffusers fragment, original AnimateDiff fragment), replaced between dots; from diffusers'
# scripts/convert_animatediff_motion_module_to_diffusers.py (= single_file_utils'
# convert_animatediff_checkpoint_to_diffusers). Besides these, the original nests each module's transformer
# one level deeper: `motion_modules.<j>.temporal_transformer.<...>` (see `_ORIGINAL_NESTING`).
ORIGINAL_RENAMES = (
  ("attn1", "attention_blocks.0"),
  ("attn2", "attention_blocks.1"),
  ("norm1", "norms.0"),
  ("norm2", "norms.1"),
  ("norm3", "ff_norm"),
)
_ORIGINAL_NESTING = (r"(motion_modules\.\d+)\.(?!temporal_transformer\.)", r"\1.temporal_transformer.")
_DIFFUSERS_PE = re.compile(r"^(.*\.motion_modules\.\d+\.transformer_blocks\.\d+)\.pos_embed\.pe$")
_ORIGINAL_PE = re.compile(
  r"^(.*\.motion_modules\.\d+)\.temporal_transformer\.(transformer_blocks\.\d+)\.attention_blocks\.\d+\.pos_encoder\.pe$"
)
PE_TOLERANCE = 2e-3  # fp16 checkpoints store the table to ~5e-4


def _rename(key: str, renames, to_original: bool) -> str:
  padded = f".{key}."
  for diffusers, original in renames:
    old, new = (diffusers, original) if to_original else (original, diffusers)
    padded = padded.replace(f".{old}.", f".{new}.")
  return padded[1:-1]


def motion_state_to_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers MotionAdapter / UNetMotionModel motion keys -> original AnimateDiff keys (tables duplicated)."""
  out = {}
  for key, value in state.items():
    pe = _DIFFUSERS_PE.match(key)
    if pe:  # the original keeps one copy of the table in each of the two attention blocks
      for a in (0, 1):
        block = re.sub(*_ORIGINAL_NESTING, pe.group(1) + ".")
        out[f"{block}attention_blocks.{a}.pos_encoder.pe"] = value
      continue
    if ".motion_modules." not in f".{key}":
      raise CheckpointKeyError(f"{key} is not a motion-module key; the AnimateDiff layout holds only those")
    out[re.sub(*_ORIGINAL_NESTING, _rename(key, ORIGINAL_RENAMES, to_original=True))] = value
  return out


def motion_state_from_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original AnimateDiff motion keys -> diffusers MotionAdapter keys (one positional table per block kept)."""
  out = {}
  for key, value in state.items():
    pe = _ORIGINAL_PE.match(key)
    if pe:  # two copies of one table (attention_blocks.0 and .1): keep one, refuse if they disagree
      table = f"{pe.group(1)}.{pe.group(2)}.pos_embed.pe"
      if table in out and (np.shape(out[table]) != np.shape(value) or not np.array_equal(out[table], value)):
        raise CheckpointKeyError(f"{key} differs from the other attention block's positional table")
      out[table] = value
      continue
    out[_rename(key.replace(".temporal_transformer.", "."), ORIGINAL_RENAMES, to_original=False)] = value
  return out


# ----------------------------------------------------------------------------- positional tables


def _positional_keys(key_map: KeyMap) -> dict[str, int]:
  """diffusers pe key -> channel count, one per temporal transformer block of the model."""
  suffix = ".norm1.weight"
  return {
    k[: -len(suffix)] + ".pos_embed.pe": tshape[0]
    for k, (_, _, tshape) in key_map.entries.items()
    if ".motion_modules." in k and k.endswith(suffix)
  }


def check_and_drop_positions(
  state: Mapping[str, np.ndarray], key_map: KeyMap, max_seq_length: int, assumed: str = ""
) -> dict[str, np.ndarray]:
  """The state without its positional tables, after the full key check (tables included) passes."""
  tables = _positional_keys(key_map)
  rest = {k: v for k, v in state.items() if k not in tables}
  missing, unexpected, mismatched = [], [], []
  try:
    key_map.check(rest, assumed)
  except CheckpointKeyError as e:
    missing, unexpected, mismatched = e.missing, e.unexpected, e.mismatched
  wrong_values = []
  for key, channels in tables.items():
    if key not in state:
      continue  # deterministic; a state without tables (e.g. pruned) loses nothing
    want = (1, max_seq_length, channels)
    if tuple(np.shape(state[key])) != want:
      mismatched = list(mismatched) + [(key, want, tuple(np.shape(state[key])))]
    elif (
      np.abs(np.asarray(state[key], np.float32)[0] - sinusoidal_positions(max_seq_length, channels)).max()
      > PE_TOLERANCE
    ):
      wrong_values.append(key)
  if missing or unexpected or mismatched:
    raise key_error(key_map.what, missing, unexpected, mismatched, assumed)
  if wrong_values:
    raise CheckpointKeyError(
      f"{key_map.what}: positional tables {wrong_values[:4]}{' ...' if len(wrong_values) > 4 else ''} are not "
      "the sinusoidal table AnimateDiff uses; mimajax recomputes positions, so it cannot load learned or edited "
      "ones. Nothing was loaded."
    )
  return rest


def _positional_tables(key_map: KeyMap, max_seq_length: int) -> dict[str, np.ndarray]:
  return {k: sinusoidal_positions(max_seq_length, c)[None] for k, c in _positional_keys(key_map).items()}


# ----------------------------------------------------------------------------- UNetMotionModel folders


def unet_motion_from_torch_state(
  config: UNetMotionConfig,
  state: Mapping[str, np.ndarray],
  *,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  assumed: str = "",
) -> UNetMotionModel:
  """A checked, complete UNetMotionModel from a diffusers UNetMotionModel state dict (numpy)."""
  abstract = nnx.eval_shape(
    lambda: UNetMotionModel(config, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0))
  )
  key_map = UNET_MOTION.key_map(abstract)
  assumed = assumed or "the given UNetMotionConfig"
  rest = check_and_drop_positions(state, key_map, config.motion.max_seq_length, assumed)
  return merge_params(abstract, key_map.to_flax(rest, assumed))


def unet_motion_to_torch_state(model: UNetMotionModel) -> dict[str, np.ndarray]:
  """The diffusers UNetMotionModel state dict, positional tables included."""
  key_map = UNET_MOTION.key_map(model)
  tables = _positional_tables(key_map, model.config.motion.max_seq_length)
  return {**key_map.to_torch(nnx.state(model, nnx.Param)), **tables}


def load_unet_motion(
  folder,
  *,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  subfolder: str | None = None,
  variant: str | None = None,
) -> UNetMotionModel:
  """Reads what diffusers' `UNetMotionModel.save_pretrained` writes."""
  folder = Path(folder) / subfolder if subfolder else Path(folder)
  config = UNetMotionConfig.from_diffusers(read_config(folder))
  state = read_state_dict(folder, variant=variant)
  return unet_motion_from_torch_state(
    config, state, dtype=dtype, attention_impl=attention_impl, assumed=f"{folder}/config.json"
  )


def save_unet_motion(model: UNetMotionModel, folder, overwrite: bool = False) -> Path:
  """Writes a folder diffusers' `UNetMotionModel.from_pretrained` loads."""
  return write_folder(folder, model.config.to_diffusers(), unet_motion_to_torch_state(model), overwrite=overwrite)


# ----------------------------------------------------------------------------- MotionAdapter / AnimateDiff


def motion_config_from_adapter(adapter: Mapping[str, Any], unet: UNetConfig) -> MotionConfig:
  """The MotionConfig of a diffusers MotionAdapter config.json, checked against the U-Net it is put into."""
  n = len(unet.block_out_channels)
  problems = []
  if tuple(adapter.get("block_out_channels", ())) != unet.block_out_channels:
    problems.append(f"block_out_channels {adapter.get('block_out_channels')} != the U-Net's {unet.block_out_channels}")
  layers = adapter.get("motion_layers_per_block", 2)
  if (tuple(layers) if isinstance(layers, (list, tuple)) else (layers,) * n) != unet.layers_per_block:
    problems.append(f"motion_layers_per_block {layers} != the U-Net's layers_per_block {unet.layers_per_block}")
  if adapter.get("motion_norm_num_groups", 32) != unet.norm_num_groups:
    problems.append(f"motion_norm_num_groups {adapter.get('motion_norm_num_groups')} != {unet.norm_num_groups}")
  if adapter.get("motion_mid_block_layers_per_block", 1) != 1:
    problems.append("motion_mid_block_layers_per_block must be 1")
  if adapter.get("conv_in_channels"):
    problems.append(f"conv_in_channels={adapter['conv_in_channels']} (an adapter with its own conv_in) is unsupported")
  if problems:
    raise ValueError("MotionAdapter does not fit the U-Net: " + "; ".join(problems))
  mid = adapter.get("motion_transformer_layers_per_mid_block", 1)
  return MotionConfig(
    num_attention_heads=adapter.get("motion_num_attention_heads", 8),
    transformer_layers_per_block=adapter.get("motion_transformer_layers_per_block", 1),
    transformer_layers_per_mid_block=mid[0] if isinstance(mid, (list, tuple)) else mid,
    max_seq_length=adapter.get("motion_max_seq_length", 32),
    use_motion_mid_block=adapter.get("use_motion_mid_block", True),
  )


def motion_config_from_original(
  state: Mapping[str, np.ndarray], unet: UNetConfig, num_attention_heads=8
) -> MotionConfig:
  """What an original AnimateDiff checkpoint's keys say: mid block, layers per module, table length.

  The head count is not visible in the weights; every released SD1.5 module (v1, v2, v3) uses 8.
  """

  def layers(module: str) -> int:
    pattern = re.compile(rf"{re.escape(module)}\.temporal_transformer\.transformer_blocks\.(\d+)\.")
    return max(len({m.group(1) for m in map(pattern.match, state) if m}), 1)

  tables = [np.shape(v) for k, v in state.items() if _ORIGINAL_PE.match(k)]
  return MotionConfig(
    num_attention_heads=num_attention_heads,
    transformer_layers_per_block=tuple(
      layers(f"down_blocks.{i}.motion_modules.0") for i in range(len(unet.block_out_channels))
    ),
    transformer_layers_per_mid_block=layers("mid_block.motion_modules.0"),
    max_seq_length=int(tables[0][1]) if tables and len(tables[0]) == 3 else 32,
    use_motion_mid_block=any(k.startswith("mid_block.motion_modules.") for k in state),
  )


def _spatial_state(unet: UNet2DConditionModel | str | os.PathLike, subfolder, variant):
  """(UNetConfig, diffusers UNet2DConditionModel state dict) of a U-Net folder or an in-memory model."""
  if isinstance(unet, UNetMotionModel):  # replacing the motion modules of a video U-Net
    unet = unet.spatial_unet()
  if isinstance(unet, UNet2DConditionModel):
    return unet.config, UNET.to_torch_state(unet)
  folder = Path(unet) / subfolder if subfolder else Path(unet)
  return UNetConfig.from_diffusers(read_config(folder)), read_state_dict(folder, variant=variant)


def _combine(config: UNetMotionConfig, spatial: dict, motion: Mapping[str, np.ndarray], where: str, **kw):
  """Spatial + motion-module state -> model, refusing motion files that carry anything but motion modules."""
  stray = sorted(k for k in motion if ".motion_modules." not in f".{k}")
  if stray:
    raise CheckpointKeyError(f"{where} has keys outside the motion modules (nothing was loaded): {stray[:20]}")
  return unet_motion_from_torch_state(config, {**spatial, **motion}, assumed=where, **kw)


def load_motion_adapter(
  unet: UNet2DConditionModel | str | os.PathLike,
  adapter_folder,
  *,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  unet_subfolder: str | None = None,
  variant: str | None = None,
) -> UNetMotionModel:
  """SD U-Net (folder or model) + diffusers MotionAdapter folder -> UNetMotionModel (diffusers' from_unet2d)."""
  unet_cfg, spatial = _spatial_state(unet, unet_subfolder, variant)
  config = UNetMotionConfig.from_unet(unet_cfg, motion_config_from_adapter(read_config(adapter_folder), unet_cfg))
  motion = read_state_dict(adapter_folder, variant=variant)
  return _combine(
    config, spatial, motion, f"MotionAdapter {adapter_folder}", dtype=dtype, attention_impl=attention_impl
  )


def _motion_state(model: UNetMotionModel) -> dict[str, np.ndarray]:
  return {k: v for k, v in unet_motion_to_torch_state(model).items() if ".motion_modules." in f".{k}"}


def save_motion_adapter(model: UNetMotionModel, folder, overwrite: bool = False) -> Path:
  """Writes the motion modules as a folder diffusers' `MotionAdapter.from_pretrained` loads."""
  cfg, m = model.config, model.config.motion
  config = {
    "_class_name": "MotionAdapter",
    "block_out_channels": list(cfg.block_out_channels),
    "motion_layers_per_block": list(cfg.layers_per_block),
    "motion_transformer_layers_per_block": list(m.transformer_layers_per_block),
    "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": m.transformer_layers_per_mid_block,
    "motion_num_attention_heads": list(m.num_attention_heads),
    "motion_norm_num_groups": cfg.norm_num_groups,
    "motion_max_seq_length": m.max_seq_length,
    "use_motion_mid_block": m.use_motion_mid_block,
    "conv_in_channels": None,
  }
  return write_folder(folder, config, _motion_state(model), overwrite=overwrite)


def read_animatediff_checkpoint(path) -> dict[str, np.ndarray]:
  """The tensors of an original AnimateDiff motion-module file (.safetensors, or a torch .ckpt/.pt/.pth)."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointReadError(f"no AnimateDiff checkpoint at {path}")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  import torch  # pickled checkpoints only

  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt pickles
    raise CheckpointReadError(f"cannot read PyTorch checkpoint {path}: {e}") from e
  sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
  if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
    raise CheckpointReadError(f"{path} is not a state dict of tensors")
  return {k: v.float().numpy() for k, v in sd.items()}


def load_animatediff_checkpoint(
  unet: UNet2DConditionModel | str | os.PathLike,
  path,
  *,
  num_attention_heads: int = 8,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  unet_subfolder: str | None = None,
  variant: str | None = None,
) -> UNetMotionModel:
  """SD U-Net (folder or model) + original AnimateDiff motion-module file (e.g. mm_sd_v15_v3.ckpt)."""
  unet_cfg, spatial = _spatial_state(unet, unet_subfolder, variant)
  original = read_animatediff_checkpoint(path)
  config = UNetMotionConfig.from_unet(unet_cfg, motion_config_from_original(original, unet_cfg, num_attention_heads))
  where = f"AnimateDiff checkpoint {path} (keys in diffusers naming; ORIGINAL_RENAMES maps them)"
  motion = motion_state_from_original(original)
  return _combine(config, spatial, motion, where, dtype=dtype, attention_impl=attention_impl)


def save_animatediff_checkpoint(model: UNetMotionModel, path) -> Path:
  """Writes the motion modules in the original AnimateDiff layout (.safetensors, else a torch pickle)."""
  path = Path(path)
  state = motion_state_to_original(_motion_state(model))
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".safetensors":
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    atomic.default_mode(path)  # safetensors writes 0600
  else:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, str(path))
  return path
