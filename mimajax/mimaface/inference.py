"""A trained MIMAFace ready to animate, from any of the places one lives: a training workdir, a checkpoint
step folder, a `mimajax export` folder, or the official release folder.

The one loader `animate`, `export` and the parity check use. Workdirs written before parameter groups
(mimajax's first training layout) load too: their parameters are the one "model" group.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mimajax import checkpointing
from mimajax.convert import animatediff_format, clip_format, diffusers_format
from mimajax.convert.state_dict import merge_params
from mimajax.diffusion import schedulers
from mimajax.errors import CheckpointReadError
from mimajax.face3d.landmark_model import load_face_model
from mimajax.face3d.synthetic import synthetic_model
from mimajax.mimaface import export, face_features, ica, release_format
from mimajax.mimaface import factory as mimaface_factory
from mimajax.mimaface.mia import build_mia
from mimajax.mimaface.pretrained import FACE_MODEL_FILE, VAE_DIR
from mimajax.mimaface.sampling import SamplerConfig

# The parameter group a MIMAFace run trains (one group: U-Net, CLIP and MIA together).
GROUP = "model"


# The release's infer_video.py: 12-frame clips (video_length), EulerDiscreteScheduler from SD1.5's config (linspace
# spacing), 25 steps, guidance 5.0; the unconditional branch is zeros, as ours always is (sampling.py).
RELEASE_CLIP_FRAMES = 12
RELEASE_SAMPLER = SamplerConfig(
  scheduler="euler", num_inference_steps=25, guidance_scale=5.0, timestep_spacing="linspace"
)


@dataclasses.dataclass
class Inference:
  """A trained model ready to animate: MIMAFace, the VAE, the renderer's face model, the noise schedule."""

  model: Any  # MIMAFace
  vae: Any  # AutoencoderKL
  face_model: Any  # MorphableModel (None: an export folder that holds none)
  schedule: Any  # NoiseSchedule
  config: Any  # the training config (ml_collections), or None for release and export folders
  resolution: int  # frame pixels
  num_frames: int  # clip length F
  ica_frames: int  # k: frames of the previous clip each clip conditions on
  sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)  # the sampler defaults it was saved with
  face_features: Any = None  # release folders: FaceFeatures (source crop -> the MIA's 25088 CurricularFace values)


def load_inference(path: str | os.PathLike, *, use_ema: bool = True, vae_dir: str | os.PathLike | None = None,
                   face_model_path: str | os.PathLike | None = None, dtype=None,
                   attention_impl: str | None = None) -> Inference:  # fmt: skip
  """A training workdir / step folder (Orbax), an export folder or an official release folder -> Inference.

  Release folders hold no VAE: pass `vae_dir` (a diffusers VAE or SD pipeline folder) and the morphable
  model their coefficients use (`face_model_path`). `dtype` / `attention_impl` apply to export folders.
  """
  path = Path(path)
  if not path.exists():
    raise CheckpointReadError(f"checkpoint {path} does not exist")
  if (path / "mim.pth").exists() or (path / "3dunet.pth").exists():
    return _load_release(path, vae_dir, face_model_path)
  if (path / export.CONFIG_FILE).is_file():
    return _load_export(path, face_model_path, dtype=dtype, attention_impl=attention_impl)
  workdir = checkpointing.step_folder(path).parent.parent
  config = checkpointing.read_config(workdir)
  if config.get("stage") == "vae":  # its checkpoints hold only an autoencoder
    raise CheckpointReadError(f"{workdir} is a VAE-stage run; animate a stage-1/2 run trained with "
                              f"--config.model.vae_from={workdir}")  # fmt: skip
  abstract = nnx.eval_shape(lambda: mimaface_factory.build_mimaface(config.model, stage=config.stage, rngs=nnx.Rngs(0),
                                                                   **config.model.objective.to_dict()))  # fmt: skip
  # a workdir: its newest step whose parameters are intact (a damaged newer one is named in a warning)
  step_dir, params = checkpointing.intact_params(path, GROUP, ema=use_ema)
  model = merge_params(abstract, params, where=f"{step_dir}")
  vae = _load_vae(vae_dir or (workdir / VAE_DIR if (workdir / VAE_DIR).is_dir() else None), config)
  fm_path = Path(face_model_path) if face_model_path else workdir / FACE_MODEL_FILE
  face_model = load_face_model(fm_path) if fm_path.exists() else synthetic_model()
  frames = int(config.data.num_frames)
  sample = config.get("sample") or {}
  return Inference(
    model=model,
    vae=vae,
    face_model=face_model,
    schedule=schedulers.make_noise_schedule(**config.noise_schedule.to_dict()),
    config=config,
    resolution=int(config.data.resolution),
    num_frames=frames,
    ica_frames=ica.inference_overlap(frames),
    sampler=SamplerConfig.from_config(sample),
  )


