"""The evaluation networks split their batches over a host's devices: 4 simulated devices give the figures of one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, numpy as np, jax
from mimajax.metrics.inception import FIDInception
from mimajax.metrics.lpips import LPIPS
assert jax.local_device_count() == int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.random((10, 64, 64, 3), np.float32)
y = np.clip(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
lpips = LPIPS.load("alex")
assert len(lpips.params["convs"][0][0].sharding.device_set) == jax.local_device_count()  # replicated weights
np.save(sys.argv[1], np.concatenate([lpips(x, y), FIDInception.load().features((x * 255).astype(np.uint8)).ravel()]))
"""


def _run(out: Path, devices: int) -> np.ndarray:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))  # fmt: skip
  subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(devices)], check=True, env=env, cwd=ROOT, timeout=600)
  return np.load(out)


def test_lpips_and_inception_on_4_devices_equal_one(tmp_path):
  one, four = _run(tmp_path / "one.npy", 1), _run(tmp_path / "four.npy", 4)
  np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-7)  # 10 frames: padded to 12 and split 3 per device
