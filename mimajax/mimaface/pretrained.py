"""The models a run starts from: fresh, from local pretrained folders (SD, CLIP, AnimateDiff), or a stage-1 run.

Stage 1 starts from SD1.5 (`config.model.pretrained`: a diffusers pipeline folder with unet/ and vae/;
conv_in widened to 13 inputs with the new channels zero) and CLIP ViT-L/14 (`config.model.clip_pretrained`).
Stage 2 starts from a stage-1 run (`config.train.init_from`) and AnimateDiff motion modules
(`config.model.motion_pretrained`). Nothing is downloaded: every path is a local folder or file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from mimajax import checkpointing
from mimajax.convert import animatediff_format, clip_format, diffusers_format
from mimajax.convert.state_dict import update_params
from mimajax.errors import CheckpointReadError
from mimajax.face3d.landmark_model import load_face_model, save_face_model
from mimajax.face3d.morphable_model import MorphableModel
from mimajax.face3d.synthetic import synthetic_model
from mimajax.mimaface import factory as mimaface_factory
from mimajax.mimaface import ica
from mimajax.mimaface.model import MIMAFace
from mimajax.models import factory, remat
from mimajax.models.unet_motion import MOTION_PARAMS
from mimajax.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

# Kept in a MIMAFace workdir beside the checkpoints, for inference: a VAE that was not read from a pretrained
# folder (random, e.g. tiny) and the morphable model the renders were drawn with.
VAE_DIR = "vae"
FACE_MODEL_FILE = "face_model.npz"


def build_models(config: ml_collections.ConfigDict) -> tuple[MIMAFace, AutoencoderKL]:
  """The trainable MIMAFace of config.stage and the frozen VAE, with any configured pretrained weights."""
  m = config.model
  rngs = nnx.Rngs(config.seed)
  model = mimaface_factory.build_mimaface(m, stage=config.stage, rngs=rngs, **m.objective.to_dict())
  if m.pretrained:
    vae = _load_sd(model, m)
  else:
    vae = _stage1_vae(config) or factory.build_vae(m, rngs=nnx.Rngs(config.seed + 1))  # its own stream: the
    # same random VAE for a seed whatever else is built (stage 2 must see stage 1's latent space)
  if m.clip_pretrained:
    clip = clip_format.load_clip_vision(m.clip_pretrained, dtype=factory.compute_dtype(m.dtype),
                                        attention_impl=m.attention_impl)  # fmt: skip
    update_params(model.clip, nnx.state(clip, nnx.Param), f"CLIP {m.clip_pretrained}")
  if config.stage == 2 and m.motion_pretrained:
    _load_motion(model, m)
  remat.set_remat(model.unet, m.remat)
  return model, vae


def _stage1_vae(config: ml_collections.ConfigDict) -> AutoencoderKL | None:
  """The VAE a stage-1 run (config.train.init_from) trained with, when it kept one (random VAEs are kept)."""
  if not config.train.init_from:
    return None
  workdir = checkpointing.step_folder(config.train.init_from).parent.parent
  folder = workdir / VAE_DIR
  if not folder.is_dir():
    return None
  m = config.model
  return diffusers_format.load_vae(folder, dtype=factory.compute_dtype(m.dtype), attention_impl=m.attention_impl)


def keep_vae(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """A VAE not read from a pretrained folder (random, e.g. tiny) is saved as workdir/vae/ for inference."""
  from mimajax.convert import diffusers_format

  folder = Path(workdir) / VAE_DIR
  if config.model.pretrained or folder.exists() or jax.process_index() != 0:
    return
  diffusers_format.save_vae(vae, folder)


def _load_sd(model: MIMAFace, m: ml_collections.ConfigDict) -> AutoencoderKL:
  kw = dict(dtype=factory.compute_dtype(m.dtype), attention_impl=m.attention_impl)
  root = Path(m.pretrained)
  unet = diffusers_format.load_unet(root / "unet" if (root / "unet").is_dir() else root, **kw)
  if unet.config.in_channels != ica.INPUT_CHANNELS:
    unet = ica.widen_unet_input(unet)
  update_params(model.unet, nnx.state(unet, nnx.Param), f"SD U-Net {root}")
  vae_dir = root / "vae"
  if not vae_dir.is_dir():
    raise CheckpointReadError(f"config.model.pretrained={root} has no vae/ folder (a diffusers SD pipeline folder)")
  return diffusers_format.load_vae(vae_dir, **kw)


def _load_motion(model: MIMAFace, m: ml_collections.ConfigDict) -> None:
  path = Path(m.motion_pretrained)
  spatial = model.unet.spatial_unet(attention_impl=m.attention_impl)
  if path.is_dir():
    loaded = animatediff_format.load_motion_adapter(spatial, path)
  else:
    loaded = animatediff_format.load_animatediff_checkpoint(spatial, path)
  update_params(model.unet, nnx.state(loaded, MOTION_PARAMS), f"motion modules {path}")


def init_params_from(source: str | os.PathLike, params: nnx.State, group: str) -> nnx.State:
  """`params` with every parameter a stage-1 run (workdir or step folder) also has replaced by its value.

  Stage 2's U-Net has the stage-1 U-Net's parameters at the same paths plus motion modules, so
  the spatial U-Net, CLIP and MIA come from stage 1 and the motion modules stay as initialised.
  """
  flat_old = checkpointing.checkpoint_params(source, group)
  leaves, taken = [], 0
  for path, var in nnx.to_flat_state(params):
    key = tuple(str(p) for p in path)
    value = var[...]
    if key in flat_old:
      if np.shape(flat_old[key]) != np.shape(value):
        raise CheckpointReadError(f"{'/'.join(key)} has shape {np.shape(flat_old[key])} in {source}, "
                                  f"expected {np.shape(value)}")  # fmt: skip
      value = jax.device_put(flat_old[key], value.sharding)
      taken += 1
    leaves.append((path, var.replace(value)))
  if taken == 0:
    raise CheckpointReadError(f"{source} shares no parameter with this model; is it a MIMAFace run?")
  log.info("initialised %d of %d parameters from %s", taken, len(leaves), source)
  return nnx.from_flat_state(leaves)


def face_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> MorphableModel:
  """The morphable model renders are drawn with: config.data.face_model, the dataset's face_model.npz, or synthetic.

  The chosen one is copied into the workdir so inference renders driving coefficients the same way.
  """

  path = config.data.face_model or str(Path(config.data.path) / FACE_MODEL_FILE)
  in_workdir = Path(workdir) / FACE_MODEL_FILE
  if in_workdir.exists():
    return load_face_model(in_workdir)
  if Path(path).exists():
    model = load_face_model(path)
  elif config.data.face_model:
    raise ValueError(f"config.data.face_model={config.data.face_model} does not exist")
  else:
    log.warning("no face_model.npz in %s: rendering with the synthetic morphable model", config.data.path)
    model = synthetic_model()
  if jax.process_index() == 0:
    save_face_model(model, in_workdir)
  return model
