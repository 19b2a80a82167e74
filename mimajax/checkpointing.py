"""Training checkpoints (Orbax) and reading a trained model's parameters back, for every model family.

A workdir holds
  config.json                 the run's ml_collections config (written once, by process 0)
  ...                         what the family keeps beside them (MIMAFace: face_model.npz, vae/)
  checkpoints/<step>/state    the TrainState (parameter groups, their optimizers, the family's extra state,
                              EMA, step, rng) as sharded arrays
  checkpoints/<step>/data     every host's Grain iterator state (JSON), so the data stream resumes exactly
  checkpoints/<step>/checksums  a checksum of every array of the state, computed from the values saved
  checkpoints.damaged/<step>  a damaged step set aside when a resume fell back to an older one

Saves are asynchronous (the device->host copy is synchronous, so the next step may donate the state);
the newest `keep` are kept; a SIGTERM (preemption) makes the loop save at the step it reached. A restore
reads each array straight into the sharding the current mesh asks for, so a run may resume on another
mesh shape.

Integrity: Orbax checks the structure of what it reads (and TensorStore the OCDBT index), but not the
array bytes: a flipped bit in an array file reads back silently. So every save also records a 32-bit
checksum of each array (`checksums`), computed on device by a jitted reduction over each array of the
state being saved (before the asynchronous write starts, so it is of exactly the values written), and
every read recomputes it over what came back. A step that fails to read or to verify is damaged:
training resumes from the newest intact step (setting the damaged ones aside in checkpoints.damaged/),
inference reads the newest step whose *parameters* are intact (it never reads the optimizer state),
each with a warning naming both steps. The checksum of an array is a sum over its elements of a hash of
(element bits, flat index), so it does not depend on how the array is sharded: on several hosts each
array's checksum is one global reduction (partial sums per shard, one all-reduce of a word per array,
identical on every host), process 0 writes the record, and a checkpoint written on any mesh verifies
when read on any other, or on one device. Steps saved before checksums existed are read unverified.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mimajax.errors import CheckpointDamagedError, CheckpointReadError

log = logging.getLogger("mimajax.checkpointing")

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"  # damaged steps a resume fell back from, kept for inspection
CHECKSUMS_ITEM = "checksums"  # checkpoints/<step>/checksums/checksums.json
CHECKSUMS_FILE = "checksums.json"
CHECKSUM_FORMAT = "mimajax-mix32-v1"
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


# ----------------------------------------------------------------------------- checksums


def leaf_name(path) -> str:
  """A leaf's key path as "params/model/unet/conv_in/kernel/value": the same for the TrainState being saved and
  for the nested dicts / lists Orbax reads back (dataclass fields, dict keys, namedtuple fields, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser (every input bit flips each output bit with probability ~1/2)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """An array's bits as uint32 words (one per element; two for 8-byte types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _digest(x):
  """sum_i fmix32(bits_i ^ (i * golden + c)) mod 2^32 over the elements (i: the flat index). fmix32 is a bijection,
  so a change to any one element always changes the sum, and moved or several changed elements cancel out with
  probability 2^-32 (CRC32's). Elementwise work and one sum, no reshape: sharded arrays reduce per shard and then
  across devices, with no gather, and the result does not depend on the sharding."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.sum(_fmix32(w ^ (index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))), dtype=jnp.uint32)


@functools.lru_cache(maxsize=None)
def _digest_fn(out_sharding):
  # Saves: one program over all the arrays, one dispatch and one fetch (a program per array costs a dispatch
  # each, slow while Orbax's writer threads hold the GIL). It compiles once per process (the tiny MIMAFace's
  # 1160 arrays: ~10 s on 2 CPU cores); `Checkpointer.precompile` overlaps that with the step's compile.
  return jax.jit(lambda leaves: jnp.stack([_digest(x) for x in leaves]), out_shardings=out_sharding)


def _flat_arrays(tree) -> list[tuple[str, Any]]:
  is_placeholder = lambda x: x is ocp.PLACEHOLDER
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_placeholder)[0]
  return [(leaf_name(p), x) for p, x in flat if x is not None and not is_placeholder(x)]


def _out_sharding(arrays):
  """Replicated on the arrays' mesh (every host can read the result), or None for single-device arrays."""
  mesh = next((x.sharding.mesh for x in arrays if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None


def _program(arrays):
  return _digest_fn(_out_sharding(arrays))


@functools.lru_cache(maxsize=None)
def _array_digest_fn(out_sharding):
  return jax.jit(_digest, out_shardings=out_sharding)


def checksums(tree, *, compiled=None, per_array: bool = False) -> dict[str, str]:
  """{leaf name: 8 hex digits} of every array of `tree` (typed PRNG keys as their key data), computed on the
  devices holding them by one jitted program (`compiled`: its ahead-of-time compiled form for these arrays), one
  small fetch. Collective when the arrays span several hosts (every host gets the same record). `per_array`:
  a program per distinct shape instead (compiles much faster, dispatches once per array; what reads use)."""
  flat = _flat_arrays(_keys_to_data(tree))
  if not flat:
    return {}
  arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  values = None
  if per_array:
    digest = _array_digest_fn(_out_sharding(arrays))
    values = jax.device_get([digest(x) for x in arrays])  # dispatched asynchronously, fetched once
  elif compiled is not None:
    try:
      values = compiled(arrays)
    except (TypeError, ValueError):  # compiled for other shapes or shardings
      values = None
  if values is None:
    values = _program(arrays)(arrays)
  return {name: f"{int(v):08x}" for (name, _), v in zip(flat, np.asarray(values))}


def abstract_arrays(tree) -> list[jax.ShapeDtypeStruct]:
  """The arrays `checksums` reads from `tree` (typed keys as their key data), as shapes, dtypes and shardings."""

  def one(x):
    shape, dtype = (jax.eval_shape(jax.random.key_data, x).shape, jnp.uint32) if _is_key(x) else (np.shape(x), x.dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(x, "sharding", None))

  return [one(x) for _, x in _flat_arrays(tree)]


def compile_checksums(abstract: list[jax.ShapeDtypeStruct]):
  """The checksum program compiled ahead of time for these arrays (`abstract_arrays`; for `checksums(compiled=)`)."""
  return _program(abstract).lower(abstract).compile()


def _checksums_path(step_dir: Path) -> Path:
  return Path(step_dir) / CHECKSUMS_ITEM / CHECKSUMS_FILE


def saved_checksums(step_dir: str | os.PathLike) -> dict[str, str] | None:
  """The checksums recorded with a step, or None when it has none (saved before checksums, or not by mimajax)."""
  path = _checksums_path(Path(step_dir))
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointDamagedError(f"checkpoint {step_dir}: its checksum record {path} is unreadable: {e}") from e
  if record.get("format") != CHECKSUM_FORMAT:
    log.warning("%s: unknown checksum format %r; read unverified", path, record.get("format"))
    return None
  return dict(record["arrays"])


def verify(step_dir: str | os.PathLike, tree) -> bool:
  """Checks the arrays of `tree` (all of a step's state, or a part) against the checksums saved with the step;
  raises CheckpointDamagedError naming the arrays that differ. False: the step has no checksums to check."""
  saved = saved_checksums(step_dir)
  if saved is None:
    return False
  got = checksums(tree, per_array=True)
  bad = [name for name, value in got.items() if saved.get(name) != value]
  if bad:
    raise CheckpointDamagedError(
      f"checkpoint {step_dir} is damaged: {len(bad)} of {len(got)} arrays read back differ from the checksums "
      f"recorded when it was saved ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    )
  return True


def _brief(e: BaseException) -> str:
  """One line for a read error: the innermost cause (TensorStore's names the array and the byte range)."""
  chain, seen = [e], {id(e)}
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
    chain.append(nxt)
    seen.add(id(nxt))
  inner = chain[-1]
  text = (str(inner).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(inner).__name__}: {text[:300]}"


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
  """Orbax CheckpointManager over `workdir/checkpoints`: state + Grain iterator state + checksums per step."""

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
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in (
      ("state", ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
      ("data", ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
      (CHECKSUMS_ITEM, ocp.JsonCheckpointHandler(filename=CHECKSUMS_FILE), ocp.args.JsonSave, ocp.args.JsonRestore),
    ):
      registry.add(item, save, handler)
      registry.add(item, restore, handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    self.checksum_seconds: list[float] = []  # per save: computing the checksums (blocking the loop)
    self.restored_step: int | None = None
    self._compiling: threading.Thread | None = None
    self._compiled = None

  def precompile(self, state) -> None:
    """Compiles the checksum program for states like `state` in a background thread (the loop calls this before
    compiling its step, so the two compiles overlap); the first save waits for it."""

    abstract = abstract_arrays(state)  # now: the first step donates (deletes) the state's arrays

    def run():
      try:
        self._compiled = compile_checksums(abstract)
      except Exception as e:  # noqa: BLE001 - the save then compiles it itself
        log.warning("compiling the checkpoint checksums ahead of time failed (%s); the first save will", _brief(e))

    self._compiling = threading.Thread(target=run, name="mimajax-checksums-compile", daemon=True)
    self._compiling.start()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without force (config.checkpoint.every_steps)."""
    return bool(self.manager.should_save(step))

  def save(self, step: int, state, data_state: Any = None, *, force: bool = False) -> bool:
    """Saves when `step` is due (or force); returns whether a save started. The checksums are computed from
    `state` on device before Orbax copies it to the host, so they are of exactly the values written."""
    if not force and not self.manager.should_save(step):
      return False
    tree = _keys_to_data(state)
    start = time.perf_counter()
    if self._compiling is not None:
      self._compiling.join()
      self._compiling = None
    record = {"format": CHECKSUM_FORMAT, "step": step, "arrays": checksums(tree, compiled=self._compiled)}
    self.checksum_seconds.append(time.perf_counter() - start)
    data = {"process_states": _gather_data_states(data_state)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data), **{CHECKSUMS_ITEM: ocp.args.JsonSave(record)}
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, state_template, shardings, step: int | None = None) -> tuple[Any, Any]:
    """(state with `shardings`, this host's iterator state or None) of `step`, or by default of the newest intact
    step: a damaged newer one (unreadable, or arrays differing from their checksums) is reported, set aside in
    workdir/checkpoints.damaged/ and the next older one tried. `restored_step` says which step it was."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointReadError(f"no checkpoint under {self.directory}")
    target = _abstract(state_template, shardings)
    damaged: list[tuple[int, str]] = []
    for s in steps:
      try:
        state, data_state = self._restore_step(s, target, state_template)
      except CheckpointDamagedError as e:
        log.warning("%s", e)
        damaged.append((s, str(e)))
        continue
      if damaged:
        names = ", ".join(str(d) for d, _ in damaged)
        log.warning("checkpoint step(s) %s under %s are damaged; resuming from the newest intact one, step %d "
                    "(%s); the damaged ones are moved to %s", names, self.directory, s, self.directory / str(s),
                    Path(self.workdir).absolute() / DAMAGED_DIR)  # fmt: skip
        self._set_aside([d for d, _ in damaged])
      self.restored_step = s
      return state, data_state
    listing = "; ".join(reason for _, reason in damaged)
    raise CheckpointDamagedError(
      f"no intact checkpoint under {self.directory}: {listing}. Nothing was changed; start a new run in another "
      f"--workdir (or restore the files from a copy)"
    )

  def _restore_step(self, step: int, target, state_template):
    step_dir = self.directory / str(step)
    if _is_legacy(step_dir):
      raise CheckpointReadError(
        f"{step_dir} was written before parameter groups and cannot be resumed in place; `mimajax animate` and "
        f"`export` read it as it is, and a new workdir can start from it with --config.train.init_from="
        f"{Path(self.workdir)}"
      )
    _check_layout(step_dir, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many types for truncated or missing files
      raise CheckpointDamagedError(f"checkpoint {step_dir} is damaged: it does not read back ({_brief(e)})") from e
    verify(step_dir, restored.state)
    states = (restored.data or {}).get("process_states") or []
    data_state = states[jax.process_index()] if jax.process_index() < len(states) else None
    return _data_to_keys(restored.state, state_template), data_state

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of Orbax's directory (process 0), so the run saves those step numbers afresh."""
    if jax.process_index() == 0:
      root = Path(self.workdir).absolute() / DAMAGED_DIR
      root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest, n = root / str(step), 1
        while dest.exists():
          dest, n = root / f"{step}.{n}", n + 1
        shutil.move(str(self.directory / str(step)), str(dest))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("mimajax checkpoints set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_layout(step_dir: Path, target) -> None:
  """A step that does not hold this run's arrays (names and shapes) was written with another config: that is
  not damage, so it is refused naming the differences, not fallen back from."""
  try:
    metadata = ocp.StandardCheckpointer().metadata((step_dir / "state").absolute()).item_metadata
  except Exception as e:  # noqa: BLE001
    raise CheckpointDamagedError(f"checkpoint {step_dir} is damaged: its metadata does not read ({_brief(e)})") from e
  if metadata is None:
    raise CheckpointDamagedError(f"checkpoint {step_dir} is damaged: it has no array metadata")
  saved = {n: tuple(m.shape) for n, m in _flat_arrays(metadata.tree)}
  wanted = {n: tuple(t.shape) for n, t in _flat_arrays(target)}
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  shapes = sorted(n for n in set(saved) & set(wanted) if saved[n] != wanted[n])
  if missing or unexpected or shapes:
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:2])})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]  # fmt: skip
    raise CheckpointReadError(
      f"checkpoint {step_dir} does not fit this run's model/optimizer (was it written with another config?): "
      f"its arrays against this run's: {'; '.join(parts)}"
    )


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


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The checkpoint steps of a workdir, oldest first (empty when it has none)."""
  folder = Path(workdir) / CHECKPOINT_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def read_state(state_dir: str | os.PathLike, *, parts: tuple[str, ...] | None = None) -> dict:
  """A saved TrainState as a nested dict of arrays on this process's first device, whatever mesh wrote it
  (a checkpoint of a pod run loads on one GPU or CPU); only its top-level `parts` (e.g. ("params",)) when
  given, the others left out unread. What is read is checked against the step's checksums; a step that does
  not read back or verify raises CheckpointDamagedError."""
  state_dir = Path(state_dir).absolute()
  try:
    metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  except Exception as e:  # noqa: BLE001 - Orbax raises many types for truncated / foreign folders
    raise CheckpointDamagedError(f"cannot read the checkpoint {state_dir}: {_brief(e)}") from e
  if metadata is None:
    raise CheckpointDamagedError(f"{state_dir} has no array metadata (an incomplete, damaged or foreign save)")
  tree = metadata.tree
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = lambda key: parts is None or key in parts
  target, args = {}, {}
  for key, sub in tree.items():
    target[key] = jax.tree.map(
      lambda m, w=wanted(key): jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here) if w else ocp.PLACEHOLDER, sub
    )
    args[key] = jax.tree.map(
      lambda m, w=wanted(key): (
        ocp.ArrayRestoreArgs(sharding=here, global_shape=m.shape, dtype=m.dtype) if w else ocp.PLACEHOLDER
      ),
      sub,
    )
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args))
  except Exception as e:  # noqa: BLE001
    raise CheckpointDamagedError(
      f"checkpoint {state_dir.parent} is damaged: it does not read back ({_brief(e)})"
    ) from e
  restored = {k: v for k, v in restored.items() if wanted(k)}
  verify(state_dir.parent, restored)
  return restored


def recorded_family(path: str | os.PathLike) -> str | None:
  """The model family a workdir or step folder was trained as (config.json's model.family), or None when the
  path holds no training config. Workdirs from before families were recorded answer `LEGACY_FAMILY`."""
  path = Path(path)
  for workdir in (path, path.parent.parent):
    family = _written_family(workdir)
    if family is not None:
      return family or LEGACY_FAMILY
  return None


def _written_family(workdir: Path) -> str | None:
  """config.json's model.family: "" when the config predates families, None when the workdir has no config."""
  if not (workdir / CONFIG_FILE).is_file():
    return None
  model = read_config(workdir).get("model")
  return str((model.get("family") if model is not None else None) or "")


def checkpoint_params(path: str | os.PathLike, group: str, *, ema: bool = False) -> dict[tuple[str, ...], np.ndarray]:
  """Every parameter of one parameter group of a checkpoint (workdir or step folder), keyed by path; the EMA
  copy when asked and kept. Checkpoints from before parameter groups hold their one group (`LEGACY_GROUP`,
  MIMAFace's "model") at the top of `params`. A workdir's newest step whose parameters are intact is read
  (see `intact_params`)."""
  return intact_params(path, group, ema=ema)[1]


def intact_params(path: str | os.PathLike, group: str, *, ema: bool = False,
                  buffers: bool = False) -> tuple[Path, dict]:  # fmt: skip
  """(step folder, `checkpoint_params`): for a workdir, of its newest step whose parameters read back and match
  their checksums, a warning naming the damaged newer steps and the one used. Only the parameters are read, so
  a step whose damage is in its optimizer state still serves inference. A step folder is read as it is.
  buffers: also the group's carried non-parameter variables (BatchNorm statistics), under their own paths."""
  path = Path(path)
  if (path / CHECKPOINT_DIR).is_dir():
    steps = saved_steps(path)
    if not steps:
      raise CheckpointReadError(f"{path} has no checkpoint under {CHECKPOINT_DIR}/ (did the run save one?)")
    candidates = [path / CHECKPOINT_DIR / str(s) for s in reversed(steps)]
  else:
    candidates = [step_folder(path)]
  damaged = []
  for step_dir in candidates:
    try:
      flat = _group_params(step_dir, group, ema, buffers)
    except CheckpointDamagedError as e:
      log.warning("%s", e)
      damaged.append((step_dir, str(e)))
      continue
    if damaged:
      log.warning("the parameters of checkpoint(s) %s are damaged; using the newest intact one, %s",
                  ", ".join(str(d) for d, _ in damaged), step_dir)  # fmt: skip
    return step_dir, flat
  if len(candidates) == 1 and not (path / CHECKPOINT_DIR).is_dir():
    raise CheckpointDamagedError(f"{damaged[0][1]}; pass the workdir to use its newest intact step")
  raise CheckpointDamagedError(f"no checkpoint under {path / CHECKPOINT_DIR} has intact parameters: "
                               + "; ".join(r for _, r in damaged))  # fmt: skip


def _group_params(step_dir: Path, group: str, ema: bool, buffers: bool = False) -> dict[tuple[str, ...], np.ndarray]:
  state_dir = (step_dir / "state").absolute()
  part = "params"
  if ema:
    try:
      tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001
      raise CheckpointDamagedError(f"cannot read the checkpoint {state_dir}: {_brief(e)}") from e
    part = "ema_params" if tree.get("ema_params") else "params"
  restored = read_state(state_dir, parts=(part, "buffers") if buffers else (part,))
  tree = restored.get(part)
  if buffers and isinstance(tree, dict) and isinstance(restored.get("buffers"), dict) and group in restored["buffers"]:
    tree = {**tree, group: _merge_trees(tree.get(group, {}), restored["buffers"][group])}
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


def _merge_trees(a: dict, b: dict) -> dict:
  """Two nested dicts of disjoint leaves (a group's parameters and its buffers) as one."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _is_legacy(step_dir: Path) -> bool:
  """Whether a step folder's workdir was written before parameter groups (its config names no model family)."""
  return _written_family(step_dir.parent.parent) == ""
