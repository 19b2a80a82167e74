"""transformers CLIP vision folders (config.json + model.safetensors / pytorch_model.bin) <-> `CLIPVisionEncoder`.

Reads what `CLIPVisionModel`, `CLIPVisionModelWithProjection` and `CLIPModel` save (transformers 4.x
and 5.x) and writes folders `CLIPVisionModelWithProjection` / `CLIPVisionModel.from_pretrained` load
with no missing or unexpected key. Keys on disk are `vision_model.<module>` plus `visual_projection.weight`
(transformers >= 5 saves a bare `CLIPVisionModel` without the `vision_model.` prefix; both are read).
Ignored on purpose, nothing else: the `position_ids` buffers older checkpoints carry (an arange, not a
weight) and, in a full CLIPModel folder, the text tower (`text_model.*`, `text_projection`, `logit_scale`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert.diffusers_format import read_config, read_state_dict, write_folder
from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.errors import CheckpointReadError
from mimajax.models.clip_vision import CLIPVisionConfig, CLIPVisionEncoder

VISION_PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"
# Where mimajax's module names differ from transformers': the shared Attention's projections, the
# tower's prefix, and transformers' `pre_layrnorm` spelling.
CLIP_RENAMES = (
  ("to_q", "q_proj"),
  ("to_k", "k_proj"),
  ("to_v", "v_proj"),
  ("to_out", "out_proj"),
  ("embeddings", "vision_model.embeddings"),
  ("encoder", "vision_model.encoder"),
  ("pre_layernorm", "vision_model.pre_layrnorm"),
  ("post_layernorm", "vision_model.post_layernorm"),
)
POSITION_ID_KEYS = ("vision_model.embeddings.position_ids", "embeddings.position_ids")
TEXT_TOWER_KEYS = ("text_projection.weight", "logit_scale")
TEXT_TOWER_PREFIX = "text_model."


def clip_key_map(model: CLIPVisionEncoder) -> KeyMap:
  """NNX parameter paths <-> on-disk keys (`vision_model.…`, `visual_projection.weight`)."""
  return KeyMap(nnx.state(model, nnx.Param), CLIP_RENAMES, what="CLIPVisionEncoder")


def clip_to_torch_state(model: CLIPVisionEncoder) -> dict[str, np.ndarray]:
  return clip_key_map(model).to_torch(nnx.state(model, nnx.Param))


def vision_state(state: Mapping[str, np.ndarray], full_clip: bool = False) -> dict[str, np.ndarray]:
  """The vision tower's tensors under their `vision_model.` keys, the documented extras dropped."""
  out = {k: v for k, v in state.items() if k not in POSITION_ID_KEYS}
  if full_clip:
    out = {k: v for k, v in out.items() if not k.startswith(TEXT_TOWER_PREFIX) and k not in TEXT_TOWER_KEYS}
  if "embeddings.class_embedding" in out and not any(k.startswith(VISION_PREFIX) for k in out):
    # A bare CLIPVisionModel saved by transformers >= 5: same tensors without the prefix.
    out = {(k if k == PROJECTION_KEY else VISION_PREFIX + k): v for k, v in out.items()}
  return out


def clip_from_torch_state(
  config: CLIPVisionConfig,
  state: Mapping[str, np.ndarray],
  *,
  with_projection: bool | None = None,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  assumed: str = "",
) -> CLIPVisionEncoder:
  """A checked model from a state dict already in `vision_state` form.

  with_projection None: as the state has `visual_projection.weight`; False: leave an existing one out.
  """
  state = dict(state)
  if with_projection is None:
    with_projection = PROJECTION_KEY in state
  elif not with_projection:
    state.pop(PROJECTION_KEY, None)  # the caller asked for the tower alone
  abstract = nnx.eval_shape(
    lambda: CLIPVisionEncoder(
      config, with_projection=with_projection, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(0)
    )
  )
  arrays = clip_key_map(abstract).to_flax(state, assumed or "the given CLIPVisionConfig")
  return merge_params(abstract, arrays)


def read_transformers_state(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a transformers folder: (sharded) model.safetensors, else pytorch_model.bin."""
  folder = Path(folder)
  if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
    return read_state_dict(folder, "model")
  if (folder / "pytorch_model.bin").is_file():
    return read_state_dict(folder, "pytorch_model")
  raise CheckpointReadError(
    f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
  )


def expects_projection(config: Mapping[str, Any]) -> bool | None:
  """Whether a folder's config.json says it has `visual_projection` (None: its architectures do not say)."""
  if "vision_config" in config:
    return True  # CLIPModel always has visual_projection
  arch = config.get("architectures") or []
  if "CLIPVisionModelWithProjection" in arch:
    return True
  if "CLIPVisionModel" in arch:
    return False
  return None


def load_clip_vision(
  folder: str | os.PathLike,
  *,
  with_projection: bool | None = None,
  dtype=jnp.float32,
  attention_impl: str | None = None,
  subfolder: str | None = None,
) -> CLIPVisionEncoder:
  """A CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel folder -> CLIPVisionEncoder, strictly checked.

  with_projection None: as the folder's architecture; False: load the tower without its projection.
  """
  folder = Path(folder) / subfolder if subfolder else Path(folder)
  raw = read_config(folder)
  try:
    config = CLIPVisionConfig.from_transformers(raw)
  except (TypeError, ValueError) as e:
    raise CheckpointReadError(f"{folder}/config.json is not a usable CLIP vision config: {e}") from e
  full_clip = "vision_config" in raw
  state = vision_state(read_transformers_state(folder), full_clip)
  expected = expects_projection(raw)
  if with_projection is None:
    with_projection = expected if expected is not None else PROJECTION_KEY in state
  return clip_from_torch_state(
    config,
    state,
    with_projection=with_projection,
    dtype=dtype,
    attention_impl=attention_impl,
    assumed=f"{folder}/config.json" + (" (CLIPModel: vision tower only)" if full_clip else ""),
  )


def save_clip_vision(model: CLIPVisionEncoder, folder: str | os.PathLike, overwrite: bool = False) -> Path:
  """Writes a folder `CLIPVisionModelWithProjection` (or `CLIPVisionModel`) `.from_pretrained` loads."""
  config = model.config.to_transformers(with_projection=model.with_projection)
  return write_folder(
    folder, config, clip_to_torch_state(model), weights_name="model", overwrite=overwrite, stamp_diffusers_version=False
  )
