"""MMFA as a model family: the tasks of its two stages on the shared loop, and its `animate` verb.

Stage "animator": two parameter groups, "generator" (the MMFA module: appearance, keypoints, expression, dense
motion, multi-scale generator; `model.py`) and "discriminator" (face-vid2vid's multi-scale patch discriminator),
each with its own Adam, updated from the same starting parameters in one step as face-vid2vid's alternating loop.
Batches: a driver frame and a source frame of the same video (the loader's image mode), with the coefficient
rows that carry the stored head pose. Frozen: the head-pose network when R comes from Hopenet.

Stage "expression_vae": the expression VAE of sec. 3.3 on the f_exp of a trained animator (`vae_stage.py`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from mimajax import families
from mimajax.mmfa import animate, evaluation, expression_vae_stage, objective, serving
from mimajax.mmfa.data import data_iterator
from mimajax.mmfa.samples import SampleWriter

ANIMATOR, EXPRESSION_VAE = "animator", "expression_vae"
GENERATOR, DISCRIMINATOR = objective.GENERATOR, objective.DISCRIMINATOR
BATCH_KEYS = ("frames", "source_frame", "motion", "source_motion")
ROTATIONS = ("dataset", "hopenet")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field, before anything is built or written."""
  if config.stage not in (ANIMATOR, EXPRESSION_VAE):
    raise ValueError(f"config.stage must be {ANIMATOR!r} or {EXPRESSION_VAE!r} for MMFA; got {config.stage!r}")
  path = str(config.data.path)
  if "://" not in path and not Path(path).exists():
    raise ValueError(f"config.data.path={path} does not exist (a `mimajax prepare` output folder or a shard file)")
  m = config.model
  if m.rotation not in ROTATIONS:
    raise ValueError(f"config.model.rotation must be one of {ROTATIONS}; got {m.rotation!r}")
  if m.rotation == "hopenet" and not Path(m.hopenet_weights or "").is_file():
    raise ValueError(f"config.model.rotation='hopenet' needs config.model.hopenet_weights (a local deep-head-pose "
                     f"hopenet .pkl); got {m.hopenet_weights!r}")  # fmt: skip
  if m.init_from_face_vid2vid and not Path(m.init_from_face_vid2vid).is_file():
    raise ValueError(f"config.model.init_from_face_vid2vid={m.init_from_face_vid2vid} is not a file")
  down = 2**m.generator.num_down_blocks
  if config.data.resolution % (4 * down):
    raise ValueError(f"config.data.resolution={config.data.resolution} must be a multiple of {4 * down} (the "
                     f"generator's {m.generator.num_down_blocks} down blocks and its 3 output scales)")  # fmt: skip
  if m.generator.max_features != m.generator.reshape_channel * m.generator.reshape_depth:
    raise ValueError(f"config.model.generator: max_features ({m.generator.max_features}) must be reshape_channel x "
                     f"reshape_depth ({m.generator.reshape_channel} x {m.generator.reshape_depth}): the 2-D features "
                     "are reshaped into the 3-D volume")  # fmt: skip
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must divide over {jax.process_count()} hosts")
  if config.loss.gan_mode not in objective.GAN_MODES:
    raise ValueError(f"config.loss.gan_mode must be one of {objective.GAN_MODES}; got {config.loss.gan_mode!r}")
  if len(config.loss.feature_matching) and config.loss.generator_gan <= 0 and any(config.loss.feature_matching):
    raise ValueError("config.loss.feature_matching needs config.loss.generator_gan > 0 (the discriminator's features)")
  if config.stage == EXPRESSION_VAE:
    expression_vae_stage.check_config(config)


# What may not change when a run continues in its workdir: the stage and every network's sizes (the parameters'
# shapes and the optimizer states' structure). Learning rates, loss weights, steps, data and logging may.
RESUME_FIELDS = (
  "stage",
  "model.num_kp",
  "model.image_channel",
  "model.feature_channel",
  "model.kp_detector",
  "model.head_estimator",
  "model.generator",
  "model.dense_motion",
  "model.discriminator",
  "model.expression",
  "model.expression_vae",
)


def check_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  families.compare_fields(saved, config, RESUME_FIELDS)


def build_task(config: ml_collections.ConfigDict, workdir: Path) -> families.Task:
  if config.stage == EXPRESSION_VAE:
    return expression_vae_stage.build_task(config, workdir)
  parts = objective.build(config)
  rules = tuple(tuple(r) for r in config.axis_rules)
  return families.Task(
    modules={GENERATOR: parts.generator, DISCRIMINATOR: parts.discriminator},
    losses={GENERATOR: parts.generator_loss, DISCRIMINATOR: parts.discriminator_loss},
    optimizers={
      GENERATOR: objective.optimizer(config, config.train.generator_lr),
      DISCRIMINATOR: objective.optimizer(config, config.train.discriminator_lr),
    },  # fmt: skip
    axis_rules={GENERATOR: rules, DISCRIMINATOR: rules},
    iterator=data_iterator(config),
    images_per_step=config.data.batch_size,
    batch_keys=BATCH_KEYS,
    frozen=parts.frozen,
    frozen_rules={k: None for k in parts.frozen},  # small frozen networks (VGG, Hopenet, FaceMesh): replicated
    prepare=parts.prepare,
    init_params=parts.init_params,
    write_samples=SampleWriter(config, parts.generator, parts.prepare),
  )


FAMILY = families.Family(
  name="mmfa",
  build_task=build_task,
  check_config=check_config,
  check_resume=check_resume,
  load_animator=evaluation.load_animator,
  load_served=serving.load_served,
  commands={
    "animate": families.Command(
      animate.add_arguments,
      animate.run,
      "portrait + driving video -> mp4, with pose / scale / translation / expression edits and VAE interpolation",
    ),
  },
)
