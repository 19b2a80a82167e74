"""`mimajax bench prepare`: prepare's throughput per worker on VoxCeleb2-like clips, the VoxCeleb2 dev estimate,
`videos_per_s=` last; bad arguments exit 2 naming them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
CMD = [sys.executable, "-m", "mimajax.cli", "bench", "prepare", "--videos", "3", "--clip-frames", "12", "--clip-size",
       "64", "--resolution", "64"]  # fmt: skip


def test_bench_prepare_prints_the_rate_and_the_voxceleb2_estimate():
  out = subprocess.run(CMD, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert "3 clips of 12 frames at 64 px" in lines[0], lines
  worker_hours = float(re.search(r"([0-9,.]+) worker-hours", lines[1]).group(1).replace(",", ""))
  rate = float(re.fullmatch(r"videos_per_s=([0-9.]+)", lines[-1]).group(1))
  frames_per_s = rate * 12  # this run's clips are 12 frames long; the estimate is at VoxCeleb2's ~201
  assert abs(worker_hours - 1_092_009 * 201 / frames_per_s / 3600) / worker_hours < 0.05


def test_bench_prepare_names_a_bad_argument():
  out = subprocess.run(CMD + ["--prepare-workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2 and "--prepare-workers 0" in out.stderr, out.stderr
