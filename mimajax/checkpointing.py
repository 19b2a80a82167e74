"""Training checkpoints (Orbax) and reading a trained model's parameters back, for every model family.

A workdir holds
  config.json                 the run's ml_collections config (written once, by process 0)
  ...                         what the family keeps beside them (MIMAFace: face_model.npz, vae/)
  checkpoints/<step>/state    the TrainState (parameter groups, their optimizers, the family's extra state,
                              EMA, step, rng) as sharded arrays
  checkpoints/<step>/data     every host's Grain iterator state (JSON), so the data stream resumes exactly

Saves are asynchronous (the device->host copy is synchronous, so the next step may donate the state);
the newest `keep` are kept; a SIGTERM (preemption) makes the loop save at the step it reached. A restore
reads each array straight into the sharding the current mesh asks for, so a run may resume on another
mesh shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mimajax.errors import CheckpointReadError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Workdirs written before model families and parameter groups: a MIMAFace run whose `params` are one group.
LEGACY_FAMILY = "mimaface"
LEGACY_GROUP = "model"


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Typed PRNG keys -> their uint32 data (what Orbax stores); everything else unchanged."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
  return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x, tree, template)


def _abstract(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (key data for typed keys)."""

  def one(x, s):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=s)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

  return jax.tree.map(one, tree, shardings)


class PreemptionFlag:
  """Set by SIGTERM (a scheduler's preemption notice); the training loop saves and stops when it sees it."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    """True on every host once any host was told to stop (multi-host: at an agreed step)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      flag = multihost_utils.process_allgather(np.int32(self._event.is_set()))
      return bool(np.max(flag)) or multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


@dataclasses.dataclass
class Checkpointer:
  """Orbax CheckpointManager over `workdir/checkpoints`: state + Grain iterator state per step."""

  workdir: str | os.PathLike
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    if self.every_steps < 1 or self.keep < 1:
      raise ValueError(f"checkpoint every_steps and keep must be >= 1; got {self.every_steps}, {self.keep}")
    self.directory = Path(self.workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self.keep,
      save_interval_steps=self.every_steps,
      enable_async_checkpointing=self.async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Any = None, *, force: bool = False) -> bool:
    """Saves when `step` is due (or force); returns whether a save started."""
    data = {"process_states": _gather_data_states(data_state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)), data=ocp.args.JsonSave(data))
    return self.manager.save(step, args=args, force=force)

  def restore(self, state_template, shardings, step: int | None = None) -> tuple[Any, Any]:
    """(state with `shardings`, this host's iterator state or None) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointReadError(f"no checkpoint under {self.directory}")
    target = _abstract(state_template, shardings)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
      if _is_legacy(self.directory / str(step)):
        raise CheckpointReadError(
          f"{self.directory / str(step)} was written before parameter groups and cannot be resumed in place; "
          f"`mimajax animate` and `export` read it as it is, and a new workdir can start from it with "
          f"--config.train.init_from={Path(self.workdir)}"
        ) from e
      raise CheckpointReadError(
        f"checkpoint {self.directory / str(step)} does not fit this run's model/optimizer "
        f"(was it written with another config?): {e}"
      ) from e
    states = (restored.data or {}).get("process_states") or []
    data_state = states[jax.process_index()] if jax.process_index() < len(states) else None
    return _data_to_keys(restored.state, state_template), data_state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _gather_data_states(data_state: Any) -> list:
  """Every host's iterator state, in process order (each host's is small JSON)."""
  if jax.process_count() == 1:
    return [data_state]
  from jax.experimental import multihost_utils

  encoded = json.dumps(data_state).encode()
  size = multihost_utils.process_allgather(np.int32(len(encoded)))
  buf = np.zeros(int(np.max(size)), np.uint8)
  buf[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = multihost_utils.process_allgather(buf)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, size)]


def write_config(workdir: str | os.PathLike, config) -> Path:
  """config.json in the workdir (process 0; written under a temporary name, then renamed)."""
  path = Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)
  return path


def read_config(workdir: str | os.PathLike):
  import ml_collections

  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointReadError(f"{path} is missing: {workdir} is not a mimajax training workdir")
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointReadError(f"{path} is unreadable: {e}") from e
  return ml_collections.ConfigDict(_tuples(raw))


def _tuples(x):
  """JSON lists back to tuples (configs hold tuples: block channels, axis rules, trainable patterns)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


