"""Outputs that appear complete or not at all: hidden temporary names beside the destination, and their leftovers.

A writer makes `temp_dir(dest)` / `temp_file(dest)` in the destination's folder, fills it and renames it over
`dest` when complete, so a failure or a kill never leaves a half-written `dest`. Unlike `tempfile.mkdtemp` /
`mkstemp` (0700 / 0600: private), these are created with the permissions a plain `mkdir` / `open` gives
(0777 / 0666 minus the umask), so what is renamed into place is readable by whoever the umask lets read it (a
team's shared storage); `default_mode` gives that mode back to files other writers make private (safetensors 0.8
writes 0600).

Names are `.<dest name>.<host>.<pid>.<8 hex><suffix>`: the writer's host and process, so that a later writer can tell
a killed writer's leftover from a live one's (`leftovers`).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Iterable

STALE_AFTER_S = 3600.0  # a leftover another host wrote, untouched this long, belongs to no running writer
_MKDTEMP_NAME = r"[a-z0-9_]{8}"  # the random part of tempfile.mkdtemp names (what earlier versions used)


def host_tag() -> str:
  """This host's name as it appears in temporary names (letters, digits, '_' and '-' only)."""
  return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _name(dest: Path, suffix: str) -> Path:
  return dest.with_name(f".{dest.name}.{host_tag()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def umask() -> int:
  """The process's umask (from /proc on Linux; elsewhere set and put back)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def default_mode(path: str | os.PathLike) -> None:
  """Gives `path` the mode a plain `open` / `mkdir` would have given it: 0666 / 0777 minus the umask."""
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def temp_dir(dest: str | os.PathLike, suffix: str = ".tmp") -> Path:
  """A new empty folder beside `dest` (mode 0777 minus the umask)."""
  while True:
    path = _name(Path(dest), suffix)
    try:
      os.mkdir(path, 0o777)
      return path
    except FileExistsError:
      continue


def temp_file(dest: str | os.PathLike, suffix: str = ".tmp") -> Path:
  """A new empty file beside `dest` (mode 0666 minus the umask)."""
  while True:
    path = _name(Path(dest), suffix)
    try:
      os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
      return path
    except FileExistsError:
      continue


def _running(pid: int) -> bool:
  if pid == os.getpid():
    return False  # this process is not writing it: the caller asks before making its own
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's live process
  return True


def _newest_mtime(path: Path) -> float:
  newest = path.lstat().st_mtime
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      try:
        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
      except OSError:
        pass
  return newest


def leftovers(dest: str | os.PathLike, suffixes: Iterable[str], *, started: float | None = None) -> list[Path]:
  """Temporary names beside `dest` that a killed writer left, safe to remove.

  A candidate is named `.<dest name>.<host>.<pid>.<8 hex><suffix>` (`temp_dir` / `temp_file`) or, as earlier
  versions named them, `.<dest name>.<8 mkdtemp characters><suffix>`; nothing else is touched. It is stale when
    - it is this host's and its process no longer runs, or
    - it is another host's (or has no process in its name) and nothing in it changed for STALE_AFTER_S before
      `started` (this run's start; default now): a process on another host cannot be asked whether it still runs.
  A live writer's folder (this host, its process running) is never listed.
  """
  dest = Path(dest)
  started = time.time() if started is None else started
  alternatives = "|".join(re.escape(s) for s in suffixes)
  ours = re.compile(
    rf"\.{re.escape(dest.name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}(?:{alternatives})"
  )
  legacy = re.compile(rf"\.{re.escape(dest.name)}\.{_MKDTEMP_NAME}(?:{alternatives})")
  host = host_tag()
  stale = []
  try:
    siblings = sorted(dest.parent.iterdir())
  except OSError:
    return []
  for path in siblings:
    m = ours.fullmatch(path.name)
    if m is not None and m["host"] == host:
      if not _running(int(m["pid"])):
        stale.append(path)
    elif m is not None or legacy.fullmatch(path.name):
      try:
        if _newest_mtime(path) < started - STALE_AFTER_S:
          stale.append(path)
      except OSError:
        pass
  return stale
