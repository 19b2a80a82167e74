"""MIMAFace (JAX) -> a folder PyTorch runs: diffusers / transformers components, MIA safetensors, SD single files.

`export_mimaface` writes the layout of docs/export_layout.md: `unet/` (diffusers `UNetMotionModel` with the
motion modules for stage 2, `UNet2DConditionModel` for stage 1; 13 input channels), `vae/`, `image_encoder/`
(transformers CLIP vision), `mia/` and `conv_in/` (safetensors with documented keys), `scheduler/`,
`mimaface_config.json`, `model_index.json`, the face model, and `sd_single_file/` (the spatial U-Net + VAE with
LDM keys; for stage 2 the motion modules in the original AnimateDiff layout).
`mimajax.mimaface.pytorch.MIMAFacePipeline`
runs it; `mimaface.inference.load_inference` reads it back into JAX. The folder is written beside `out_dir`
under a temporary name (`mimajax.atomic`: readable as the umask allows, not 0700) and renamed when complete, so a
failure leaves no `out_dir`. `check_out_dir` refuses an `out_dir` that is, contains or lies inside what the export is
made from, and `overwrite` replaces only a folder that is itself an export (it has mimaface_config.json). Temporary
folders a killed export left beside `out_dir` are removed by the next export to it (`atomic.leftovers`: this
host's whose process is gone, other hosts' untouched for an hour); a previous export a killed overwrite had moved
aside is put back first.

The command (`mimajax export`) is mimaface/export_command.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flax import nnx

from mimajax import atomic
from mimajax.convert import animatediff_format, clip_format, diffusers_format, sd_single_file
from mimajax.convert.state_dict import KeyMap
from mimajax.diffusion import schedulers
from mimajax.errors import CheckpointReadError
from mimajax.face3d.landmark_model import save_face_model
from mimajax.mimaface import augment, ica
from mimajax.mimaface.mia import MIAConfig
from mimajax.mimaface.model import MIMAFace, MIMAFaceConfig
from mimajax.mimaface.sampling import SamplerConfig
from mimajax.models.clip_vision import CLIPVisionConfig
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig
from mimajax.models.vae import AutoencoderKL

CONFIG_FILE, INDEX_FILE, FACE_MODEL_FILE = "mimaface_config.json", "model_index.json", "face_model.npz"
MIA_WEIGHTS, CONV_IN_WEIGHTS = "mia.safetensors", "conv_in.safetensors"
SINGLE_FILE_DIR = "sd_single_file"
SINGLE_FILE_UNET_VAE, SINGLE_FILE_MOTION = "mimaface_unet_vae.safetensors", "mimaface_motion_modules.safetensors"
CONV_IN_CHANNELS = "noisy 0:4 | render latents 4:8 | ICA latents 8:12 | ICA mask 12:13"
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"  # beside out_dir: the export being written; an old one being replaced

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: MIMAFaceConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as the file holds them


def _tuples(x):
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _dataclass(cls, raw: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - names)
  if unknown:
    raise CheckpointReadError(f"{CONFIG_FILE}: unknown {cls.__name__} fields {unknown}")
  return cls(**{k: _tuples(v) for k, v in raw.items()})


def config_from_dict(raw: dict[str, Any]) -> MIMAFaceConfig:
  """The MIMAFaceConfig of a `mimaface_config.json` (its "inference" entry ignored)."""
  raw = {k: v for k, v in raw.items() if k != "inference"}
  nested = dict(unet=UNetConfig, clip=CLIPVisionConfig, mia=MIAConfig, motion=MotionConfig,
                augment=augment.PhotometricConfig)  # fmt: skip
  parts = {k: (None if raw.get(k) is None else _dataclass(cls, raw[k])) for k, cls in nested.items() if k in raw}
  return _dataclass(MIMAFaceConfig, {**raw, **parts})


def _inference_defaults(model: MIMAFace, config, resolution, num_frames, ica_frames) -> dict[str, Any]:
  """Sampler settings and clip geometry for PyTorch users: explicit values, else the training config's."""
  data = config.get("data", {}) if config is not None else {}
  sampler = SamplerConfig.from_config(config.get("sample") if config is not None else None)
  frames = num_frames or (data.get("num_frames", 16) if model.config.video else 1)
  if ica_frames is None:
    ica_frames = ica.inference_overlap(frames) if model.config.video else 0
  return dict(
    **dataclasses.asdict(sampler),
    resolution=int(resolution or data.get("resolution", 512)),
    num_frames=int(frames),
    ica_frames=int(ica_frames),
  )