# ----------------------------------------------------------------------------- trained models on disk


def step_folder(path: str | os.PathLike) -> Path:
  """A workdir (its newest checkpoint) or a checkpoint step folder -> the step folder."""
  path = Path(path)
  if (path / CHECKPOINT_DIR).is_dir():
    steps = sorted(int(p.name) for p in (path / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    if not steps:
      raise CheckpointReadError(f"{path} has no checkpoint under {CHECKPOINT_DIR}/ (did the run save one?)")
    return path / CHECKPOINT_DIR / str(steps[-1])
  if (path / "state").is_dir():
    return path
  raise CheckpointReadError(
    f"{path} is not a mimajax checkpoint: expected a training workdir (with {CHECKPOINT_DIR}/), a step folder "
    f"(with state/), or an official release folder (with mim.pth and 3dunet.pth)"
  )


def read_state(state_dir: str | os.PathLike) -> dict:
  """A saved TrainState as a nested dict of arrays on this process's first device, whatever mesh wrote it
  (a checkpoint of a pod run loads on one GPU or CPU)."""
  state_dir = Path(state_dir).absolute()
  ckptr = ocp.StandardCheckpointer()
  try:
    metadata = ckptr.metadata(state_dir).item_metadata
    if metadata is None:
      raise CheckpointReadError(f"{state_dir} has no array metadata (an incomplete or foreign save)")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata.tree)
    return ckptr.restore(state_dir, target)
  except CheckpointReadError:
    raise
  except Exception as e:  # noqa: BLE001 - Orbax raises many types for truncated / foreign folders
    raise CheckpointReadError(f"cannot read the checkpoint {state_dir}: {type(e).__name__}: {e}") from e


def recorded_family(path: str | os.PathLike) -> str | None:
  """The model family a workdir or step folder was trained as (config.json's model.family), or None when the
  path holds no training config. Workdirs from before families were recorded answer `LEGACY_FAMILY`."""
  path = Path(path)
  for workdir in (path, path.parent.parent):
    if (workdir / CONFIG_FILE).is_file():
      model = read_config(workdir).get("model")
      return str((model.get("family") if model is not None else None) or LEGACY_FAMILY)
  return None


def checkpoint_params(path: str | os.PathLike, group: str, *, ema: bool = False) -> dict[tuple[str, ...], np.ndarray]:
  """Every parameter of one parameter group of a checkpoint (workdir or step folder), keyed by path; the EMA
  copy when asked and kept. Checkpoints from before parameter groups hold their one group (`LEGACY_GROUP`,
  MIMAFace's "model") at the top of `params`."""
  step_dir = step_folder(path)
  state_dir = (step_dir / "state").absolute()
  restored = read_state(state_dir)
  tree = restored.get("ema_params") if ema and restored.get("ema_params") else restored.get("params")
  if not isinstance(tree, dict):
    raise CheckpointReadError(f"{state_dir} holds no parameters (not a mimajax TrainState)")
  legacy = _is_legacy(step_dir)
  if legacy and group != LEGACY_GROUP:
    raise CheckpointReadError(f"{state_dir} predates parameter groups and holds only {LEGACY_GROUP!r}, not {group!r}")
  if not legacy:
    if group not in tree:
      raise CheckpointReadError(f"{state_dir} has no parameter group {group!r}; it has {sorted(tree)}")
    tree = tree[group]
  flat: dict[tuple[str, ...], np.ndarray] = {}

  def collect(prefix, node):
    if isinstance(node, dict) and not (set(node) == {"value"} and not isinstance(node["value"], dict)):
      for k, v in node.items():
        collect(prefix + (str(k),), v)
    else:
      flat[prefix] = np.asarray(node["value"] if isinstance(node, dict) else node)

  collect((), tree)
  return flat


def _is_legacy(step_dir: Path) -> bool:
  """Whether a step folder's workdir was written before parameter groups (its config names no model family)."""
  workdir = step_dir.parent.parent
  if not (workdir / CONFIG_FILE).is_file():
    return False
  model = read_config(workdir).get("model")
  return model is None or not model.get("family")
