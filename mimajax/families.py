"""Model families: the small contract a family fulfils for the shared loop, and the registry it is found in.

A family (MIMAFace, MMFA, a test's toy GAN) is a package on top of the shared library. The shared
code never imports one: the training loop, `animate` and `export` ask this registry for the name
in `config.model.family` (recorded in every workdir's config.json), and the registry imports the
family's module by name. A family hands the loop a `Task`: its parameter groups, one loss per
group, their optimizers and axis rules, the frozen parts and how a batch is prepared on device,
its extra state, and how to start from pretrained weights and draw samples. Everything else (the
loop, Orbax checkpoints with exact resume, SIGTERM saves, the NaN guard, metrics, per-host
loading and sharding) is one code path for every family.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx

from mimajax import checkpointing
from mimajax.sharding import Rules

# Workdirs written before families were recorded hold MIMAFace runs.
DEFAULT_FAMILY = "mimaface"
# Families that ship with mimajax, found by module name (an import here would tie the library to them).
BUILTIN = {"mimaface": "mimajax.mimaface.family", "mmfa": "mimajax.mmfa.family"}

# (modules by group, batch on device, step rng, extra state) -> (scalar loss, aux). `aux` holds scalars
# (logged) and arrays (e.g. MIMAFace's ID tokens for its memory bank), which `update_extra` may read.
LossFn = Callable[[Mapping[str, nnx.Module], Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW on the parameters matching `trainable` (path regexes within the group; empty: all of them)."""

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  weight_decay: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  max_grad_norm: float | None = 1.0
  trainable: Sequence[str] = ()


@dataclasses.dataclass
class Task:
  """What a family builds for one config: everything the shared loop needs and nothing it must know.

  Groups are updated from the same parameters in one step (a GAN's generator and discriminator see
  each other's pre-step weights, as face-vid2vid's alternating PyTorch loop does): group g's gradient
  is that of `losses[g]` with respect to group g only. Every loss gets the same step key, so a
  discriminator's loss judges the very fakes the generator's loss drew. Only process 0 writes
  samples, from parameters gathered to it (every process takes part in the gather).
  """

  modules: Mapping[str, nnx.Module]  # parameter groups by name: {"model": MIMAFace} or {"generator", ...}
  losses: Mapping[str, LossFn]  # one per group
  optimizers: Mapping[str, OptimizerConfig]  # one per group
  axis_rules: Mapping[str, Rules | Mapping[str, Rules]]  # per group: one rule list, or per top-level part
  iterator: Any  # host batches (dicts of numpy arrays, this host's rows) with get_state() / set_state()
  images_per_step: int  # for images/s in the metrics
  batch_keys: Sequence[str] | None = None  # what of a host batch goes to the device (None: everything)
  frozen: Mapping[str, Any] | None = None  # named parts the step reads but never trains (a VAE's weights), as arguments
  frozen_rules: Mapping[str, Rules | Mapping[str, Rules] | None] | None = None  # per top-level key; None: replicated
  prepare: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]] | None = None  # (frozen, batch) on device
  extra: Any = None  # family state carried in the TrainState (replicated), e.g. the identity memory bank
  update_extra: Callable[[Any, Mapping[str, dict], Mapping[str, jax.Array]], Any] | None = None  # (extra, aux, batch)
  init_params: Callable[[dict[str, nnx.State]], dict[str, nnx.State]] | None = None  # fresh run: pretrained / stage
  write_samples: Callable[[Path, int, dict[str, nnx.State], Any, dict, Any], Path | None] | None = None
  # (workdir, step, parameters by group (EMA when kept), frozen on device, host batch, buffers by group (BatchNorm
  # statistics) or None) -> image written


@dataclasses.dataclass(frozen=True)
class Command:
  """A family's command-line verb (`animate`, `export`): its argparse arguments and its run(args) -> exit code."""

  add_arguments: Callable[[Any], None]
  run: Callable[[Any], int]
  help: str = ""


