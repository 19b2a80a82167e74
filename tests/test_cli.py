"""The `mimajax` command: parity prints rel_err= last and fails above tolerance; bench prints ratio=."""

import subprocess
import sys

import pytest

from mimajax import cli, parity


@pytest.mark.parametrize("component", ["scheduler", "vae", "unet", "clip", "motion"])
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


def test_console_script_is_installed():
  out = subprocess.run([sys.executable, "-m", "mimajax.cli", "--help"], capture_output=True, text=True)
  assert out.returncode == 0 and "parity" in out.stdout and "bench" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("component", ["unet", "vae", "clip", "motion"])
def test_parity_sd15_full_size(component, capsys):
  """The full SD1.5 architecture with random weights (minutes on CPU; what GPU users run)."""
  assert cli.main(["parity", "--component", component, "--size", "sd15"]) == 0
