"""`mimajax train`: one training loop for every model family, from a config file, resumable from its workdir.

  mimajax train --config configs/tiny.py --workdir runs/tiny --config.total_steps=6

The family (`config.model.family`, recorded in the workdir's config.json) builds its task
(mimajax/families.py): parameter groups with their losses, optimizers and axis rules, frozen
parts, the data iterator. The rest is one code path: the mesh comes from `config.mesh`, parameters
and optimizer state are sharded by the logical-axis rules, each host loads its slice of the global
batch and the batch becomes one global array; the jitted step (mimajax/train_step.py) updates
every group. Checkpoints (Orbax, async) hold the state and every host's iterator position; a
rerun in the same workdir resumes from the newest one and continues exactly as if never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mimajax import checkpointing, families, sharding, train_step
from mimajax.training import reporting as train_metrics
from mimajax.training import workdir_lock

log = logging.getLogger("mimajax.train")


@dataclasses.dataclass
class Run:
  """Everything the loop holds; `state` is the only thing that changes between steps (and the iterator)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: families.Task
  state: train_step.TrainState
  state_shardings: Any
  frozen: Any
  frozen_shardings: Any
  step_fn: Any  # (state, batch, frozen) -> (state, metrics), not yet jitted: the batch shardings come with the data
  metrics_sharding: Any
  iterator: Any


def check_config(config: ml_collections.ConfigDict) -> None:
  """The loop's own fields; raises ValueError naming the first inconsistent one (the family checks the rest)."""
  if config.total_steps < 1:
    raise ValueError(f"config.total_steps must be >= 1; got {config.total_steps}")
  if config.data.batch_size % jax.process_count():
    raise ValueError(
      f"global batch {config.data.batch_size} does not split over {jax.process_count()} hosts (config.data.batch_size)"
    )
  from mimajax.evaluation import during_training  # the face networks load only when an evaluation runs

  during_training.check_config(config)


def _host_batch(batch: dict, keys) -> dict:
  return {k: batch[k] for k in keys} if keys is not None else dict(batch)


def check_workdir_family(config: ml_collections.ConfigDict, workdir: Path) -> str | None:
  """The family the workdir's run records (None for a new workdir); a config of another family is refused."""
  recorded = checkpointing.recorded_family(workdir)
  wanted = families.name_of(config)
  if recorded is not None and recorded != wanted:
    raise ValueError(f"{workdir} holds a {recorded!r} run; this config trains {wanted!r} (config.model.family)")
  return recorded


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """A workdir holds one run: refuse a config of another family, or one the family says does not continue
  that run (`Family.check_resume`: MIMAFace's stage, model sizes, ...), before anything in it is touched."""
  recorded = check_workdir_family(config, workdir)
  if recorded is None:
    return
  family = families.get(recorded)
  if family.check_resume is None:
    return
  try:
    family.check_resume(checkpointing.read_config(workdir), config)
  except ValueError as e:
    raise ValueError(
      f"{workdir} holds a run this config does not continue: {e}. Nothing was changed. To continue that run, "
      f"rerun it with the config it was started with (its config.json); to start a new run from it, use a new "
      f"--workdir with --config.train.init_from={workdir}"
    ) from e


def preflight(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> families.Family:
  """Every check that needs nothing built and writes nothing: the loop's fields, the family's, the workdir's."""
  check_config(config)
  family = families.get(families.name_of(config))
  # Which run the workdir holds comes first: a config of another family is the mistake to name, whatever else
  # in it (a data path of this machine, say) is also off.
  check_workdir_family(config, Path(workdir))
  family.check_config(config)
  check_workdir(config, Path(workdir))
  return family


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[Run, checkpointing.Checkpointer]:
  """Mesh, the family's task, sharded state (restored from the workdir when it has a checkpoint), the step."""
  family = preflight(config, workdir)
  workdir = Path(workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  if config.data.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(
      f"global batch {config.data.batch_size} does not split over the mesh's data x fsdp = "
      f"{mesh.shape['data']} x {mesh.shape['fsdp']} devices"
    )
  workdir.mkdir(parents=True, exist_ok=True)
  task = family.build_task(config, workdir)
  optimizers = group_optimizers(task)
  state = init_sharded_state(task, optimizers, jax.random.key(config.seed), mesh, ema=bool(config.train.ema_decay))
  state_sh = shardings_of(state)
  frozen, frozen_sh = None, None
  if task.frozen is not None:
    frozen_sh = frozen_shardings(task.frozen, task.frozen_rules or {}, mesh)
    frozen = jax.device_put(task.frozen, frozen_sh)
  step = build_step(task, config, optimizers)
  ckpt = checkpointing.Checkpointer(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)  # fmt: skip
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state, state_sh)  # the newest intact step (damaged newer ones reported)
    if data_state is not None:
      task.iterator.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, ckpt.restored_step)
  elif task.init_params is not None:
    params = task.init_params(state.params)
    # The EMA starts from where the run starts (pretrained weights, an earlier stage), not from the random init.
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
    state = jax.device_put(dataclasses.replace(state, params=params, ema_params=ema), state_sh)
  run = Run(config, mesh, task, state, state_sh, frozen, frozen_sh, step, sharding.replicated(mesh), task.iterator)
  return run, ckpt


