"""The `mimajax` command: parity prints rel_err= last and fails above tolerance; bench prints ratio=."""

import subprocess
import sys

import pytest

from mimajax import cli, parity


# unet's command runs in CI in `launch/gpu_check.sh --dry-run` (tests/test_gpu_check.py) and the motion U-Net's
# parity in tests/test_motion.py; their runs of this command are left to `-m slow`.
@pytest.mark.parametrize("component", ["scheduler", "vae", pytest.param("unet", marks=pytest.mark.slow), "clip",
                                       pytest.param("motion", marks=pytest.mark.slow)])  # fmt: skip
def test_parity_command_prints_rel_err_last(component, capsys):
  assert cli.main(["parity", "--component", component, "--size", "tiny"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("rel_err=") and float(last.split("=")[1]) < 1e-4


def test_parity_command_exits_nonzero_above_tolerance(monkeypatch, capsys):
  monkeypatch.setitem(parity.COMPONENTS, "unet", lambda **kw: 3e-3)
  assert cli.main(["parity", "--component", "unet"]) == 1
  assert capsys.readouterr().out.strip().splitlines()[-1] == "rel_err=3.000e-03"


def test_parity_refuses_pretrained_for_scheduler(capsys):
  assert cli.main(["parity", "--component", "scheduler", "--pretrained", "/x"]) == 2


def test_bench_prints_ratio_last(capsys):
  assert cli.main(["bench", "unet", "--size", "tiny", "--batch", "1", "--resolution", "64", "--repeats", "1"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("ratio=") and float(out[-1].split("=")[1]) > 0
  assert any("torch train step" in line for line in out)
  assert any("jax / torch: median" in line and "interleaved pairs" in line for line in out)


def test_paired_timing_alternates_the_sides_and_takes_the_ratio_pair_by_pair(monkeypatch):
  from mimajax import bench

  # A machine that slows down 3x half way: both sides of each pair see it, so every pair's ratio is 0.5.
  clock, calls = [0.0], []
  slow = lambda: 3.0 if len(calls) > 4 else 1.0
  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

  def side(name, cost):
    def run():
      calls.append(name)
      clock[0] += cost * slow()

    return run

  result = bench.paired(side("a", 1.0), side("b", 2.0), pairs=4, warmup=1)
  assert calls == ["a", "b"] * 5
  assert result.ratios == (0.5,) * 4 and result.ratio == 0.5 and result.spread == 0.0
  assert result.a_s == (1.0, 3.0, 3.0, 3.0)  # the unpaired medians would have moved 3x


def test_console_script_is_installed():
  out = subprocess.run([sys.executable, "-m", "mimajax.cli", "--help"], capture_output=True, text=True)
  assert out.returncode == 0 and "parity" in out.stdout and "bench" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("component", ["unet", "vae", "clip", "motion"])
def test_parity_sd15_full_size(component, capsys):
  """The full SD1.5 architecture with random weights (minutes on CPU; what GPU users run)."""
  assert cli.main(["parity", "--component", component, "--size", "sd15"]) == 0


@pytest.fixture(autouse=True, scope="module")
def _hf_logging_to_the_session_stream():
  """diffusers / transformers bind their log handler to the sys.stderr of their first import: not a test's capsys
  stream, which is closed after that test (later warnings would print "--- Logging error ---")."""
  pytest.importorskip("diffusers")
  pytest.importorskip("transformers")


def _empty(d):
  d.mkdir()
  return d


def _bad_json(d):
  d.mkdir()
  (d / "config.json").write_text('{"_class_name": "AutoencoderKL"')
  return d


def _no_weights(d):
  d.mkdir()
  (d / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
  return d


def _garbage_weights(d):  # what diffusers itself refuses
  _no_weights(d)
  (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x07garbage" * 64)
  return d


@pytest.mark.parametrize(
  "component, make",
  [
    ("vae", _empty),
    ("vae", _bad_json),
    ("unet", _no_weights),
    ("clip", _empty),
    ("mimaface", _empty),
    ("unet", lambda d: d),
  ],  # fmt: skip
  ids=["vae-empty", "vae-bad-json", "unet-no-weights", "clip-empty", "mimaface-empty", "unet-missing"],
)
def test_parity_with_an_unusable_pretrained_folder_exits_2_in_one_or_two_lines(tmp_path, capsys, component, make):
  folder = make(tmp_path / "pretrained")
  assert cli.main(["parity", "--component", component, "--pretrained", str(folder)]) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()  # diffusers may warn first (e.g. that accelerate is not installed)
  ours = [i for i, line in enumerate(lines) if line.startswith("mimajax parity: error:")]
  assert ours and str(folder) in lines[ours[0]] and "expected" in lines[ours[0]], lines
  assert len(lines[ours[0] :]) <= 2 and "Traceback" not in captured.err and "rel_err" not in captured.out


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_flag_or_environment_variable_prints_the_traceback(tmp_path, capsys, monkeypatch, how):
  argv = ["parity", "--component", "unet", "--pretrained", str(_garbage_weights(tmp_path / "p"))]
  if how == "flag":
    argv = ["--debug", *argv]
  else:
    monkeypatch.setenv("MIMAJAX_DEBUG", "1")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
    "mimajax parity: error:"
  )


def test_an_unexpected_error_is_one_line_with_exit_1_and_the_traceback_on_request(monkeypatch, capsys):
  def broken(**kw):
    raise RuntimeError("boom")

  monkeypatch.setitem(parity.COMPONENTS, "unet", broken)
  assert cli.main(["parity", "--component", "unet"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("mimajax parity: error: RuntimeError: boom") and "--debug" in err
  assert len(err.strip().splitlines()) == 1
  assert cli.main(["--debug", "parity", "--component", "unet"]) == 1
  assert 'raise RuntimeError("boom")' in capsys.readouterr().err


def test_debug_flag_is_in_the_help():
  out = subprocess.run([sys.executable, "-m", "mimajax.cli", "--help"], capture_output=True, text=True)
  assert "--debug" in out.stdout and "MIMAJAX_DEBUG" in out.stdout