def _noise_schedule(config) -> dict[str, Any]:
  """The training config's noise schedule; SD1.5's (make_noise_schedule's defaults) without a config."""
  schedule = config.get("noise_schedule") if config is not None else None
  if schedule is None:
    defaults = inspect.signature(schedulers.make_noise_schedule).parameters.values()
    return {p.name: p.default for p in defaults}
  return schedule.to_dict() if hasattr(schedule, "to_dict") else dict(schedule)


def scheduler_config(noise_schedule: dict[str, Any], timestep_spacing: str = "leading") -> dict[str, Any]:
  """diffusers DDIMScheduler config.json for the training schedule, as SD1.5 pipelines sample it."""
  return dict(
    _class_name="DDIMScheduler",
    _diffusers_version=diffusers_format.DIFFUSERS_VERSION,
    **noise_schedule,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing=timestep_spacing,
  )


# ----------------------------------------------------------------------------- writing


def mia_key_map(mia) -> KeyMap:
  """MIA keys are its parameter paths with "/" -> "." (torch leaf names); `mimajax.mimaface.pytorch.mia` loads them."""
  return KeyMap(nnx.state(mia, nnx.Param), what=f"MIA ({type(mia).__name__})")


def _save_safetensors(path: Path, state: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  from safetensors.numpy import save_file

  save_file(
    {k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "pt", **(metadata or {})}
  )
  atomic.default_mode(path)  # safetensors writes 0600


def _write_mia(model: MIMAFace, folder: Path) -> None:
  cfg = model.config.mia
  config = {"_class_name": "MotionIdentityAdapter" if cfg.variant == "paper" else "ReleaseMIA",
            **dataclasses.asdict(cfg)}  # fmt: skip
  state = mia_key_map(model.mia).to_torch(nnx.state(model.mia, nnx.Param))
  diffusers_format.write_folder(folder, config, state, weights_name="mia", stamp_diffusers_version=False)


def _write_conv_in(unet_state: dict[str, np.ndarray], folder: Path) -> None:
  folder.mkdir()
  state = {k: unet_state[k] for k in ("conv_in.weight", "conv_in.bias")}
  _save_safetensors(folder / CONV_IN_WEIGHTS, state, {"input_channels": CONV_IN_CHANNELS})


def _write_all(model: MIMAFace, vae: AutoencoderKL, out: Path, config, face_model, single_file: bool,
               inference: dict[str, Any]) -> None:  # fmt: skip
  video = model.config.video
  # Each part is converted to PyTorch layout once; the single files reuse those tensors.
  if video:  # UNetMotionModel keys (motion modules and their positional tables included)
    unet_state = animatediff_format.unet_motion_to_torch_state(model.unet)
  else:
    unet_state = diffusers_format.unet_to_torch_state(model.unet)
  diffusers_format.write_folder(out / "unet", model.unet.config.to_diffusers(), unet_state)
  _write_conv_in(unet_state, out / "conv_in")
  vae_state = diffusers_format.vae_to_torch_state(vae)
  diffusers_format.write_folder(out / "vae", vae.config.to_diffusers(), vae_state)
  clip_format.save_clip_vision(model.clip, out / "image_encoder")
  _write_mia(model, out / "mia")
  sched = scheduler_config(_noise_schedule(config), inference["timestep_spacing"])
  (out / "scheduler").mkdir()
  (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
  (out / CONFIG_FILE).write_text(json.dumps({**config_to_dict(model.config), "inference": inference}, indent=2) + "\n")
  if config is not None:
    (out / "training_config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  if face_model is not None:
    save_face_model(face_model, out / FACE_MODEL_FILE)
  if single_file:
    is_motion = lambda key: ".motion_modules." in f".{key}"  # noqa: E731
    spatial_config = model.unet.config.spatial() if video else model.unet.config
    sd_single_file.save_single_file(
      out / SINGLE_FILE_DIR / SINGLE_FILE_UNET_VAE,
      unet_state={k: v for k, v in unet_state.items() if not is_motion(k)},
      unet_config=spatial_config.to_diffusers(),
      vae_state=vae_state,
      vae_config=vae.config.to_diffusers(),
    )
    if video:  # the original AnimateDiff layout, as animatediff_format.save_animatediff_checkpoint writes it
      motion = animatediff_format.motion_state_to_original({k: v for k, v in unet_state.items() if is_motion(k)})
      _save_safetensors(out / SINGLE_FILE_DIR / SINGLE_FILE_MOTION, motion)
  index = {
    "_class_name": "MIMAFacePipeline",
    "_mimajax_pipeline": "mimajax.mimaface.pytorch.MIMAFacePipeline",
    "_diffusers_version": diffusers_format.DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNetMotionModel" if video else "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [
      "transformers",
      "CLIPVisionModelWithProjection" if model.clip.with_projection else "CLIPVisionModel",
    ],
    "mia": [
      "mimajax.mimaface.pytorch",
      "MotionIdentityAdapter" if model.config.mia.variant == "paper" else "ReleaseMIA",
    ],
    "scheduler": ["diffusers", "DDIMScheduler"],
  }
  (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def is_export(folder: str | os.PathLike) -> bool:
  """Whether `folder` is a mimajax export folder (it holds mimaface_config.json)."""
  return (Path(folder) / CONFIG_FILE).is_file()


def _check_clear_of(out: Path, sources: Iterable[str | os.PathLike]) -> None:
  """ValueError if `out` is, contains or lies inside one of `sources` (symbolic links followed)."""
  target = out.resolve()
  for source in sources:
    src = Path(source).resolve()
    if target == src:
      where = f"is {source}"
    elif src.is_relative_to(target):
      where = f"contains {source}"
    elif target.is_relative_to(src):
      where = f"lies inside {source}"
    else:
      continue
    raise ValueError(
      f"export folder {out} {where}, which the export is made from; expected a folder outside the checkpoint (its "
      "workdir, step, export or release folder)"
    )


def check_out_dir(out_dir: str | os.PathLike, *, sources: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False) -> Path:  # fmt: skip
  """`out_dir` if an export may be written there; else ValueError (FileExistsError when it exists and `overwrite`
  is off) saying why.

  sources: what the export is read from (checkpoint workdir, step folder, export or release folder, VAE folder,
  face model); `out_dir` may not be one of them, contain one or lie inside one (symbolic links followed), since
  writing or replacing it would destroy them. An existing `out_dir` is replaced (with `overwrite`) only when it is
  an export folder or empty.
  """
  out = Path(out_dir)
  _check_clear_of(out, sources)
  if out.is_symlink() or out.exists():
    if not out.is_dir() or out.is_symlink():
      raise ValueError(
        f"export folder {out} exists and is a file or a symbolic link; expected a new folder or an export folder"
      )
    if not overwrite:
      raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not is_export(out) and any(out.iterdir()):
      raise ValueError(
        f"{out} exists and is not a mimajax export (no {CONFIG_FILE}); overwrite (--overwrite) only replaces an "
        "export folder: choose another folder or remove it yourself"
      )
  return out


def remove_leftovers(out_dir: str | os.PathLike, *, started: float | None = None) -> list[Path]:
  """Removes the temporary folders killed exports left beside `out_dir` (`atomic.leftovers`); returns them.

  A killed overwrite may have moved the previous export aside (into `.NAME.*.old/NAME`) without putting the new one
  in place: when `out_dir` is missing, that export is moved back first.
  """
  out = Path(out_dir)
  removed = []
  for path in atomic.leftovers(out, (TMP_SUFFIX, OLD_SUFFIX), started=started):
    kept = path / out.name
    if path.name.endswith(OLD_SUFFIX) and not out.exists() and is_export(kept):
      os.replace(kept, out)
      log.warning("restored %s, which an interrupted export had moved to %s", out, path)
    shutil.rmtree(path, ignore_errors=True)
    log.warning("removed %s, left by an interrupted export", path)
    removed.append(path)
  return removed


def export_mimaface(
  model: MIMAFace,
  vae: AutoencoderKL,
  out_dir: str | os.PathLike,
  *,
  config=None,
  face_model=None,
  overwrite: bool = False,
  single_file: bool = True,
  resolution: int | None = None,
  num_frames: int | None = None,
  ica_frames: int | None = None,
  sources: Iterable[str | os.PathLike] = (),
) -> Path:
  """Writes the export folder (docs/export_layout.md) atomically; returns its path.

  config: the training ml_collections config (noise schedule, sampler and clip defaults; SD1.5's schedule and
  SamplerConfig() without it). resolution / num_frames / ica_frames override what the config says.
  sources: what the model was read from, which `out_dir` must stay clear of (`check_out_dir`).
  """
  started = time.time()
  sources = list(sources)
  out = Path(out_dir)
  _check_clear_of(out, sources)  # first: nothing in or beside a source is touched
  if out.parent.is_dir():
    remove_leftovers(out, started=started)  # may put back an export a killed overwrite had moved aside
  check_out_dir(out, sources=sources, overwrite=overwrite)
  inference = _inference_defaults(model, config, resolution, num_frames, ica_frames)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = atomic.temp_dir(out, TMP_SUFFIX)
  try:
    _write_all(model, vae, tmp, config, face_model, single_file, inference)
    check_out_dir(out, sources=sources, overwrite=overwrite)  # again: something may have appeared there meanwhile
    if out.exists():  # overwrite: move the old folder aside first, so the swap is two renames
      old = atomic.temp_dir(out, OLD_SUFFIX)
      os.replace(out, old / out.name)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