def frozen_shardings(frozen: dict, rules: dict, mesh) -> dict:
  """Each frozen part laid out by its rules (nnx States), or replicated when it has none."""
  rep = sharding.replicated(mesh)
  return {
    k: sharding.state_shardings(v, mesh, rules[k]) if rules.get(k) is not None else jax.tree.map(lambda _: rep, v)
    for k, v in frozen.items()
  }


def abstract_tree(tree, shardings):
  """A tree of arrays as ShapeDtypeStructs carrying the given shardings (nothing allocated)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s), tree, shardings)


def state_layout(task: families.Task, optimizers, mesh, *, ema: bool = False) -> tuple[Any, Any]:
  """(shapes, shardings) of the TrainState, as jax.ShapeDtypeStruct and NamedSharding trees, with nothing allocated:
  each group's parameters laid out by its logical rules, its optimizer moments and EMA like the parameters,
  counters, rng and extra replicated. `init_sharded_state` places a state by it; `mimajax bench memory` compiles
  the step against it at sizes whose state would not fit in this host's memory."""
  _, params, rests = train_step.split_groups(task.modules)
  buffers = train_step.carried(rests)
  rep = sharding.replicated(mesh)
  param_sh = {g: sharding.state_shardings(params[g], mesh, task.axis_rules[g]) for g in params}
  params = abstract_tree(params, param_sh)
  opt_state = {g: jax.eval_shape(tx.init, params[g]) for g, tx in optimizers.items()}
  opt_sh = {g: like_params(opt_state[g], params[g], rep) for g in opt_state}
  buffer_sh = {g: sharding.state_shardings(b, mesh, task.axis_rules[g]) for g, b in buffers.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  shapes = train_step.TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    opt_state=opt_state,
    rng=key,
    extra=jax.eval_shape(lambda: task.extra) if task.extra is not None else None,
    ema_params=params if ema else None,
    buffers=abstract_tree(buffers, buffer_sh) if buffers else None,
  )
  shardings = train_step.TrainState(
    step=rep,
    params=param_sh,
    opt_state=opt_sh,
    rng=rep,
    extra=jax.tree.map(lambda _: rep, task.extra) if task.extra is not None else None,
    ema_params=param_sh if ema else None,
    buffers=buffer_sh if buffers else None,
  )
  return shapes, shardings


def group_optimizers(task: families.Task) -> dict:
  """Each parameter group's optax transformation, from the task's OptimizerConfigs."""
  return {g: train_step.make_group_optimizer(p, task.optimizers[g])
          for g, p in train_step.split_groups(task.modules)[1].items()}  # fmt: skip


def build_step(task: families.Task, config: ml_collections.ConfigDict, optimizers) -> Callable:
  """The family's train step on the shared loop (not jitted: `train_step.jit_train_step`): every group's loss and
  update, the untrained parameters masked, accumulation, EMA, the task's prepare and extra-state update."""
  graphdefs, params, rests = train_step.split_groups(task.modules)
  untrained = {g: train_step.untrained_paths(params[g], task.optimizers[g]) for g in params}
  t = config.train
  return train_step.make_train_step(graphdefs, task.losses, optimizers, rests=rests, untrained=untrained,
                                    accumulation_steps=t.accumulation_steps, ema_decay=t.ema_decay or None,
                                    prepare=task.prepare, update_extra=task.update_extra)  # fmt: skip


