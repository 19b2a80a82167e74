"""MIMAFace as a model family: the task the shared training loop runs, and its `animate` / `export` verbs.

One parameter group, "model" (U-Net, CLIP and MIA; the stage's `config.train.trainable` patterns say
which of them train). Frozen: the VAE (its own axis rules) and the morphable model the renderer draws
I_R with, both passed to the step as sharded arguments; `prepare` encodes frames and renders inside the
step. Extra state: the identity memory bank of the paper variant, filled with each step's ID tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from data_pipeline import loader
from mimajax import families, train_step
from mimajax.diffusion import schedulers
from mimajax.mimaface import (
  animate,
  conditioning,
  evaluation,
  export_command,
  latent_cache,
  pretrained,
  serving,
  vae_stage,
)
from mimajax.mimaface.inference import GROUP
from mimajax.mimaface.memory_bank import enqueue, init_memory_bank
from mimajax.mimaface.model import training_loss
from mimajax.mimaface.samples import SampleWriter

# What the step needs from a loader batch (the rest stays on the host).
BATCH_KEYS = ("frames", "source_frame", "motion", "source_motion", "identity")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field."""
  if config.stage == vae_stage.STAGE:
    return vae_stage.check_config(config)
  if config.stage not in (1, 2):
    raise ValueError(f"config.stage must be 1 (images), 2 (clips) or 'vae' (the autoencoder); got {config.stage}")
  if config.model.get("vae_from") and config.model.pretrained:
    raise ValueError("config.model.vae_from and config.model.pretrained both name a VAE; keep one")
  if config.stage == 1 and config.data.num_frames != 1:
    raise ValueError(f"stage 1 trains on images: config.data.num_frames must be 1, got {config.data.num_frames}")
  if config.stage == 2 and config.data.num_frames < 2:
    raise ValueError(f"stage 2 trains on clips: config.data.num_frames must be >= 2, got {config.data.num_frames}")
  if config.data.resolution % 8:
    raise ValueError(f"config.data.resolution={config.data.resolution} must be a multiple of 8 (VAE latents)")
  # Before anything is built or written: a run on a missing dataset would otherwise fall back to the synthetic
  # morphable model and fail only when the loader opens the shards.
  path = str(config.data.path)
  if "://" not in path and not Path(path).exists():
    raise ValueError(f"config.data.path={path} does not exist (a `mimajax prepare` output folder or a shard file)")
  if config.data.face_model and not Path(config.data.face_model).exists():
    raise ValueError(f"config.data.face_model={config.data.face_model} does not exist")


# What may not change when a run continues in its workdir: the stage (its model and trainable set), every part's
# sizes (the parameters' shapes), MIA's coefficient width, the trainable patterns (the optimizer state's
# structure) and the memory bank's size (the extra state). Learning rate, steps, batch size, the data path,
# logging, checkpoint and sampling settings may change; the face model is checked by `pretrained.face_model`.
RESUME_FIELDS = (
  "stage",
  "model.unet",
  "model.vae",
  "model.clip",
  "model.mia",
  "model.motion",
  "data.coefficient_dim",
  "train.trainable",
  "train.memory_bank_size",
)


def check_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the RESUME_FIELDS in which `config` differs from the workdir's recorded config."""
  if config.stage == vae_stage.STAGE or saved.get("stage") == vae_stage.STAGE:
    families.compare_fields(saved, config, ("stage",))
    return vae_stage.check_resume(saved, config)
  families.compare_fields(saved, config, RESUME_FIELDS)


log = logging.getLogger(__name__)
LATENT_MODES = ("auto", "always", "never")


def cached_latents(config: ml_collections.ConfigDict, vae, face_model) -> tuple[str, ...]:
  """The batch keys a latent cache at config.data.path gives this run (latent_cache.py): ("latents",
  "render_latents"), ("latents",) (renders drawn in the step), or () (no cache, or not this run's); logged."""
  from data_pipeline import latent_cache as cache

  d = config.data
  mode = d.get("latents", "auto")
  if mode not in LATENT_MODES:
    raise ValueError(f"config.data.latents={mode!r}; expected one of {LATENT_MODES}")
  section = cache.manifest_latents(d.path) if mode != "never" else None
  if section is None:
    if mode == "always":
      raise ValueError(f"config.data.latents='always' but {d.path} is not a latent cache (`mimajax cache-latents`)")
    return ()
  refuse = []
  if section.get("vae_digest") != latent_cache.vae_digest(vae):
    refuse.append(f"its VAE ({section.get('vae')}) is not this run's frozen VAE")
  elif section.get("compute_dtype") != latent_cache.compute_dtype(vae):
    refuse.append(f"its latents were computed in {section.get('compute_dtype')} and this run's VAE computes in "
                  f"{latent_cache.compute_dtype(vae)} (cache-latents --compute-dtype)")  # fmt: skip
  if section.get("resolution") != d.resolution:
    refuse.append(f"its latents are of {section.get('resolution')}-px frames, config.data.resolution is {d.resolution}")
  if d.flip:
    refuse.append("config.data.flip is on and the cache holds the unflipped frames' latents")
  if refuse:
    message = f"the latent cache {d.path} is not used: " + "; ".join(refuse)
    if mode == "always":
      raise ValueError(message)
    log.warning("%s: frames are encoded in the step", message)
    return ()
  keys = ("latents",)
  why = ""
  if d.get("blend_source"):
    why = "blended rows (data.blend_source) are rendered in the step"
  elif section.get("face_model_digest") != pretrained.face_model_digest(face_model):
    why = "its renders are of another face model"
  elif section.get("shading") != d.render_shading:
    why = f"its renders are {section.get('shading')}-shaded, config.data.render_shading is {d.render_shading}"
  else:
    keys += ("render_latents",)
  log.info("latent cache %s: the step reads the frames' latents%s", d.path,
           f"; {why}" if why else " and the renders' latents (no VAE encoding in the step)")  # fmt: skip
  return keys


