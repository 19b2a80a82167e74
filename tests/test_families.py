"""A second model family trains on the shared loop without touching it: tests/gan_family.py (two parameter
groups with their own optimizers, BatchNorm statistics in the state, extra state) through `mimajax train`'s
own code path: exact resume after SIGKILL / SIGTERM, 8 simulated devices equal to 1, refusals."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mimajax import checkpointing, families, train

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "tests" / "gan_family.py")
STEPS = 8


def _state(workdir, step=STEPS):
  return checkpointing.read_state(Path(workdir, "checkpoints", str(step), "state"))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gan_a")
  assert train.main(["--config", CONFIG, "--workdir", str(workdir)]) == 0
  return workdir


def test_two_groups_train_with_their_own_optimizers_and_state(uninterrupted):
  state = _state(uninterrupted)
  assert set(state["params"]) == {"generator", "discriminator"} == set(state["opt_state"])
  assert int(state["step"]) == STEPS and int(state["extra"]) == STEPS * 16  # update_extra ran every step
  # The generator's BatchNorm statistics are carried and moved from their initial (0, 1).
  stats = state["buffers"]["generator"]["norm"]
  assert np.abs(np.asarray(stats["mean"]["value"])).max() > 0 and not np.allclose(stats["var"]["value"], 1.0)
  first = _state(uninterrupted, 2)
  for group in ("generator", "discriminator"):  # both groups move
    a, b = _leaves(first["params"][group]), _leaves(state["params"][group])
    assert all(not np.array_equal(a[k], b[k]) for k in a), group
  assert json.loads((uninterrupted / "config.json").read_text())["model"]["family"] == "toy_gan"


def _spawn(workdir, *extra):
  cmd = [sys.executable, "-m", "mimajax.cli", "train", "--config", CONFIG, "--workdir", str(workdir), *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_gan_run_resumes_bitwise_equal(uninterrupted, tmp_path, sig):
  proc = _spawn(tmp_path, "--config.data.delay_s=0.5")  # a slow loader: the kill lands between checkpoints
  target, deadline = tmp_path / "checkpoints" / "2", time.time() + 300
  while not target.is_dir():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 2"
    time.sleep(0.1)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == (0 if sig == signal.SIGTERM else -signal.SIGKILL), out[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < STEPS, steps
  assert train.main(["--config", CONFIG, "--workdir", str(tmp_path)]) == 0
  a, b = _leaves(_state(uninterrupted)), _leaves(_state(tmp_path))
  assert a.keys() == b.keys() and len(a) > 20
  assert [k for k in a if not np.array_equal(a[k], b[k])] == []


SHARDED = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, "tests")
import jax
import gan_family
from mimajax import train
config = gan_family.get_config()
config.mesh.update(data=4, fsdp=2)
state = train.train(config, sys.argv[1])
kernel = state.params["discriminator"]["hidden"]["kernel"][...]
flat = jax.tree_util.tree_flatten_with_path(state.opt_state["discriminator"])[0]
mu = next(v for p, v in flat if ".mu" in jax.tree_util.keystr(p) and "'hidden'" in jax.tree_util.keystr(p)
          and "'kernel'" in jax.tree_util.keystr(p))
mu = getattr(mu, "value", mu)
print(json.dumps({"devices": jax.device_count(), "kernel": str(kernel.sharding.spec), "mu": str(mu.sharding.spec)}))
"""


def test_gan_on_8_simulated_devices_equals_one_device(uninterrupted, tmp_path):
  out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  layout = json.loads(out.stdout.strip().splitlines()[-1])
  # (mlp, embed) kernel: mlp -> tensor (size 1), embed -> fsdp; the Adam moment laid out like its parameter.
  assert layout == {"devices": 8, "kernel": "P('tensor', 'fsdp')", "mu": "P('tensor', 'fsdp')"}
  one, eight = _leaves(_state(uninterrupted)["params"]), _leaves(_state(tmp_path)["params"])
  num = np.sqrt(sum(float(np.sum((eight[k] - one[k]) ** 2)) for k in one))
  den = np.sqrt(sum(float(np.sum(one[k] ** 2)) for k in one))
  assert num / den < 1e-5, num / den


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_a_damaged_newest_checkpoint_resumes_from_the_intact_one_bitwise(uninterrupted, tmp_path, caplog, damage):
  """Step 8's largest array file cut in half, or one bit of it flipped (same size): the rerun names both steps,
  sets 8 aside, resumes from 6 and ends bitwise equal to the uninterrupted run."""
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  files = [
    f for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*") if f.is_file() and f.parent.name == "d"
  ]
  biggest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  if damage == "truncated":
    data = data[: len(data) // 2]
  else:
    data[len(data) // 2] ^= 0x04
  biggest.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="mimajax"):
    assert train.main(["--config", CONFIG, "--workdir", str(workdir)]) == 0
  said = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("mimajax"))
  assert f"checkpoints/{STEPS} is damaged" in said and "resuming from the newest intact one, step 6" in said
  assert (workdir / "checkpoints.damaged" / str(STEPS)).is_dir()
  a, b = _leaves(_state(uninterrupted)), _leaves(_state(workdir))
  assert a.keys() == b.keys() and [k for k in a if not np.array_equal(a[k], b[k])] == []


