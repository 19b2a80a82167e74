"""`mimajax bench memory`: a training step's memory per device under FSDP, read from the compiler on simulated devices.

  mimajax bench memory [--configs configs/sd15_stage1.py,configs/sd15_stage2.py] [--devices 1,2,4,8]
                       [--remat none,full,dots,dots_no_batch] [--data data/demo] [--no-compile]

For each stage config and remat policy the whole step (the family's task on the shared loop: prepare with the frozen
VAE and renderer, every group's loss and gradient, the optimizer update) is lowered and compiled, never run, on 1, 2,
4 and 8 CPU devices over the `fsdp` mesh axis, against the state's shapes and shardings (`train.state_layout`:
nothing of the state is allocated, so the SD1.5 stages at 512 px compile on a laptop). The batch per device is fixed,
so the global batch grows with the mesh (weak scaling, as on a cluster). Per device:

  state      parameters + optimizer state (+ EMA, BatchNorm buffers) a device holds, summed from the shardings (exact)
  ideal      the whole state / N: FSDP with every array split evenly
  overhead   state / ideal: what replicated arrays (biases, norms, dimensions that do not divide) cost
  arguments  memory_analysis(): everything the program takes (state, batch, the frozen VAE and face model)
  temp       memory_analysis(): activations and scratch the program allocates (what remat policies trade)

The last line is `fsdp8_overhead=<state per device at 8 devices / (whole state / 8)>`, the worst config.

What is not the GPU's figure: XLA:CPU plans its own buffers (a GPU's temp differs in absolute terms; the trend with
N and with the remat policy is what carries over), and cuDNN attention cannot compile on a CPU, so a config asking
for it is compiled with "blockwise" (memory-efficient attention; XLA's would materialise every score matrix).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from mimajax import families, sharding, train, train_step
from mimajax.models import remat

DEFAULT_CONFIGS = ("configs/sd15_stage1.py", "configs/sd15_stage2.py")
DEFAULT_DEVICES = (1, 2, 4, 8)
# The configs are written for one node of 8 GPUs: their global batch over 8 is the batch each device sees.
NODE_DEVICES = 8


def load_config_file(spec: str):
  """A config file's get_config(arg), from "path/to/config.py[:arg]" (as `mimajax train --config` takes it)."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise ValueError(f"config file {path} does not exist (expected e.g. configs/sd15_stage1.py)")
  module_spec = importlib.util.spec_from_file_location(f"mimajax_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def simulate_cpu_devices(n: int) -> None:
  """Asks for `n` CPU devices; only possible before JAX starts its backends (the CLI calls this first)."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # backends already started: whatever they have is checked below
  if jax.device_count("cpu") < n:
    raise ValueError(
      f"bench memory needs {n} CPU devices and JAX has {jax.device_count('cpu')}: run it in a fresh process, or set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python"
    )


@dataclasses.dataclass(frozen=True)
class Row:
  config: str
  remat: str
  devices: int
  batch: int  # global
  state_bytes: float  # per device
  ideal_bytes: float  # whole state / devices
  argument_bytes: float | None  # None: not compiled (--no-compile)
  temp_bytes: float | None
  compile_s: float | None

  @property
  def overhead(self) -> float:
    return self.state_bytes / self.ideal_bytes


def tree_bytes(shapes, shardings=None) -> float:
  """Bytes of a tree of ShapeDtypeStructs: whole (no shardings), or what one device holds of each leaf."""
  leaves = jax.tree.leaves(shapes)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = 0.0
  for x, s in zip(leaves, shards):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      continue  # the rng: a few bytes
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += float(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def measure(config, *, name: str, devices: Sequence[int], policies: Sequence[str], batch_per_device: int,
            data: str, compile: bool = True, log: Callable[[str], None] = print) -> list[Row]:  # fmt: skip
  """The rows of one config: every policy at every device count (compile=False: the state's rows only, one per
  device count, from the layout alone; the remat policy does not change the state)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.update(path=data, batch_size=batch_per_device, workers=0, read_threads=1)
    if config.model.get("attention_impl") == "cudnn":
      config.model.attention_impl = "blockwise"  # cuDNN does not compile on a CPU (see the module docstring)
  family = families.get(families.name_of(config))
  family.check_config(config)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:  # build_task may keep files there (MIMAFace's random VAE)
    task = family.build_task(config, Path(workdir))
  log(f"{name}: built {family.name}'s task in {time.perf_counter() - t0:.0f} s; one batch of {batch_per_device} "
      f"from {data} for its shapes")  # fmt: skip
  host = next(task.iterator)
  host = {k: np.asarray(host[k]) for k in (task.batch_keys or host)}
  optimizers = train.group_optimizers(task)
  rows = []
  if not compile:
    for n in devices:
      mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.devices("cpu")[:n])
      shapes, shardings = train.state_layout(task, optimizers, mesh, ema=bool(config.train.ema_decay))
      row = Row(name, "-", n, batch_per_device * n, tree_bytes(shapes, shardings), tree_bytes(shapes) / n,
                None, None, None)  # fmt: skip
      log(format_row(row))
      rows.append(row)
    return rows
  for policy in policies:
    for module in task.modules.values():
      remat.set_remat(module, policy)  # every block of the shared U-Net (a module without one is unchanged)
    step = train.build_step(task, config, optimizers)
    t = config.train
    for n in devices:
      mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.devices("cpu")[:n])
      shapes, shardings = train.state_layout(task, optimizers, mesh, ema=bool(t.ema_decay))
      batch = {
        k: jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
        for k, v in host.items()
      }
      frozen, frozen_sh = None, None
      if task.frozen is not None:
        frozen_sh = train.frozen_shardings(task.frozen, task.frozen_rules or {}, mesh)
        frozen = train.abstract_tree(task.frozen, frozen_sh)
      jitted = train_step.jit_train_step(step, shardings, {k: v.sharding for k, v in batch.items()},
                                         sharding.replicated(mesh), frozen_sh)  # fmt: skip
      t1 = time.perf_counter()
      compiled = jitted.lower(shapes, batch, frozen).compile()
      seconds = time.perf_counter() - t1
      stats = compiled.memory_analysis()
      row = Row(name, policy, n, batch_per_device * n, tree_bytes(shapes, shardings), tree_bytes(shapes) / n,
                float(stats.argument_size_in_bytes), float(stats.temp_size_in_bytes), seconds)  # fmt: skip
      log(format_row(row))
      rows.append(row)
  return rows


