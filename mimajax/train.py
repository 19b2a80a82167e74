"""`mimajax train`: the two-stage MIMAFace training loop, from a config file, resumable from its workdir.

  mimajax train --config configs/tiny.py --workdir runs/tiny --config.total_steps=6

One loop for every scale: the mesh comes from `config.mesh`, parameters and optimizer state are
sharded by the logical-axis rules, each host loads its slice of the global batch (Grain) and the
batch becomes one global array; the jitted step (mimajax/train_step.py) encodes frames and renders
with the frozen VAE/renderer, then updates the trainable set of the stage. Checkpoints (Orbax,
async) hold the state and every host's iterator position; a rerun in the same workdir resumes
from the newest one and continues exactly as if never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mimajax import checkpointing, sharding, train_step
from mimajax.diffusion import schedulers
from mimajax.mimaface import pretrained as model_init
from mimajax.mimaface.memory_bank import init_memory_bank
from mimajax.mimaface.model import MIMAFace, training_loss
from mimajax.training import reporting as train_metrics

log = logging.getLogger("mimajax.train")

# What the step needs from a loader batch (the rest stays on the host).
DEVICE_KEYS = ("frames", "source_frame", "motion", "identity")


@dataclasses.dataclass
class Run:
  """Everything the loop holds; `state` is the only thing that changes between steps (and the iterator)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: MIMAFace
  state: train_step.TrainState
  state_shardings: Any
  frozen: dict
  frozen_shardings: Any
  vae_graphdef: Any
  step_fn: Any  # (state, batch, frozen) -> (state, metrics), not yet jitted: the batch shardings come with the data
  metrics_sharding: Any
  iterator: Any
  sampler: Any = None  # the sample writer's ClipSampler, built at the first sample step


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field."""
  if config.stage not in (1, 2):
    raise ValueError(f"config.stage must be 1 (images) or 2 (clips); got {config.stage}")
  if config.stage == 1 and config.data.num_frames != 1:
    raise ValueError(f"stage 1 trains on images: config.data.num_frames must be 1, got {config.data.num_frames}")
  if config.stage == 2 and config.data.num_frames < 2:
    raise ValueError(f"stage 2 trains on clips: config.data.num_frames must be >= 2, got {config.data.num_frames}")
  if config.data.resolution % 8:
    raise ValueError(f"config.data.resolution={config.data.resolution} must be a multiple of 8 (VAE latents)")
  if config.total_steps < 1:
    raise ValueError(f"config.total_steps must be >= 1; got {config.total_steps}")
  if config.data.batch_size % jax.process_count():
    raise ValueError(
      f"global batch {config.data.batch_size} does not split over {jax.process_count()} hosts (config.data.batch_size)"
    )


def _loader(config, process_index=None, process_count=None):
  from data_pipeline import loader

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
  )
  return loader.make_iterator(d.path, cfg, workers=d.workers, read_threads=d.read_threads)


def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in DEVICE_KEYS}


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[Run, checkpointing.Checkpointer]:
  """Mesh, models, sharded state (restored from the workdir when it has a checkpoint), the jitted step."""
  check_config(config)
  workdir = Path(workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  if config.data.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(
      f"global batch {config.data.batch_size} does not split over the mesh's data x fsdp = "
      f"{mesh.shape['data']} x {mesh.shape['fsdp']} devices"
    )
  face_model = model_init.face_model(config, workdir)
  model, vae = model_init.build_models(config)
  model_init.keep_vae(vae, config, workdir)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  labels = train_step.trainable_labels(params, list(config.train.trainable))
  t = config.train
  tx = train_step.make_optimizer(
    labels,
    learning_rate=t.learning_rate,
    warmup_steps=t.warmup_steps,
    weight_decay=t.weight_decay,
    max_grad_norm=t.max_grad_norm or None,
  )
  bank = None
  if config.model.mia.variant == "paper" and t.memory_bank_size:
    bank = init_memory_bank(t.memory_bank_size, config.model.clip.hidden_size)
  state = init_sharded_state(model, tx, jax.random.key(config.seed), mesh, config, bank)
  state_sh = shardings_of(state)

  vae_params = nnx.state(vae, nnx.Param)
  frozen = dict(vae=vae_params, face_model=face_model)
  frozen_sh = dict(
    vae=sharding.state_shardings(vae_params, mesh, tuple(config.vae_axis_rules)),
    face_model=jax.tree.map(lambda _: sharding.replicated(mesh), face_model),
  )
  frozen = jax.device_put(frozen, frozen_sh)

  schedule = schedulers.make_noise_schedule(**config.noise_schedule.to_dict())
  vae_graphdef = nnx.graphdef(vae)
  clip_size = config.model.clip.image_size

  def prepare(frozen, batch):
    from mimajax import conditioning

    vae_model = nnx.merge(vae_graphdef, frozen["vae"])
    return conditioning.model_batch(vae_model, frozen["face_model"], batch, clip_size=clip_size,
                                    coefficient_dim=config.data.coefficient_dim,
                                    shading=config.data.render_shading)  # fmt: skip

  loss_fn = lambda m, b, r, bk: training_loss(m, b, r, schedule, bk)
  step = train_step.make_train_step(graphdef, rest, loss_fn, tx, accumulation_steps=t.accumulation_steps,
                                    ema_decay=t.ema_decay or None, prepare=prepare)  # fmt: skip
  ckpt = checkpointing.Checkpointer(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)  # fmt: skip
  iterator = _loader(config)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(state, state_sh, latest)
    if data_state is not None:
      iterator.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, latest)
  elif t.init_from:
    state = dataclasses.replace(state, params=model_init.init_params_from(t.init_from, state.params, config))
    state = jax.device_put(state, state_sh)

  run = Run(config, mesh, model, state, state_sh, frozen, frozen_sh, vae_graphdef, step, sharding.replicated(mesh),
            iterator)  # fmt: skip
  return run, ckpt


def init_sharded_state(model: MIMAFace, tx, rng, mesh, config, bank=None) -> train_step.TrainState:
  """The TrainState laid out on the mesh: parameters by their component's logical rules, optimizer moments
  and EMA by propagation from the parameters (tx.init under jit), counters, rng and memory bank replicated."""
  rules = {"unet": tuple(config.unet_axis_rules), "clip": tuple(config.clip_axis_rules),
           "mia": tuple(config.clip_axis_rules)}  # fmt: skip
  params = nnx.state(model, nnx.Param)
  param_sh = sharding.state_shardings(params, mesh, rules)
  params = jax.device_put(params, param_sh)
  rep = sharding.replicated(mesh)
  ema = config.train.ema_decay
  opt_sh = like_params(jax.eval_shape(tx.init, params), params, rep)
  return train_step.TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), rep),
    params=params,
    opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
    rng=jax.device_put(rng, rep),
    bank=jax.device_put(bank, rep) if bank is not None else None,
    ema_params=jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params) if ema else None,
  )


def like_params(tree, params, default):
  """Shardings for a tree holding copies of the parameters (optimizer moments): each leaf whose key path ends
  with a parameter's path (and has its shape) gets that parameter's sharding; the rest (counts) `default`."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  index = {tuple(str(k) for k in path): (np.shape(x), x.sharding) for path, x in flat}
  lengths = sorted({len(k) for k in index}, reverse=True)

  def one(path, leaf):
    keys = tuple(str(k) for k in path)
    for n in lengths:
      hit = index.get(keys[-n:])
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(one, tree)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> train_step.TrainState:
  """Runs (or resumes) the job to config.total_steps; returns the final state."""
  workdir = Path(workdir)
  if config.distributed:
    jax.distributed.initialize()
  checkpointing.write_config(workdir, config)
  run, ckpt = setup(config, workdir)
  state = run.state
  start = int(jax.device_get(state.step))
  total = config.total_steps
  reporter = train_metrics.Reporter(workdir, config, start=start, total=total)
  preempt = checkpointing.PreemptionFlag().install()
  compiled = None
  step = start
  try:
    while step < total:
      host = _host_batch(next(run.iterator))
      batch = {k: _to_global(v, run.mesh) for k, v in host.items()}
      if compiled is None:
        shardings = {k: v.sharding for k, v in batch.items()}
        jitted = train_step.jit_train_step(run.step_fn, run.state_shardings, shardings, run.metrics_sharding,
                                           run.frozen_shardings)  # fmt: skip
        compiled = jitted.lower(state, batch, run.frozen).compile()
        reporter.set_flops(train_metrics.compiled_flops(compiled))
      state, metrics = compiled(state, batch, run.frozen)
      try:
        train_step.check_finite(metrics, step + 1)
      except FloatingPointError:
        ckpt.wait()  # the last good checkpoint stays the newest
        raise
      step += 1
      reporter.step(step, metrics, images=config.data.batch_size * config.data.num_frames)
      stop = preempt.reached(step)
      ckpt.save(step, state, run.iterator.get_state(), force=stop or step == total)
      if stop:
        log.warning("preempted (SIGTERM): saved step %d to %s", step, ckpt.directory)
        break
      if config.sample.every_steps and (step % config.sample.every_steps == 0 or step == total):
        train_metrics.write_samples(workdir, step, run, state, host)
  finally:
    preempt.uninstall()
    ckpt.close()
    reporter.close()
  return state


def _to_global(x: np.ndarray, mesh) -> jax.Array:
  spec = sharding.batch_sharding(mesh, np.ndim(x))
  return jax.make_array_from_process_local_data(spec, np.asarray(x))


# ----------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
  """`mimajax train --config FILE[:arg] --workdir DIR [--config.x=y ...]` (absl/ml_collections flags)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv = ["mimajax train", *argv]
  saved_argv, sys.argv = sys.argv, argv  # config_flags finds `--config.x=y` overrides in sys.argv
  try:
    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", flag_values=fv,
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples; rerun to resume", flag_values=fv)
    fv(argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    print(f"mimajax train: {e}", flush=True)
    return 2
  finally:
    sys.argv = saved_argv
  if fv.config is None or not fv.workdir:
    print("mimajax train: --config and --workdir are required", flush=True)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  try:
    train(fv.config, fv.workdir)
  except (ValueError, FloatingPointError, checkpointing.CheckpointReadError) as e:
    print(f"mimajax train: {type(e).__name__}: {e}", flush=True)
    return 1
  return 0