def test_a_second_run_on_a_busy_workdir_is_refused_at_once_and_the_first_finishes(tmp_path, capsys):
  proc = _spawn(tmp_path, "--config.data.delay_s=0.5")
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "1").is_dir():  # the first run is training (and holds the lock)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 1"
    time.sleep(0.1)
  start = time.time()
  code = train.main(["--config", CONFIG, "--workdir", str(tmp_path)])
  took = time.time() - start
  out = capsys.readouterr().err
  assert code == 2 and "is in use by another `mimajax train`" in out and f"pid {proc.pid} on host" in out, out
  assert took < 10, took
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert checkpointing.saved_steps(tmp_path)[-1] == STEPS
  assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()] == []  # no temporary folder
  assert (tmp_path / ".lock").read_text() == ""  # released


def test_a_workdir_of_another_family_is_refused_untouched(uninterrupted, capsys):
  before = (uninterrupted / "config.json").read_text()
  code = train.main(["--config", "configs/tiny.py", "--workdir", str(uninterrupted)])
  assert code == 2 and "holds a 'toy_gan' run" in capsys.readouterr().err  # bad input: exit 2, on stderr
  assert (uninterrupted / "config.json").read_text() == before


def test_unknown_family_is_named():
  with pytest.raises(ValueError, match="unknown model family 'nope'"):
    families.get("nope")


def test_the_loop_reads_a_steps_flag_after_dispatching_the_next_and_before_any_save(tmp_path, monkeypatch):
  """No host sync per step: an ordinary step's NaN flag is read once the next step's batch is taken (the device has
  work queued); a step that is saved is checked before its save."""
  from mimajax import train_step

  taken, checks = [0], []
  host_batch = train._host_batch  # once per step, on the batch just taken
  monkeypatch.setattr(train, "_host_batch", lambda *a: taken.__setitem__(0, taken[0] + 1) or host_batch(*a))
  check = train_step.check_finite
  monkeypatch.setattr(train_step, "check_finite", lambda metrics, n: checks.append((n, taken[0])) or check(metrics, n))
  argv = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.checkpoint.every_steps=3", "--config.total_steps=7"]
  assert train.main(argv) == 0
  assert [n for n, _ in checks] == list(range(1, 8))  # every step checked once, in order
  saved = checkpointing.saved_steps(tmp_path)
  assert {3, 6, 7} <= set(saved) and 4 not in saved  # every 3 steps, the last (Orbax also saves a run's first)
  assert dict(checks) == {n: n if n in saved else n + 1 for n in range(1, 8)}  # saved: checked first; others behind


def test_a_non_finite_step_between_checkpoints_stops_the_run_naming_it(uninterrupted, tmp_path, capsys):
  """Found one step late, it is still the step named, and nothing after the last good checkpoint is written."""
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  lr = ["--config.train.generator_lr=1e30", "--config.train.discriminator_lr=1e30"]
  argv = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.checkpoint.every_steps=4",
          "--config.total_steps=16", *lr]  # fmt: skip
  assert train.main(argv) == 1
  err = capsys.readouterr().err
  assert "non-finite values at step" in err, err[-2000:]
  bad = int(err.split("non-finite values at step")[1].split()[0])
  assert bad % 4 != 0, f"step {bad} is a checkpoint step: this test is about a step between them"
  assert checkpointing.saved_steps(tmp_path)[-1] == 4 * ((bad - 1) // 4) and f"left at step {bad - 1}" in err
