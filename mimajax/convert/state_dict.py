"""NNX parameters <-> PyTorch state dicts (numpy arrays), by an explicit path-to-key map.

A parameter path such as `down_blocks/0/attentions/1/transformer_blocks/0/attn1/to_out/kernel` maps
to the PyTorch key `down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight`: the
module path joined with dots after the model family's renames, and the leaf converted by kind
(Linear kernels transposed, conv kernels HWIO <-> OIHW, norm `scale` <-> `weight`). Loading
checks the whole key set and every shape before anything is written into the model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from mimajax.errors import CheckpointKeyError

# (flax module-path fragment, torch fragment) pairs, applied to the dotted module path.
Renames = Sequence[tuple[str, str]]


def _dotted(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


def _replace_fragments(dotted: str, renames: Renames) -> str:
  padded = f".{dotted}."
  for old, new in renames:
    padded = padded.replace(f".{old}.", f".{new}.")
  return padded[1:-1]


def torch_layout(value: np.ndarray, leaf: str, as_conv1x1: bool = False) -> tuple[str, np.ndarray]:
  """(torch leaf name, array in torch layout) for an NNX leaf."""
  if leaf == "kernel":
    if value.ndim == 2:
      w = value.T
      return "weight", (w[:, :, None, None] if as_conv1x1 else w)
    if value.ndim == 4:  # HWIO -> OIHW
      return "weight", value.transpose(3, 2, 0, 1)
    if value.ndim == 5:  # DHWIO -> OIDHW
      return "weight", value.transpose(4, 3, 0, 1, 2)
    raise ValueError(f"kernel of rank {value.ndim} has no torch layout")
  if leaf in ("scale", "embedding"):
    return "weight", value
  return leaf, value


def flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  """Inverse of `torch_layout` for the array."""
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 5:
      return value.transpose(2, 3, 4, 1, 0)
  return value


class KeyMap:
  """The explicit map between one model's NNX parameter paths and its PyTorch state-dict keys."""

  def __init__(
    self,
    params: nnx.State,
    renames: Renames = (),
    conv1x1: Callable[[str], bool] = lambda key: False,
    what: str = "model",
  ):
    self.what = what
    self.entries = {}  # torch key -> (flax path, flax shape, torch shape)
    for path, var in nnx.to_flat_state(params):
      leaf = str(path[-1])
      module = _replace_fragments(_dotted(path[:-1]), renames)
      shape = tuple(var.shape if hasattr(var, "shape") else np.shape(var[...]))
      key_leaf, tshape = _torch_shape(shape, leaf, False)
      key = f"{module}.{key_leaf}" if module else key_leaf
      if leaf == "kernel" and len(shape) == 2 and conv1x1(key):
        tshape = tshape + (1, 1)
      if key in self.entries:
        raise AssertionError(f"two parameters map to {key}: {self.entries[key][0]} and {path}")
      self.entries[key] = (tuple(path), shape, tshape)

  def check(self, state: Mapping[str, np.ndarray], assumed: str = "") -> None:
    """Raises CheckpointKeyError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(k for k in self.entries if k not in state)
    unexpected = sorted(k for k in state if k not in self.entries)
    mismatched = sorted(
      (k, self.entries[k][2], tuple(np.shape(state[k])))
      for k in self.entries
      if k in state and tuple(np.shape(state[k])) != self.entries[k][2]
    )
    if missing or unexpected or mismatched:
      raise key_error(self.what, missing, unexpected, mismatched, assumed)

  def to_torch(self, params: nnx.State) -> dict[str, np.ndarray]:
    flat = {tuple(p): v for p, v in nnx.to_flat_state(params)}
    out = {}
    for key, (path, _, tshape) in self.entries.items():
      value = np.asarray(jax.device_get(flat[path][...]))
      _, arr = torch_layout(value, str(path[-1]))
      out[key] = np.ascontiguousarray(arr.reshape(tshape))
    return out

  def to_flax(self, state: Mapping[str, np.ndarray], assumed: str = "") -> dict[tuple, np.ndarray]:
    """Checked conversion: {flax path: array}; raises before converting anything if keys disagree."""
    self.check(state, assumed)
    out = {}
    for key, (path, shape, _) in self.entries.items():
      value = np.asarray(state[key])
      leaf = str(path[-1])
      if leaf == "kernel" and len(shape) == 2 and value.ndim == 4:
        value = value[:, :, 0, 0]  # a 1x1 conv stored for what is a Linear here
      out[path] = np.ascontiguousarray(flax_layout(value, leaf)).reshape(shape)
    return out


def _torch_shape(shape: tuple, leaf: str, as_conv1x1: bool) -> tuple[str, tuple]:
  name, arr = torch_layout(np.empty(shape, dtype=np.int8), leaf, as_conv1x1)
  return name, tuple(arr.shape)


def key_error(what: str, missing, unexpected, mismatched, assumed: str = "") -> CheckpointKeyError:
  def listing(title, rows):
    rows = list(rows)
    if not rows:
      return []
    shown = [f"    {r}" for r in rows[:50]] + ([f"    ... and {len(rows) - 50} more"] if len(rows) > 50 else [])
    return [f"  {title} ({len(rows)}):"] + shown

  lines = [
    f"{what}: the checkpoint does not match the model"
    + (f" built from {assumed}" if assumed else "")
    + "; nothing was loaded."
  ]
  lines += listing("missing keys", missing)
  lines += listing("unexpected keys", unexpected)
  lines += listing("mis-shaped keys (key, expected, found)", mismatched)
  err = CheckpointKeyError("\n".join(lines))
  err.missing, err.unexpected, err.mismatched = list(missing), list(unexpected), list(mismatched)
  return err


def check_params(expected: Mapping[tuple, tuple], arrays: Mapping[tuple, Any], where: str, *,
                 partial: bool = False) -> None:  # fmt: skip
  """Raises CheckpointKeyError listing every missing (unless `partial`), unexpected and mis-shaped path.

  `expected` maps parameter paths to shapes; `arrays` maps paths to arrays (or anything with a shape).
  The one check every loader of parameters uses, so a mismatch reads the same wherever it is found.
  """
  found = {tuple(str(k) for k in path): np.shape(v) for path, v in arrays.items()}
  want = {tuple(str(k) for k in path): tuple(shape) for path, shape in expected.items()}
  missing = [] if partial else sorted(_dotted(k) for k in want.keys() - found.keys())
  unexpected = sorted(_dotted(k) for k in found.keys() - want.keys())
  mismatched = sorted(f"{_dotted(k)}, {want[k]}, {found[k]}" for k in want.keys() & found.keys() if want[k] != found[k])
  if missing or unexpected or mismatched:
    raise key_error(where, missing, unexpected, mismatched)


def param_shapes(model: nnx.Module) -> dict[tuple, tuple]:
  """{path: shape} of a module's parameters (works on abstract modules from `nnx.eval_shape`)."""
  return {
    tuple(str(k) for k in path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(nnx.state(model))
  }


def merge_params(abstract_model: nnx.Module, arrays: Mapping[tuple, np.ndarray], dtype=None, *,
                 where: str | None = None) -> nnx.Module:  # fmt: skip
  """A concrete model from an abstract one (`nnx.eval_shape`) and {variable path: array}, strictly.

  Every variable of the model must be given, with its shape, and nothing else: otherwise
  CheckpointKeyError lists every missing, unexpected and mis-shaped path and nothing is loaded.
  """
  graphdef, state = nnx.split(abstract_model)
  flat = nnx.to_flat_state(state)
  by_name = {tuple(str(k) for k in path): v for path, v in arrays.items()}
  check_params(param_shapes(abstract_model), by_name, where or type(abstract_model).__name__)
  leaves = []
  for path, var in flat:
    value = jax.numpy.asarray(by_name[tuple(str(k) for k in path)], dtype=dtype or var.dtype)
    leaves.append((tuple(path), var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def update_params(target: nnx.Module, state: nnx.State, where: str) -> None:
  """Copies `state` (a subset of `target`'s parameters: a pretrained part) into `target` in place.

  Paths `target` lacks and shapes that differ are refused with the same listing as `merge_params`.
  """
  arrays = {tuple(str(k) for k in path): var.get_value() for path, var in nnx.to_flat_state(state)}
  check_params(param_shapes(target), arrays, where, partial=True)
  nnx.update(target, state)
