"""`bash launch/gpu_check.sh --dry-run`: the one GPU check script, run here at tiny sizes on the CPU so that it cannot
rot before a GPU is lent: every part runs, each records its figures, and gpu_check.json says which failed."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PARTS = {  # part -> the figures its log must give
  "parity_unet": {"rel_err"},
  "parity_vae": {"rel_err"},
  "parity_mimaface": {"rel_err"},
  "parity_mmfa_init": {"rel_err"},
  "bench_unet": {"ratio"},
  "train_stage1": {"steps_per_s"},
  "train_stage2": {"steps_per_s"},
  "bench_animate": {"ratio", "jax_frames_per_s", "torch_frames_per_s"},
  "mmfa_frames": {"frames_per_s"},
}


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_gpu_check_dry_run_runs_every_part_and_writes_its_figures(tmp_path):
  out = tmp_path / "gpu_check.json"
  env = {**os.environ, "DATA": str(tmp_path / "demo64")}
  run = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["dry_run"] is True and report["jax_devices"]
  assert set(PARTS) <= set(report["parts"]), sorted(report["parts"])
  failed = {n: p["log_tail"][-800:] for n, p in report["parts"].items() if not p["ok"]}
  assert not failed, failed
  for name, keys in PARTS.items():
    assert keys <= set(report["parts"][name]["figures"]), (name, report["parts"][name])
  assert report["parts"]["parity_unet"]["figures"]["rel_err"] < 1e-4
