"""`mimajax bench memory` on 8 simulated devices, on the tests' toy GAN (tests/gan_family.py): its per-device state
figure equals what a device really holds of a state `train.init_sharded_state` placed, the layout it compiles against
is the one training uses, and the command prints its table and `fsdp8_overhead=` last."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "tests" / "gan_family.py")

PLACED = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from mimajax import bench_memory, families, sharding, train, train_step
config = bench_memory.load_config_file(sys.argv[1])
rows = bench_memory.measure(config, name="gan", devices=(8,), policies=("none",), batch_per_device=2, data=sys.argv[2],
                            log=lambda s: None)
config.mesh.update(data=1, fsdp=8, tensor=1)
task = families.get("toy_gan").build_task(config, None)
_, params, _ = train_step.split_groups(task.modules)
optimizers = {g: train_step.make_group_optimizer(p, task.optimizers[g]) for g, p in params.items()}
mesh = sharding.make_mesh({"fsdp": 8})
state = train.init_sharded_state(task, optimizers, jax.random.key(0), mesh)
_, layout = train.state_layout(task, optimizers, mesh)
same = jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, state, layout))
keys = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state) if not keys(x))
whole = sum(x.nbytes for x in jax.tree.leaves(state) if not keys(x))
print(json.dumps(dict(state=rows[0].state_bytes, ideal=rows[0].ideal_bytes, held=held, whole=whole,
                      same=all(same), leaves=len(same), arguments=rows[0].argument_bytes)))
"""


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def test_the_state_figure_is_what_a_device_holds_of_the_placed_state(tmp_path):
  out = subprocess.run([sys.executable, "-c", PLACED, CONFIG, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=_env())  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["same"] and r["leaves"] > 20  # the compiled layout is training's, leaf for leaf
  assert r["state"] == r["held"]  # bytes of device 0's shards of the real state
  assert r["ideal"] == pytest.approx(r["whole"] / 8)
  assert r["state"] > r["ideal"]  # the toy's biases and BatchNorm are replicated
  assert r["arguments"] >= r["state"]  # the compiler's arguments include the state (and the batch)


def test_bench_memory_prints_its_table_and_the_overhead_last(tmp_path):
  cmd = [sys.executable, "-m", "mimajax.cli", "bench", "memory", "--configs", CONFIG, "--devices", "1,2,8",
         "--remat", "none", "--data", str(tmp_path)]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
  lines = out.stdout.strip().splitlines()
  rows = [line for line in lines if line.startswith("| gan_family |")]
  assert len(rows) == 2 * 3, lines  # streamed as compiled, then the table
  one = rows[-3].split("|")
  assert one[3].strip() == "1" and one[7].strip() == "1.000", one  # one device holds the whole state
  overhead = float(re.fullmatch(r"fsdp8_overhead=([0-9.]+)", lines[-1]).group(1))
  assert overhead > 1.0


def test_bench_memory_names_a_bad_argument(tmp_path):
  cmd = [sys.executable, "-m", "mimajax.cli", "bench", "memory", "--configs", "configs/no_such.py", "--devices", "1",
         "--data", str(tmp_path)]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 2 and "configs/no_such.py does not exist" in out.stderr, out.stderr
  cmd[cmd.index("--data") + 1] = str(tmp_path / "missing")
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 2 and "--data" in out.stderr, out.stderr
