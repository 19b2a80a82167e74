"""`mimajax train` end to end on the tiny config: exact resume, SIGKILL/SIGTERM mid-run, NaN stop, bad configs.

Every run trains the tiny MIMAFace on the demo dataset (real faces, prepared by `prepare`) at 32 px
with the "xla" attention (the smallest program to compile); the runs share a persistent compilation
cache, so only the first compiles.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mimajax import checkpointing, train

# One worker runs this whole file, so the demo data and the uninterrupted run are built once.
pytestmark = pytest.mark.xdist_group("train")

FAST = [
  "--config.data.resolution=32",
  "--config.model.attention_impl=xla",
  "--config.sample.every_steps=0",
  "--config.log.progress_bar=False",
  "--config.checkpoint.every_steps=1",
  "--config.checkpoint.keep=10",
]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  from data_pipeline import demo_data

  out = tmp_path_factory.mktemp("demo")
  demo_data.build(out, resolution=32)
  return out


def _args(data, workdir, steps, *extra):
  return ["--config", "configs/tiny.py", "--workdir", str(workdir), f"--config.total_steps={steps}",
          f"--config.data.path={data}", *FAST, *extra]  # fmt: skip


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(Path(workdir, "checkpoints", str(step), "state").absolute())


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 100
  diff = [i for i, (x, y) in enumerate(zip(la, lb)) if not np.array_equal(np.asarray(x), np.asarray(y))]
  assert not diff, f"{len(diff)} of {len(la)} arrays differ"


@pytest.fixture(scope="module")
def uninterrupted(demo_data, cache_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_a")
  assert train.main(_args(demo_data, workdir, 6)) == 0
  return workdir


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(demo_data, uninterrupted, tmp_path):
  assert train.main(_args(demo_data, tmp_path, 3)) == 0
  assert train.main(_args(demo_data, tmp_path, 6)) == 0
  _assert_same(_state(uninterrupted, 6), _state(tmp_path, 6))
  # The loop wrote its config, the face model it rendered with, and TensorBoard metrics.
  assert (tmp_path / "config.json").exists() and (tmp_path / "face_model.npz").exists()
  assert list(tmp_path.glob("events.out.tfevents.*"))


def _spawn(data, workdir, steps, cache):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")  # fmt: skip
  cmd = [sys.executable, "-m", "mimajax.cli", "train", *_args(data, workdir, steps)]
  return subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for_checkpoint(proc, workdir, step, timeout=600):
  deadline = time.time() + timeout
  target = Path(workdir, "checkpoints", str(step))
  while time.time() < deadline:
    if target.is_dir() and proc.poll() is None:
      return
    if proc.poll() is not None:
      pytest.fail(f"training exited ({proc.returncode}) before checkpoint {step}:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  proc.kill()
  pytest.fail(f"no checkpoint {step} after {timeout} s")


# SIGTERM (preemption) on MIMAFace is slow; the loop's SIGTERM path is the same for every family and runs in CI on
# the toy GAN (test_families.py::test_killed_gan_run_resumes_bitwise_equal[sigterm]).
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["sigkill", "sigterm"])  # fmt: skip
def test_killed_run_resumes_to_the_same_parameters(demo_data, uninterrupted, cache_dir, tmp_path, sig):
  proc = _spawn(demo_data, tmp_path, 6, cache_dir)
  _wait_for_checkpoint(proc, tmp_path, 2)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  if sig == signal.SIGTERM:  # preemption: save where it got to, exit cleanly
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
  else:
    assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 6, steps
  assert train.main(_args(demo_data, tmp_path, 6)) == 0
  _assert_same(_state(uninterrupted, 6), _state(tmp_path, 6))


@pytest.mark.slow  # about 105 s; the loop's non-finite stop runs in CI on the toy GAN (test_families.py, between and at
# checkpoints), the same code path for every family
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(demo_data, uninterrupted, cache_dir,
                                                                                   tmp_path, capsys):  # fmt: skip
  # Resumed from step 6 with a learning rate of 1e30: step 7's loss and gradients are finite, but its update throws
  # the weights to ~1e30 (finite; their squares overflow) and the next loss would be inf. Step 7 is refused, so
  # every checkpoint holds usable parameters and optimizer state.
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  code = train.main(_args(demo_data, tmp_path, 9, "--config.train.learning_rate=1e30"))
  out = capsys.readouterr().err  # errors go to stderr
  assert code == 1
  assert "FloatingPointError: non-finite values at step" in out
  bad_step = int(out.split("non-finite values at step")[1].split()[0])
  steps = checkpointing.saved_steps(tmp_path)
  assert bad_step == 7 and steps[-1] == bad_step - 1 and f"left at step {bad_step - 1}" in out
  for step in steps:
    state = _state(tmp_path, step)
    leaves = [np.asarray(x) for x in jax.tree.leaves((state["params"], state["opt_state"]))]
    floats = [x for x in leaves if x.dtype.kind == "f"]
    assert all(np.isfinite(x).all() for x in floats), step
    assert max(np.abs(x).max() for x in jax.tree.leaves(state["params"])) < 2.0**64, step


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.stage=3", "config.stage must be 1"),
    ("--config.data.num_frames=4", "stage 1 trains on images"),
    ("--config.data.resolution=60", "multiple of 8"),
    ("--config.mesh.fsdp=2", "devices"),
  ],
)
def test_bad_config_is_refused_with_the_field_named(demo_data, tmp_path, capsys, override, message):
  assert train.main(_args(demo_data, tmp_path, 2, override)) == 2
  captured = capsys.readouterr()
  last = captured.err.strip().splitlines()[-1]
  assert last.startswith("mimajax train: error:") and message in last and message not in captured.out


def test_missing_flags_unknown_overrides_and_config_files_exit_2_in_one_line(tmp_path, capsys):
  def refused(*argv):
    assert train.main(list(argv)) == 2
    captured = capsys.readouterr()
    assert not captured.out and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("mimajax train: error: ") and "Traceback" not in captured.err
    return captured.err

  workdir = str(tmp_path / "run")
  assert "--config and --workdir are required" in refused("--config", "configs/tiny.py")
  err = refused("--config", "configs/tiny.py", "--workdir", workdir, "--config.no_such_field=1")
  assert "--config.no_such_field=1: config has no field 'no_such_field'; its fields: bench, checkpoint" in err
  err = refused("--config", "configs/tiny.py", "--workdir", workdir, "--config.data.no_such=1")
  assert "config.data has no field 'no_such'; its fields: batch_size" in err
  assert "invalid literal for int()" in refused("--config", "configs/tiny.py", "--workdir", workdir,
                                                "--config.total_steps=many")  # fmt: skip
  assert "--config configs/nope.py: no such file" in refused("--config", "configs/nope.py", "--workdir", workdir)
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  err = refused("--config", str(tmp_path / "broken.py"), "--workdir", workdir)
  assert "cannot load --config" in err and "SyntaxError" in err
  assert not (tmp_path / "run").exists()


def test_debug_prints_the_traceback_of_a_refused_config(tmp_path, capsys):
  from mimajax import cli

  argv = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.stage=3"]
  assert cli.main(["--debug", *argv]) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err
  assert err.strip().splitlines()[-1].startswith("mimajax train: error: config.stage must be 1")


def _stage2_workdir(path, data):
  """A stage-2 MIMAFace workdir as a run leaves it (config.json, vae/, face model and its record, a checkpoint
  with checksums), written directly: the refusals below come before anything is built."""
  from flax import nnx

  from configs import tiny
  from mimajax.convert import diffusers_format
  from mimajax.mimaface import factory as mimaface_factory
  from mimajax.mimaface import pretrained
  from mimajax.models import factory

  config = tiny.get_config("2")
  config.data.path = str(data)
  model = mimaface_factory.build_mimaface(config.model, stage=2, rngs=nnx.Rngs(3), **config.model.objective.to_dict())
  path.mkdir(parents=True)
  checkpointing.write_config(path, config)
  diffusers_format.save_vae(factory.build_vae(config.model, rngs=nnx.Rngs(1)), path / "vae")
  face = pretrained.face_model(config, path)
  ckpt = checkpointing.Checkpointer(path, every_steps=1)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  ckpt.save(2, {"step": np.int32(2), "params": {"model": params}, "rng": np.zeros(2, np.uint32)}, force=True)
  ckpt.close()
  return model, face


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_a_wrong_config_rerun_is_refused_and_leaves_the_workdir_loadable(demo_data, tmp_path, capsys):
  from flax import nnx

  from mimajax.mimaface.inference import load_inference

  workdir = tmp_path / "stage2"
  model, _ = _stage2_workdir(workdir, demo_data)
  before = _files(workdir)
  # the stage-1 config (":2" forgotten): refused naming the field and how to start a new run from this one
  assert train.main(_args(demo_data, workdir, 4)) == 2
  out = capsys.readouterr().err
  assert "config.stage: 2 in the workdir's run, 1 in this one" in out and "Nothing was changed" in out
  assert f"--config.train.init_from={workdir}" in out
  # a typo in the data path: refused before anything is built or written
  args = _args(str(demo_data) + "_typo", workdir, 4)
  args[1] = "configs/tiny.py:2"
  assert train.main(args) == 2
  out = capsys.readouterr().err
  assert f"config.data.path={demo_data}_typo does not exist" in out and len(out.splitlines()) == 1
  assert _files(workdir) == before
  inf = load_inference(workdir)
  want = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  got = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(inf.model, nnx.Param))}
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_a_missing_data_path_writes_nothing_and_the_face_model_source_is_kept(demo_data, uninterrupted, tmp_path,
                                                                              capsys):  # fmt: skip
  fresh = tmp_path / "fresh"
  assert train.main(_args(tmp_path / "no_such_data", fresh, 2)) == 2
  assert "config.data.path=" in capsys.readouterr().err and not fresh.exists()  # no synthetic fallback persisted
  # the run recorded the data's face model; a rerun on data without one (which would render with the synthetic
  # model) is refused before anything is built
  record = json.loads((uninterrupted / "face_model.json").read_text())
  assert record["source"] == str((demo_data / "face_model.npz").absolute())
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted, workdir)
  other = tmp_path / "data_without_face_model"
  shutil.copytree(demo_data, other, ignore=shutil.ignore_patterns("face_model.npz"))
  before = _files(workdir)
  assert train.main(_args(other, workdir, 7)) == 2
  out = capsys.readouterr().err
  assert "was trained with the morphable model" in out and "'synthetic'" in out and "Nothing was changed" in out
  assert _files(workdir) == before
