"""The models a run starts from: fresh, from local pretrained folders (SD, CLIP, AnimateDiff), or a stage-1 run.

Stage 1 starts from SD1.5 (`config.model.pretrained`: a diffusers pipeline folder with unet/ and vae/;
conv_in widened to 13 inputs with the new channels zero) and CLIP ViT-L/14 (`config.model.clip_pretrained`).
Stage 2 starts from a stage-1 run (`config.train.init_from`) and AnimateDiff motion modules
(`config.model.motion_pretrained`). Nothing is downloaded: every path is a local folder or file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from mimajax.mimaface import ica, vae_stage
from mimajax.mimaface.model import MIMAFace
from mimajax.models import factory, remat
from mimajax.models.unet_motion import MOTION_PARAMS
from mimajax.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

# Kept in a MIMAFace workdir beside the checkpoints, for inference: a VAE that was not read from a pretrained
# folder (random, e.g. tiny) and the morphable model the renders were drawn with.
VAE_DIR = "vae"
FACE_MODEL_FILE = "face_model.npz"


def build_models(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None
                 ) -> tuple[MIMAFace, AutoencoderKL]:  # fmt: skip
  """The trainable MIMAFace of config.stage and the frozen VAE, with any configured pretrained weights.

  The VAE, first that applies: SD's (config.model.pretrained); a resumed run's own workdir/vae/ (what it trained
  with, whatever config.model.vae_from holds by now); the earlier stage's (config.train.init_from: stage 2 must see
  stage 1's latent space); a trained VAE-stage run's (config.model.vae_from); a random one.
  """
  m = config.model
  rngs = nnx.Rngs(config.seed)
  model = mimaface_factory.build_mimaface(m, stage=config.stage, rngs=rngs, **m.objective.to_dict())
  if m.pretrained:
    vae = _load_sd(model, m)
  else:
    vae = _resumed_vae(config, workdir) or _stage1_vae(config) or _trained_vae(config)
    vae = vae or factory.build_vae(m, rngs=nnx.Rngs(config.seed + 1))  # its own stream: the same random VAE
    # for a seed whatever else is built
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


def _resumed_vae(config: ml_collections.ConfigDict, workdir) -> AutoencoderKL | None:
  """A workdir with checkpoints continues with the VAE it kept (keep_vae), not whatever its sources hold now."""
  if workdir is None or not checkpointing.saved_steps(workdir) or not (Path(workdir) / VAE_DIR).is_dir():
    return None
  m = config.model
  log.info("VAE: %s (the one this run trained with)", Path(workdir) / VAE_DIR)
  return diffusers_format.load_vae(Path(workdir) / VAE_DIR, dtype=factory.compute_dtype(m.dtype),
                                   attention_impl=m.attention_impl)  # fmt: skip


def _trained_vae(config: ml_collections.ConfigDict) -> AutoencoderKL | None:
  """The VAE of a VAE-stage run or a diffusers VAE folder (config.model.vae_from), when one is named."""
  source = config.model.get("vae_from")
  if not source:
    return None
  vae = vae_stage.load_vae(source, config.model)
  log.info("VAE: %s (scaling_factor %.4f)", vae_stage.vae_folder(source), vae.config.scaling_factor)
  return vae


def keep_vae(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """A VAE not read from a pretrained folder (random, trained by the VAE stage, an earlier stage's) is saved as
  workdir/vae/: inference, the next stage and a resumed run read it there. Once the workdir has checkpoints it is
  the record of what the run trained with and is never replaced; before that (a failed start) it is."""
  folder = Path(workdir) / VAE_DIR
  if config.model.pretrained or jax.process_index() != 0:
    return
  if folder.exists() and checkpointing.saved_steps(workdir):
    return
  diffusers_format.save_vae(vae, folder, overwrite=True)


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

  A file's model is copied into the workdir so inference renders driving coefficients the same way; the
  synthetic fallback is not (inference falls back to the same synthetic model). workdir/face_model.json
  records where the model came from and a digest of its arrays. Once the workdir has checkpoints, a rerun
  whose model differs (another file, or a dataset that has a face model where the run rendered with the
  synthetic one) is refused: its renders would not be the ones the run trained on. Before the first
  checkpoint nothing was trained with it, so the record is simply replaced.
  """
  source = config.data.face_model or str(Path(config.data.path) / FACE_MODEL_FILE)
  if Path(source).exists():
    model, origin = load_face_model(source), str(Path(source).absolute())
  elif config.data.face_model:
    raise ValueError(f"config.data.face_model={config.data.face_model} does not exist")
  else:
    log.warning("no face_model.npz in %s: rendering with the synthetic morphable model", config.data.path)
    model, origin = synthetic_model(), SYNTHETIC
  wanted = {"source": origin, "digest": face_model_digest(model)}
  workdir = Path(workdir)
  in_workdir, record_path = workdir / FACE_MODEL_FILE, workdir / FACE_MODEL_RECORD
  if checkpointing.saved_steps(workdir):
    recorded = _recorded_face_model(record_path, in_workdir)
    if recorded["digest"] != wanted["digest"]:
      keep = (f"; to continue it as it was, pass --config.data.face_model={in_workdir}"
              if recorded["source"] != SYNTHETIC and in_workdir.exists() else "")  # fmt: skip
      raise ValueError(
        f"{workdir} was trained with the morphable model {_describe(recorded)}, but this config renders with "
        f"{_describe(wanted)} (config.data.path / config.data.face_model): continuing would change the renders "
        f"the model is conditioned on. Nothing was changed{keep}; to start a new run from it, use a new "
        f"--workdir with --config.train.init_from={workdir}"
      )
  if jax.process_index() == 0:
    if origin == SYNTHETIC:
      in_workdir.unlink(missing_ok=True)  # a fallback is never kept as if it were the data's
    else:
      save_face_model(model, in_workdir)
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(wanted, indent=1))
    os.replace(tmp, record_path)
  return model


SYNTHETIC = "synthetic"
FACE_MODEL_RECORD = "face_model.json"  # where the workdir's face model came from, and its digest


def face_model_digest(model: MorphableModel) -> str:
  """SHA-256 over a MorphableModel's arrays (name, dtype, shape, bytes): equal for a file and its workdir copy."""
  digest = hashlib.sha256()
  for field in dataclasses.fields(model):
    value = getattr(model, field.name)
    if value is None:
      continue
    x = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{field.name}:{x.dtype.str}:{x.shape};".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def _recorded_face_model(record_path: Path, in_workdir: Path) -> dict:
  """The workdir's record; for a workdir from before records, its face_model.npz (what an older run rendered
  with, whether copied from the data or its synthetic fallback), else the synthetic model."""
  if record_path.exists():
    return json.loads(record_path.read_text())
  if in_workdir.exists():
    return {"source": f"{in_workdir} (an earlier run's copy, source not recorded)",
            "digest": face_model_digest(load_face_model(in_workdir))}  # fmt: skip
  return {"source": SYNTHETIC, "digest": face_model_digest(synthetic_model())}


def _describe(record: dict) -> str:
  if record["source"] == SYNTHETIC:
    return "'synthetic' (there was no face_model.npz in the data)"
  return f"{record['source']} (digest {record['digest'][:12]})"
