"""MMFA trains through `mimajax train` unchanged (tests/mmfa_micro.py: every module at 32 px): two groups with their
own Adam states, BatchNorm statistics carried, exact resume after SIGKILL, 8 simulated devices equal to one
(marked slow), sample grids; its animator, `mimajax animate` and the expression VAE stage load what it wrote."""

import json
import os
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
CONFIG = str(ROOT / "tests" / "mmfa_micro.py")
pytestmark = pytest.mark.xdist_group("mmfa_family")


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
  from data_pipeline import demo_data

  out = tmp_path_factory.mktemp("demo32")
  demo_data.build(out, resolution=32)
  return out


def _args(data, workdir, *extra):
  return ["--config", CONFIG, "--workdir", str(workdir), f"--config.data.path={data}", *extra]


def _state(workdir, step):
  return checkpointing.read_state(Path(workdir, "checkpoints", str(step), "state"))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def uninterrupted(demo32, cache_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mmfa_a")
  assert train.main(_args(demo32, workdir, "--config.sample.every_steps=6")) == 0
  return workdir


def test_generator_and_discriminator_train_with_their_own_state(uninterrupted):
  state = _state(uninterrupted, 6)
  assert set(state["params"]) == {"generator", "discriminator"} == set(state["opt_state"])
  assert set(state["params"]["generator"]) >= {"appearance", "kp_detector", "head_estimator", "expression_encoder",
                                               "expression_decoder", "dense_motion", "generator"}  # fmt: skip
  first = _state(uninterrupted, 2)
  for group in ("generator", "discriminator"):
    a, b = _leaves(first["params"][group]), _leaves(state["params"][group])
    moved = [k for k in a if not np.array_equal(a[k], b[k])]
    assert len(moved) > 0.9 * len(a), (group, len(moved), len(a))
  # BatchNorm statistics are carried in the state and move
  a, b = _leaves(first["buffers"]["generator"]), _leaves(state["buffers"]["generator"])
  assert len(a) > 10 and any(not np.array_equal(a[k], b[k]) for k in a)
  grid = uninterrupted / "samples" / "step_0000006.png"
  from mimajax import video_io

  image = video_io.read_image(grid)
  assert image.shape == (4 * 32, 4 * 32, 3)  # 4 pairs x (source | driver | generated | canonical keypoints)


@pytest.mark.slow  # about 205 s (the subprocess compiles the step again); resume is the loop's one code path, which
# runs in CI on the toy GAN with BatchNorm buffers (test_families.py::test_killed_gan_run_resumes_bitwise_equal)
def test_killed_run_resumes_bitwise_equal(demo32, uninterrupted, cache_dir, tmp_path):
  cmd = [sys.executable, "-m", "mimajax.cli", "train", *_args(demo32, tmp_path, "--config.sample.every_steps=6")]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")  # the step compiled once
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  target, deadline = tmp_path / "checkpoints" / "2", time.time() + 600
  while not target.is_dir():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 2"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=120)
  steps = checkpointing.saved_steps(tmp_path)
  assert steps and steps[-1] < 6, steps
  assert train.main(_args(demo32, tmp_path, "--config.sample.every_steps=6")) == 0
  a, b = _leaves(_state(uninterrupted, 6)), _leaves(_state(tmp_path, 6))
  assert [k for k in a if not np.array_equal(a[k], b[k])] == []


SHARDED = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, "tests")
import jax
import mmfa_micro
from mimajax import train
config = mmfa_micro.get_config()
config.data.path = sys.argv[2]
config.sample.every_steps = 0
config.mesh.update(data=2, fsdp=2, tensor=2)  # the batch of 4 over data x fsdp, the MLPs over tensor
state = train.train(config, sys.argv[1])
kernel = state.params["generator"]["appearance"]["first"]["conv"]["kernel"][...]
print(json.dumps({"devices": jax.device_count(), "kernel": str(kernel.sharding.spec)}))
"""


@pytest.fixture(scope="module")
def sharded_run(demo32, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mmfa_sharded")
  out = subprocess.run([sys.executable, "-c", SHARDED, str(workdir), str(demo32)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, json.loads(out.stdout.strip().splitlines()[-1])


def _scalars(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  from tensorflow import make_ndarray

  return {e.step: float(make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.mark.slow  # a second compile of the whole step (8 devices): minutes on 2 cores; the toy GAN covers it in CI
def test_mmfa_on_8_simulated_devices_is_sharded_and_computes_the_same_first_loss(sharded_run, uninterrupted):
  workdir, layout = sharded_run
  assert layout["devices"] == 8 and "fsdp" in layout["kernel"], layout  # conv_out -> fsdp
  one, eight = _scalars(uninterrupted, "generator/loss"), _scalars(workdir, "generator/loss")
  assert abs(eight[1] - one[1]) / abs(one[1]) < 1e-5, (one[1], eight[1])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 4.5e-3 after 6 steps: the first step's generator gradient norm "
                   "already differs by 1.1% (14394 vs 14556) with equal losses; suspected cause: bilinear grid "
                   "sampling's gradient at pixel-aligned coordinates (the initial deformation is the identity grid), "
                   "amplified by Adam's sign-like first steps. Open: see the issue note")  # fmt: skip
def test_mmfa_on_8_simulated_devices_trains_to_the_same_parameters(sharded_run, uninterrupted):
  workdir, _ = sharded_run
  one, eight = _leaves(_state(uninterrupted, 6)["params"]), _leaves(_state(workdir, 6)["params"])
  num = np.sqrt(sum(float(np.sum((eight[k] - one[k]) ** 2)) for k in one))
  den = np.sqrt(sum(float(np.sum(one[k] ** 2)) for k in one))
  assert num / den < 1e-4, num / den


def test_the_animator_scores_what_training_wrote(demo32, uninterrupted):
  from mimajax.evaluation.dataset import Dataset

  family = families.get(families.family_of_checkpoint(uninterrupted))
  animator = family.load_animator(uninterrupted, {})
  assert animator.resolution == 32 and "step 6" in animator.name
  data = Dataset(demo32)
  video = next(iter(data.videos.values()))
  frames, rows = data.read(video.video_id, 0, 5)
  out = animator.animate(frames[0], rows[0], frames[1:], rows[1:], 0)
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
  assert out.std() > 1.0  # not a constant image


def test_expression_vae_stage_trains_on_the_animators_codes(demo32, uninterrupted, tmp_path):
  from mimajax.mmfa import expression_vae_stage

  args = ["--config", CONFIG + ":expression_vae", "--workdir", str(tmp_path), f"--config.data.path={demo32}",
          f"--config.train.init_from={uninterrupted}", "--config.total_steps=4"]  # fmt: skip
  assert train.main(args) == 0
  state = _state(tmp_path, 4)
  assert set(state["params"]) == {"expression_vae", "expression_discriminator"}
  vae = expression_vae_stage.load(tmp_path)
  codes = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  assert vae(codes)["reconstruction"].shape == (3, 8)
  with pytest.raises(ValueError, match="not 'expression_vae'"):
    expression_vae_stage.load(uninterrupted)


def test_bad_configs_are_refused_by_name(demo32, tmp_path, capsys):
  cases = {
    "--config.model.rotation=gyro": "config.model.rotation",
    "--config.model.rotation=hopenet": "hopenet_weights",
    "--config.data.resolution=36": "config.data.resolution=36",
    "--config.model.generator.reshape_depth=3": "max_features",
    "--config.loss.gan_mode=hinge": "config.loss.gan_mode",
  }
  for flag, message in cases.items():
    assert train.main(_args(demo32, tmp_path / "w", flag)) == 2
    assert message in capsys.readouterr().err, flag
    assert not (tmp_path / "w" / "checkpoints").exists()
  args = ["--config", CONFIG + ":expression_vae", "--workdir", str(tmp_path / "v"), f"--config.data.path={demo32}"]
  assert train.main(args) == 2
  assert "config.train.init_from" in capsys.readouterr().err


def test_animate_drives_and_edits_a_portrait(uninterrupted, tmp_path, capsys):
  from data_pipeline import demo_data
  from mimajax import cli, video_io

  portrait, driver = str(demo_data.portrait_path("astronaut")), str(demo_data.carphone_clip())
  out = tmp_path / "driven.mp4"
  args = ["animate", "--checkpoint", str(uninterrupted), "--source", portrait, "--driving", driver, "--frames", "4",
          "--edit", "yaw=10", "--out", str(out), "--side-by-side", str(tmp_path / "sbs.mp4")]  # fmt: skip
  assert cli.main(args) == 0, capsys.readouterr().err
  frames, _ = video_io.read_video(out)
  assert frames.shape == (4, 32, 32, 3)
  assert video_io.read_video(tmp_path / "sbs.mp4")[0].shape[2] == 3 * 32  # source | driver | output
  edited = tmp_path / "edited.mp4"  # no driver: the edits ramped in over --frames
  assert cli.main(["animate", "--checkpoint", str(uninterrupted), "--source", portrait, "--frames", "6", "--edit",
                   "roll=20,scale=1.1,tx=0.1", "--out", str(edited)]) == 0  # fmt: skip
  assert video_io.read_video(edited)[0].shape[0] == 6
  bad = tmp_path / "bad.mp4"
  assert cli.main(["animate", "--checkpoint", str(uninterrupted), "--source", portrait, "--edit", "smile=1",
                   "--out", str(bad)]) == 2  # fmt: skip
  assert "unknown key 'smile'" in capsys.readouterr().err and not bad.exists()
  assert cli.main(["animate", "--checkpoint", str(uninterrupted), "--source", portrait, "--edit",
                   f"exp_interp={portrait}", "--out", str(bad)]) == 2  # fmt: skip
  assert "--expression-vae" in capsys.readouterr().err and not bad.exists()


def test_bench_prints_generated_frames_per_second(capsys):
  from mimajax.mmfa import bench

  assert bench.main(["--config", CONFIG, "--frames", "2", "--repeats", "1"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("frames_per_s=") and float(last.split("=")[1]) > 0