def data_iterator(config: ml_collections.ConfigDict, latents: bool = False):
  """This host's Grain iterator over the prepared shards: F-frame clips plus a source frame of the same video."""
  d = config.data
  cfg = loader.LoaderConfig(
    num_frames=d.num_frames,
    stride=d.stride,
    batch_size=d.batch_size // jax.process_count(),
    resolution=d.resolution,
    source_resolution=d.resolution,
    flip=d.flip,
    seed=config.seed,
    coefficient_dim=None,
    latents=latents,
  )
  return loader.make_iterator(d.path, cfg, workers=d.workers, read_threads=d.read_threads)


def axis_rules(config: ml_collections.ConfigDict) -> dict:
  """Logical-axis rules of each part of the model: the U-Net's, and CLIP's for CLIP and MIA."""
  clip_rules = tuple(config.clip_axis_rules)
  return {"unet": tuple(config.unet_axis_rules), "clip": clip_rules, "mia": clip_rules}


def update_memory_bank(bank, aux, batch):
  """Extra state: this step's ID tokens e_id enter the identity memory bank (paper variant; None: no bank)."""
  if bank is None:
    return None
  return enqueue(bank, aux[GROUP]["e_id"], batch["identity"])  # the global batch: every replica enqueues the same


def identity_loss_trains(model, trainable: tuple[str, ...]) -> bool:
  """Whether any CLIP or MIA parameter trains under the trainable patterns (the optimizer's own matching)."""
  params = nnx.state(model, nnx.Param)
  frozen = train_step.untrained_paths(params, families.OptimizerConfig(trainable=trainable))
  return any(path[0] in ("clip", "mia") and path not in frozen for path, _ in nnx.to_flat_state(params))


def build_task(config: ml_collections.ConfigDict, workdir: Path) -> families.Task:
  if config.stage == vae_stage.STAGE:
    return vae_stage.build_task(config, workdir)
  face_model = pretrained.face_model(config, workdir)
  model, vae = pretrained.build_models(config, workdir)
  pretrained.keep_vae(vae, config, workdir)
  cached = cached_latents(config, vae, face_model)
  t = config.train
  bank = None
  if config.model.mia.variant == "paper" and t.memory_bank_size:
    bank = init_memory_bank(t.memory_bank_size, config.model.clip.hidden_size)
  schedule = schedulers.make_noise_schedule(**config.noise_schedule.to_dict())
  vae_graphdef = nnx.graphdef(vae)
  clip_size = config.model.clip.image_size

  def prepare(frozen, batch):
    vae_model = nnx.merge(vae_graphdef, frozen["vae"])
    return conditioning.model_batch(vae_model, frozen["face_model"], batch, clip_size=clip_size,
                                    coefficient_dim=config.data.coefficient_dim, shading=config.data.render_shading,
                                    blend_source=bool(config.data.get("blend_source")))  # fmt: skip

  # L_id trains CLIP and MIA through e_id; when none of their parameters train (stage 2 of the paper) it is skipped.
  identity = identity_loss_trains(model, tuple(t.trainable))

  def loss(modules, batch, rng, bank):
    return training_loss(modules[GROUP], batch, rng, schedule, bank, identity_loss=identity)

  def init_params(params):
    return {**params, GROUP: pretrained.init_params_from(t.init_from, params[GROUP], GROUP)}

  optimizer = families.OptimizerConfig(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
                                       weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm or None,
                                       trainable=tuple(t.trainable))  # fmt: skip
  return families.Task(
    modules={GROUP: model},
    losses={GROUP: loss},
    optimizers={GROUP: optimizer},
    axis_rules={GROUP: axis_rules(config)},
    iterator=data_iterator(config, latents=bool(cached)),
    images_per_step=config.data.batch_size * config.data.num_frames,
    batch_keys=BATCH_KEYS + cached,
    frozen=dict(vae=nnx.state(vae, nnx.Param), face_model=face_model),
    frozen_rules=dict(vae=tuple(config.vae_axis_rules), face_model=None),
    prepare=prepare,
    extra=bank,
    update_extra=update_memory_bank,
    init_params=init_params if t.init_from else None,
    write_samples=SampleWriter(config, model, vae_graphdef, GROUP),
  )


FAMILY = families.Family(
  name="mimaface",
  build_task=build_task,
  check_config=check_config,
  check_resume=check_resume,
  load_animator=evaluation.load_animator,
  load_served=serving.load_served,
  commands={
    "animate": families.Command(
      animate.add_arguments,
      animate.run,
      "portrait + driving video | coefficients (e.g. SadTalker audio) | edits -> mp4",
    ),
    "export": families.Command(
      export_command.add_arguments,
      export_command.run,
      "trained model -> diffusers/transformers folders + SD single files",
    ),
    "cache-latents": families.Command(
      latent_cache.add_arguments,
      latent_cache.run,
      "a prepared dataset + the frozen VAE -> the dataset with every frame's and render's VAE latents",
    ),
  },
)