@dataclasses.dataclass(frozen=True)
class Animator:
  """A trained model as `mimajax evaluate` drives it: one source face crop and a driver's frames in, frames out.

  Inputs are face crops as `mimajax prepare` writes them (square, uint8) with their coefficient rows when the data
  has them (MIMAFace's motion comes from them; a keypoint model reads the driver's frames). Output: (T, R, R, 3)
  uint8 at the model's `resolution`, one frame per driver frame.
  """

  name: str  # what is scored, for the report: family, checkpoint and step
  resolution: int
  # (source crop (H, W, 3), source row (C,) | None, driver crops (T, H, W, 3), driver rows (T, C) | None, seed)
  animate: Callable[[Any, Any, Any, Any, int], Any]
  training_data: str | None = None  # the data the model was trained on (config.data.path), when recorded


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its name, its config check, the task it builds, and its command-line verbs."""

  name: str
  build_task: Callable[[Any, Path], Task]  # (config, workdir) -> Task
  check_config: Callable[[Any], None] = lambda config: None  # raises ValueError naming the field
  commands: Mapping[str, Command] = dataclasses.field(default_factory=dict)
  # (the workdir's recorded config, this run's config): raises ValueError naming a field that may not change
  # when a run continues in its workdir (see `compare_fields`); called before anything in the workdir is touched
  check_resume: Callable[[Any, Any], None] | None = None
  # (a trained model on disk, evaluation options: sampler steps, ...) -> Animator (what `mimajax evaluate` scores)
  load_animator: Callable[[Path, Mapping[str, Any]], Animator] | None = None
  # (a trained model on disk, server options: VAE folder, ...) -> mimajax.serving.ServedModel (what `mimajax serve`
  # runs: the model loaded once, its drivers and controls, animate(request, progress))
  load_served: Callable[[Path, Mapping[str, Any]], Any] | None = None


_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Makes `family` available under `family.name` (tests and third-party families; builtins load themselves)."""
  _REGISTERED[family.name] = family
  return family


def get(name: str) -> Family:
  """The family called `name`: registered, or a builtin imported on first use."""
  if name not in _REGISTERED:
    if name not in BUILTIN:
      raise ValueError(f"unknown model family {name!r}; known: {sorted(set(BUILTIN) | set(_REGISTERED))}")
    try:
      module = importlib.import_module(BUILTIN[name])
    except ModuleNotFoundError as e:
      raise ValueError(f"model family {name!r} is not available in this installation ({e})") from e
    register(module.FAMILY)
  return _REGISTERED[name]


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _plain(x):
  """ConfigDicts, dicts, lists and tuples as plain dicts and tuples (config.json reads lists back as tuples)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_plain(v) for v in x)
  return x


def _differences(prefix: str, a, b) -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _differences(f"{prefix}.{k}", a.get(k), b.get(k))]
  return [] if a == b else [f"config.{prefix}: {a!r} in the workdir's run, {b!r} in this one"]


def compare_fields(saved, config, fields: Sequence[str]) -> None:
  """Raises ValueError naming every one of `fields` (dotted paths; whole sub-configs allowed) that differs
  between a workdir's recorded config and this run's. Fields the recorded config lacks (older runs) pass."""
  found = []
  for field in fields:
    old, new = _lookup(saved, field), _lookup(config, field)
    if old is _MISSING or new is _MISSING:
      continue
    found += _differences(field, _plain(old), _plain(new))
  if found:
    raise ValueError("; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else ""))


def name_of(config) -> str:
  """The family a config belongs to (`config.model.family`; configs from before families: MIMAFace)."""
  model = config.get("model") if hasattr(config, "get") else None
  name = model.get("family") if model is not None and hasattr(model, "get") else None
  return str(name or DEFAULT_FAMILY)


def family_of_checkpoint(path: str | os.PathLike) -> str:
  """The family of a trained model on disk: a workdir or step folder (config.json), else MIMAFace (its export
  and official release folders predate families)."""
  return checkpointing.recorded_family(path) or DEFAULT_FAMILY