HEADER = ("| config | remat | devices | batch | state / device | ideal (total / N) | overhead | arguments | temp "
          "| compile |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / 2**30:.3f} GiB"


def format_row(r: Row) -> str:
  seconds = "-" if r.compile_s is None else f"{r.compile_s:.0f} s"
  return (f"| {r.config} | {r.remat} | {r.devices} | {r.batch} | {_gib(r.state_bytes)} | {_gib(r.ideal_bytes)} | "
          f"{r.overhead:.3f} | {_gib(r.argument_bytes)} | {_gib(r.temp_bytes)} | {seconds} |")  # fmt: skip


def fsdp_overhead(rows: Sequence[Row], devices: int = 8) -> float | None:
  """The worst config's state per device at `devices` over its ideal (the state does not depend on remat)."""
  at = [r.overhead for r in rows if r.devices == devices]
  return max(at) if at else None


def add_arguments(p) -> None:
  p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                 help="memory: comma-separated config files (FILE[:ARG]); default SD1.5 stages 1 and 2")  # fmt: skip
  p.add_argument("--devices", default=",".join(map(str, DEFAULT_DEVICES)), help="memory: fsdp sizes compiled")
  p.add_argument("--remat", default=",".join(remat.POLICIES), help="memory: remat policies compiled")
  p.add_argument("--batch-per-device", type=int, default=None,
                 help=f"memory: default each config's global batch / {NODE_DEVICES} (one 8-GPU node)")  # fmt: skip
  p.add_argument("--no-compile", action="store_true",
                 help="memory: the state's rows only (exact from the shardings; an SD1.5 step takes minutes to "
                 "compile per mesh and policy on a CPU)")  # fmt: skip
  # --data (shared with the loader bench): a prepared dataset for the batch's shapes, resized to each config's size;
  # default data/demo


def main(args, log: Callable[[str], None] = print) -> int:
  devices = [int(d) for d in str(args.devices).split(",") if d]
  policies = [remat.check_policy(p) for p in str(args.remat).split(",") if p]
  simulate_cpu_devices(max(devices))
  args.data = args.data or "data/demo"
  if not Path(args.data).exists():
    raise ValueError(f"--data {args.data} does not exist (a `mimajax prepare` output; `python -m "
                     "data_pipeline.demo_data --output data/demo` builds one)")  # fmt: skip
  rows = []
  for spec in [s for s in str(args.configs).split(",") if s]:
    config = load_config_file(spec)
    per_device = args.batch_per_device or max(1, config.data.batch_size // NODE_DEVICES)
    path, _, arg = spec.partition(":")
    name = Path(path).stem + (f":{arg}" if arg else "")
    compile = not getattr(args, "no_compile", False)
    rows += measure(config, name=name, devices=devices, policies=policies, batch_per_device=per_device,
                    data=args.data, compile=compile, log=log)  # fmt: skip
    log(f"{spec}: " + (f"{len(policies)} policies x {len(devices)} meshes compiled" if compile else
                       f"the state on {len(devices)} meshes (not compiled)"))  # fmt: skip
  log(f"device: cpu, {jax.device_count('cpu')} simulated; sizes in GiB per device")
  log(HEADER)
  for r in rows:
    log(format_row(r))
  worst = fsdp_overhead(rows, max(devices))
  if worst is not None:
    log(f"fsdp{max(devices)}_overhead={worst:.3f}")
  return 0