def init_sharded_state(task: families.Task, optimizers, rng, mesh, *, ema: bool = False) -> train_step.TrainState:
  """The TrainState laid out on the mesh by `state_layout` (tx.init under jit with explicit out_shardings)."""
  _, params, rests = train_step.split_groups(task.modules)
  buffers = train_step.carried(rests)
  _, sh = state_layout(task, optimizers, mesh, ema=ema)
  params = jax.device_put(params, sh.params)
  opt_state = {g: jax.jit(tx.init, out_shardings=sh.opt_state[g])(params[g]) for g, tx in optimizers.items()}
  return train_step.TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), sh.step),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(rng, sh.rng),
    extra=jax.device_put(task.extra, sh.extra) if task.extra is not None else None,
    ema_params=jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh.params)(params) if ema else None,
    buffers=jax.device_put(buffers, sh.buffers) if buffers else None,
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
  preflight(config, workdir)  # a refused config never creates or locks the workdir
  lock = workdir_lock.hold(workdir)  # one run per workdir, taken before anything is written
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: Path) -> train_step.TrainState:
  run, ckpt = setup(config, workdir)
  if not config.model.get("family"):  # record the family the run resolved, so the workdir names it
    with config.unlocked():
      config.model.family = families.name_of(config)
  checkpointing.write_config(workdir, config)  # after the setup's checks and restore: a failed start changes nothing
  state = run.state
  ckpt.precompile(state)  # the checksum program of the saves, compiled while the step compiles
  start = int(jax.device_get(state.step))
  total = config.total_steps
  task = run.task
  reporter = train_metrics.Reporter(workdir, config, start=start, total=total)
  family = families.get(families.name_of(config))
  eval_every = int(config.eval.get("every_steps") or 0) if "eval" in config else 0
  if eval_every and family.load_animator is None:
    log.warning(
      "config.eval.every_steps=%d: the %r family has no animator to evaluate; skipped", eval_every, family.name
    )
    eval_every = 0
  evaluator = None
  if eval_every:
    from mimajax.evaluation.during_training import TrainingEvaluator

    evaluator = TrainingEvaluator(config)  # its pairs and networks now: a missing weight file fails at the start
  preempt = checkpointing.PreemptionFlag().install()
  compiled = None
  step = start
  every = config.sample.every_steps if "sample" in config else 0
  # The host never waits for the device on an ordinary step: step n's metrics (its NaN flag, the logged scalars)
  # are read after step n + 1 is dispatched, so the device always has the next step queued while the host checks,
  # logs and loads the batch after it. A step whose state leaves the device (a checkpoint, samples, an evaluation,
  # the last step, a preemption) is checked before that, so nothing non-finite is ever written and a non-finite step
  # stops the run naming itself, with the checkpoint before it the newest.
  unchecked = None  # (step, metrics) dispatched and not yet checked

  def check(pending) -> None:
    n, metrics = pending
    try:
      train_step.check_finite(metrics, n)
    except FloatingPointError:
      ckpt.wait()  # the last good checkpoint stays the newest
      raise
    reporter.step(n, metrics, images=task.images_per_step)

  try:
    while step < total:
      host = _host_batch(next(run.iterator), task.batch_keys)
      batch = sharding.to_global(host, run.mesh)
      if compiled is None:
        shardings = {k: v.sharding for k, v in batch.items()}
        jitted = train_step.jit_train_step(run.step_fn, run.state_shardings, shardings, run.metrics_sharding,
                                           run.frozen_shardings)  # fmt: skip
        compiled = jitted.lower(state, batch, run.frozen).compile()
        reporter.set_flops(train_metrics.compiled_flops(compiled))
      state, metrics = compiled(state, batch, run.frozen)
      step += 1
      if unchecked is not None:
        check(unchecked)  # the previous step, finished or nearly, while this one runs
      unchecked = (step, metrics)
      stop = preempt.reached(step)
      # decided alike on every process: the save it forces is collective
      evaluate = eval_every and (step % eval_every == 0 or step == total) and not stop
      force = stop or step == total or evaluate
      sample = task.write_samples is not None and every and (step % every == 0 or step == total)
      if force or sample or ckpt.due(step):
        check(unchecked)  # this step's state is about to leave the device: it must be finite
        unchecked = None
      ckpt.save(step, state, run.iterator.get_state(), force=force)
      if evaluate:
        ckpt.wait()  # the animator loads the step just saved: what `mimajax evaluate --checkpoint` would score
        scalars = evaluator(family, workdir)  # every process: the checkpoint restore is collective
        if jax.process_index() == 0 and scalars:
          reporter.writer.write_scalars(step, scalars)
      if stop:
        log.warning("preempted (SIGTERM): saved step %d to %s", step, ckpt.directory)
        break
      if sample:
        params, frozen, buffers = state.ema_params or state.params, run.frozen, state.buffers
        if jax.process_count() > 1:  # parameters sharded across hosts: every host joins the gather
          params, frozen, buffers = multihost_utils.process_allgather((params, frozen, buffers), tiled=True)
        if jax.process_index() == 0:
          task.write_samples(workdir, step, params, frozen, host, buffers)
  finally:
    preempt.uninstall()
    ckpt.close()
    reporter.close()
  summary = reporter.summary()
  if summary:
    print(f"train {config.name}: {summary}", flush=True)  # the last logged figures, on stdout
  return state


