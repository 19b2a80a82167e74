"""The workdir lock (mimajax/training/workdir_lock.py): a held lock refuses naming its holder; a dead holder's
lock is taken over, and a lock a dead run's child still holds is broken, each with a warning."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from mimajax.training import workdir_lock

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _holder(pid):
  return json.dumps({"host": socket.gethostname(), "pid": pid, "since": "earlier", "command": "mimajax train ..."})


@pytest.fixture
def holder(tmp_path):
  """A process holding the flock on tmp_path/.lock (like a run, or a child that inherited a dead run's lock)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  yield proc
  proc.kill()
  proc.wait()


def _warnings(caplog):
  return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_held_lock_is_refused_naming_the_holder(tmp_path, holder):
  (tmp_path / ".lock").write_text(_holder(holder.pid))
  with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"in use by another `mimajax train`: pid {holder.pid} on"):
    workdir_lock.acquire(tmp_path)
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # untouched


def test_the_lock_records_its_holder_and_is_emptied_on_release(tmp_path, caplog):
  lock = workdir_lock.acquire(tmp_path / "new")
  assert json.loads((tmp_path / "new" / ".lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert (tmp_path / "new" / ".lock").read_text() == ""
  with caplog.at_level(logging.WARNING):
    workdir_lock.acquire(tmp_path / "new").release()
  assert not _warnings(caplog)


def test_a_dead_runs_lock_is_taken_over_with_a_message(tmp_path, caplog):
  dead = _dead_pid()
  (tmp_path / ".lock").write_text(_holder(dead))  # SIGKILLed: the kernel dropped its flock, the file remains
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.acquire(tmp_path)
  assert f"taking over the stale lock of pid {dead}" in _warnings(caplog)
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()


def test_a_lock_held_by_a_dead_runs_child_is_broken_with_a_message(tmp_path, holder, caplog):
  dead = _dead_pid()
  (tmp_path / ".lock").write_text(_holder(dead))  # the recorded run is gone; a process it started holds the lock
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.acquire(tmp_path)
  assert f"breaking the lock of pid {dead}" in _warnings(caplog)
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):  # and it is held now
    workdir_lock.acquire(tmp_path)
  lock.release()