def _load_vae(vae_dir, config):
  if vae_dir is None and config is not None and config.model.pretrained:
    vae_dir = Path(config.model.pretrained) / VAE_DIR
  if vae_dir is None:
    raise CheckpointReadError("no VAE: the workdir has no vae/ folder and the config names no pretrained SD folder")
  vae_dir = Path(vae_dir)
  if (vae_dir / VAE_DIR).is_dir():
    vae_dir = vae_dir / VAE_DIR
  return diffusers_format.load_vae(vae_dir)


def _load_export(folder: Path, face_model_path, *, dtype, attention_impl) -> Inference:
  """An export folder back into JAX, every part strictly checked (the inverse of `export.export_mimaface`)."""
  path = folder / export.CONFIG_FILE
  try:
    raw = json.loads(path.read_text())
    config = export.config_from_dict(raw)
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointReadError(f"cannot read {path}: {e}") from e
  kw = dict(dtype=dtype or jnp.float32, attention_impl=attention_impl)
  if config.video:
    unet = animatediff_format.load_unet_motion(folder / "unet", **kw)
  else:
    unet = diffusers_format.load_unet(folder / "unet", **kw)
  clip = clip_format.load_clip_vision(folder / "image_encoder", **kw)
  mia_state = diffusers_format.read_safetensors(folder / "mia" / export.MIA_WEIGHTS)
  abstract = nnx.eval_shape(lambda: build_mia(config.mia, implementation=attention_impl, dtype=kw["dtype"],
                                              rngs=nnx.Rngs(0)))  # fmt: skip
  mia = merge_params(abstract, export.mia_key_map(abstract).to_flax(mia_state, f"{folder / 'mia' / 'config.json'}"))
  model = release_format.assemble(config, clip=clip, mia=mia, unet=unet)
  face = Path(face_model_path) if face_model_path else folder / export.FACE_MODEL_FILE
  saved = raw.get("inference", {})
  schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
  keys = inspect.signature(schedulers.make_noise_schedule).parameters
  frames = saved.get("num_frames", 16 if config.video else 1)
  return Inference(
    model=model,
    vae=diffusers_format.load_vae(folder / "vae", **kw),
    face_model=load_face_model(face) if face.is_file() else None,
    schedule=schedulers.make_noise_schedule(**{k: v for k, v in schedule.items() if k in keys}),
    config=None,
    resolution=saved.get("resolution", 512),
    num_frames=frames,
    ica_frames=saved.get("ica_frames", ica.inference_overlap(frames) if config.video else 0),
    sampler=SamplerConfig(**{f.name: saved[f.name] for f in dataclasses.fields(SamplerConfig) if f.name in saved}),
  )


def _load_release(path: Path, vae_dir, face_model_path) -> Inference:
  if vae_dir is None:
    raise CheckpointReadError(f"{path} is a release folder: pass the SD VAE folder (--vae) to decode with")
  if face_model_path is None:
    raise CheckpointReadError(
      f"{path} is a release folder: pass the morphable model its coefficients use (BFM_model_front.mat)"
    )
  frames = RELEASE_CLIP_FRAMES
  return Inference(
    model=release_format.load_release(path),
    face_features=face_features.FaceFeatures.for_release(path),  # its IR weights are looked for on first use
    vae=_load_vae(vae_dir, None),
    face_model=load_face_model(face_model_path),
    schedule=schedulers.make_noise_schedule(),
    config=None,
    resolution=512,
    num_frames=frames,
    ica_frames=ica.inference_overlap(frames, release=True),
    sampler=RELEASE_SAMPLER,
  )
