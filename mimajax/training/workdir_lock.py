"""One `mimajax train` per workdir: an advisory lock (fcntl.flock on workdir/.lock) held by process 0.

The lock file holds the holder's host, pid, start time and command line. A second run on the same workdir
is refused at once, naming the holder, before it builds or writes anything. The kernel drops a flock when
its holder dies, so a run killed by SIGKILL leaves a file naming a dead process and no lock: the next run
takes it, saying so. If the dead run left a child holding the lock (a process that inherited the open
file), the file names a pid that is gone on this host while the lock is still held: it is broken (the file
replaced) with a warning. A holder on another host (a workdir on a shared file system; flock works across
NFS clients on Linux >= 2.6.12, as a POSIX lock) cannot be checked and is always refused.

Multi-host runs: only process 0 takes the lock (the other hosts write only their checkpoint shards, under
Orbax's own coordination); its outcome is broadcast so every host stops together when it is refused.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("mimajax.train")

LOCK_FILE = ".lock"


class WorkdirBusyError(ValueError):
  """Another `mimajax train` holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


def _read(fd: int) -> dict:
  try:
    raw = os.pread(fd, 4096, 0)
    holder = json.loads(raw.decode()) if raw.strip() else {}
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "a process that recorded nothing"
  return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: {holder.get('command')})"


def _dead_here(holder: dict) -> bool:
  pid = holder.get("pid")
  return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


class WorkdirLock:
  """Held from `acquire` to `release` (the file stays, emptied)."""

  def __init__(self, path: Path, fd: int):
    self.path, self.fd = path, fd

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.ftruncate(self.fd, 0)  # a clean end: the next run finds no holder to report
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    finally:
      os.close(self.fd)
      self.fd = None


def acquire(workdir: str | os.PathLike) -> WorkdirLock:
  """Takes workdir/.lock (creating the workdir); raises WorkdirBusyError naming the holder when it is held."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  broke = False
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec (PEP 446)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      if not broke and _dead_here(holder):
        log.warning("%s: breaking the lock of %s: that process is gone, a child of it still held the lock",
                    path, _describe(holder))  # fmt: skip
        path.unlink(missing_ok=True)
        broke = True
        continue
      raise WorkdirBusyError(
        f"{workdir} is in use by another `mimajax train`: {_describe(holder)}. Nothing was changed; wait for "
        f"it to finish (or stop it), or train in another --workdir"
      ) from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:  # the file was replaced between open and flock: lock the one now there
      os.close(fd)
      continue
    previous = _read(fd)
    if previous and previous.get("pid") != os.getpid():
      log.warning("%s: taking over the stale lock of %s, which ended without releasing it",
                  path, _describe(previous))  # fmt: skip
    me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv)[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return WorkdirLock(path, fd)


def hold(workdir: str | os.PathLike) -> WorkdirLock | None:
  """`acquire` on process 0 (None elsewhere); every host raises WorkdirBusyError when process 0 was refused."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirBusyError(f"{workdir} is in use by another `mimajax train` (process 0 could not lock it)")
  if error is not None:
    raise error
  return lock