# ----------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
  """`mimajax train --config FILE[:arg] --workdir DIR [--config.x=y ...]` (absl/ml_collections flags).

  Errors are one or two lines on stderr (mimajax/cli_errors.py): exit 2 for bad flags or configs (a missing or
  broken config file, an unknown field, a value the checks refuse), 1 when training fails (a non-finite loss).
  """
  import re

  from absl import flags
  from ml_collections import config_flags

  from mimajax import cli_errors

  prog = "mimajax train"
  usage = "expected --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]"

  def flag_value(name: str) -> str | None:
    for i, arg in enumerate(argv):
      if arg == name and i + 1 < len(argv):
        return argv[i + 1]
      if arg.startswith(name + "="):
        return arg.split("=", 1)[1]
    return None

  def parse(args: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    saved_argv, sys.argv = sys.argv, args  # config_flags finds `--config.x=y` overrides in sys.argv
    try:
      config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", flag_values=fv,
                                      lock_config=True)  # fmt: skip
      flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples; rerun to resume", flag_values=fv)
      fv(args)
    finally:
      sys.argv = saved_argv
    return fv

  def unknown_field(e: Exception) -> str:
    """`--config.data.no_such=1`: ml_collections says only KeyError("'no_such'"); name the override and the fields."""
    found = re.search(r"'([^']+)'", str(e))
    name = found.group(1) if found else str(e)
    override = next((a for a in argv if a.startswith("--config.") and name in a.split("=", 1)[0].split(".")), None)
    path = override.split("=", 1)[0][2:].split(".") if override else ["config", name]
    parent = path[: path.index(name)] if name in path else path[:-1]
    fields = ""
    try:  # the config as the file makes it, without the overrides
      node = parse(["mimajax train", "--config", config_arg]).config
      for key in parent[1:]:
        node = node[key]
      fields = f"; its fields: {', '.join(sorted(node.keys()))}"
    except Exception:  # noqa: BLE001  (the listing is a courtesy)
      pass
    return f"{override or name}: {'.'.join(parent)} has no field {name!r}{fields}"

  config_arg = flag_value("--config")
  if config_arg is not None and not Path(config_arg.split(":", 1)[0]).is_file():
    return cli_errors.fail(prog, f"--config {config_arg}: no such file; expected an experiment config file such "
                                 "as configs/tiny.py")  # fmt: skip
  try:
    fv = parse(["mimajax train", *argv])
  except AttributeError as e:  # an override of a field the config does not have
    return cli_errors.fail(
      prog, unknown_field(e) if any(isinstance(x, KeyError) for x in (*e.args, e.__context__)) else str(e)
    )
  except flags.Error as e:  # an unknown flag, a value of the wrong type
    return cli_errors.fail(prog, f"{e}; {usage}")
  except Exception as e:  # noqa: BLE001  (the config file itself fails: a syntax error, its get_config raising)
    return cli_errors.report(prog, e, code=cli_errors.BAD_INPUT, context=f"cannot load --config {config_arg}")
  if config_arg is None or not fv.workdir:
    return cli_errors.fail(prog, f"--config and --workdir are required; {usage}")
  try:
    config = fv.config
    config.get("total_steps")  # a config file that failed to load fails here
  except Exception as e:  # noqa: BLE001
    return cli_errors.report(prog, e, code=cli_errors.BAD_INPUT, context=f"cannot load --config {config_arg}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  try:
    train(config, fv.workdir)
  except FloatingPointError as e:  # the run failed (the last good checkpoint is kept)
    return cli_errors.report(prog, e, code=cli_errors.FAILED)
  except ValueError as e:  # a config or workdir the checks refuse (CheckpointReadError included)
    return cli_errors.report(prog, e, code=cli_errors.BAD_INPUT)
  return 0
