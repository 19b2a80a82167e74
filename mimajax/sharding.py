"""The device mesh and the map from the modules' logical axis names to mesh axes.

Parameters carry logical names (`embed`, `heads`, `mlp`, `conv_out`, ...) in their `out_sharding`
metadata; the config's rules (`configs/common.py`) say which mesh axis each name is split over.
A name whose dimension does not divide by its mesh axis, or whose mesh axis is already used by an
earlier dimension of the same array, stays replicated: tiny configs shard as far as they can and
never fail. Batches are split over ("data", "fsdp") — FSDP shards the batch as well as the weights.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one entry may be -1 for all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into a mesh with fixed axes of product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; {len(devices)} available"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
  """PartitionSpec for an array with these logical dimension names under the rules."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or used.intersection(axes) or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | Mapping[str, Rules]) -> Any:
  """NamedShardings for every variable of an nnx State (unannotated ones replicated).

  `rules` is one rule list, or a mapping from the state's top-level names (model parts such as "unet",
  "clip") to each part's rules.
  """
  per_part = isinstance(rules, Mapping)

  def one(path, var):
    names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    shape = np.shape(var[...]) if hasattr(var, "__getitem__") else np.shape(var)
    part_rules = rules
    if per_part:
      part = str(getattr(path[0], "key", path[0]))
      if part not in rules:
        raise ValueError(f"no logical axis rules for model part {part!r}; rules are given for {sorted(rules)}")
      part_rules = rules[part]
    spec = logical_to_spec(names, shape, part_rules, mesh) if names else P()
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch (numpy, leading axis = its share) -> global arrays split over `BATCH_AXES`.

  The one place a host batch becomes device arrays: every host passes its own rows
  (`jax.make_array_from_process_local_data`), so no host ever holds the global batch.
  """
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()
  }


# ----------------------------------------------------------------------------- per-host inference (evaluation)


def local_rows_mesh() -> Mesh:
  """A 1-D ("data",) mesh over this process's devices: inference whose rows (frames) are independent, such as the
  evaluation networks, splits each batch over it, with the weights replicated."""
  return Mesh(np.asarray(jax.local_devices()), ("data",))


def rows_multiple(rows: int, mesh: Mesh) -> int:
  """`rows` rounded up to a multiple of the mesh's devices (callers pad their last batch to it)."""
  d = mesh.devices.size
  return -(-max(1, rows) // d) * d


def split_rows(x, mesh: Mesh) -> jax.Array:
  """A host array placed with its leading axis split over the mesh (which must divide it)."""
  return jax.device_put(np.asarray(x), NamedSharding(mesh, P("data", *([None] * (np.ndim(x) - 1)))))


def replicate(tree, mesh: Mesh):
  """Every leaf of `tree` replicated on each device of the mesh (a network's weights for `split_rows` batches)."""
  return jax.device_put(tree, replicated(mesh))
