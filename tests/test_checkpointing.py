"""Checkpoint integrity: every step records checksums of its arrays; a truncated or bit-flipped newest step is
detected, training falls back to the newest intact step (setting the damaged one aside) and inference to the
newest step whose parameters are intact; the checksums do not depend on the sharding."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax import checkpointing
from mimajax.errors import CheckpointDamagedError, CheckpointReadError

GROUP = "model"


def _state(i: int) -> dict:
  """A TrainState-like tree: parameters, Adam moments, counters. The floats have random bits (finite ones):
  incompressible, so Orbax's zstd stores them raw and a test can find and flip one of their bits on disk."""
  rng = np.random.default_rng(i)

  def f(*shape):
    bits = rng.integers(0, 2**32, shape, dtype=np.uint32)
    bits[(bits & 0x7F800000) == 0x7F800000] ^= 0x40000000  # no inf / NaN
    return jnp.asarray(bits.view(np.float32))

  return {
    "step": jnp.int32(i),
    "params": {GROUP: {"dense": {"kernel": {"value": f(96, 96)}, "bias": {"value": f(96)}}}},
    "opt_state": {GROUP: {"mu": {"dense": {"kernel": {"value": f(96, 96)}}}, "count": jnp.int32(i)}},
    "rng": jnp.asarray([i, 7], jnp.uint32),
  }


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@pytest.fixture
def workdir(tmp_path):
  """checkpoints/1..3 of _state(1..3), written like the training loop writes them (async, with checksums)."""
  ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, keep=5)
  for i in (1, 2, 3):
    assert ckpt.save(i, _state(i))
  ckpt.close()
  return tmp_path


def _restore(workdir):
  ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=5)
  template = _state(0)
  try:
    state, _ = ckpt.restore(template, _shardings(template))
    return ckpt.restored_step, state
  finally:
    ckpt.close()


def _stored_at(workdir, step, array) -> tuple[Path, int]:
  """The array file of checkpoints/<step> holding `array`'s bytes, and where they start."""
  raw = np.asarray(array).tobytes()
  for f in sorted((workdir / "checkpoints" / str(step) / "state").rglob("*")):
    at = f.read_bytes().find(raw) if f.is_file() else -1
    if at >= 0:
      return f, at
  raise AssertionError("the array's bytes are not stored raw in any file")


def _kernel(i):
  return _state(i)["params"][GROUP]["dense"]["kernel"]["value"]


def _truncate(workdir, step, array=None):
  """The array file holding `array` (default: the parameters' kernel) cut off just before it."""
  f, at = _stored_at(workdir, step, _kernel(step) if array is None else array)
  with open(f, "r+b") as h:
    h.truncate(at)


def _flip_bit(workdir, step, array):
  """One flipped bit inside the stored bytes of `array` (same size: nothing but the checksums can tell)."""
  f, at = _stored_at(workdir, step, array)
  data = bytearray(f.read_bytes())
  data[at + np.asarray(array).nbytes // 2] ^= 0x10
  f.write_bytes(bytes(data))


def _warnings(caplog):
  return " ".join(
    r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("mimajax")
  )


def test_every_step_records_the_checksums_of_what_it_saved(workdir):
  record = json.loads((workdir / "checkpoints" / "3" / "checksums" / "checksums.json").read_text())
  assert record["format"] == checkpointing.CHECKSUM_FORMAT and record["step"] == 3
  assert record["arrays"] == checkpointing.checksums(_state(3))
  assert set(record["arrays"]) == {"step", "params/model/dense/kernel/value", "params/model/dense/bias/value",
                                   "opt_state/model/mu/dense/kernel/value", "opt_state/model/count", "rng"}  # fmt: skip
  assert checkpointing.verify(workdir / "checkpoints" / "3", checkpointing.read_state(workdir / "checkpoints/3/state"))


def test_a_single_changed_element_or_two_swapped_ones_change_the_checksum():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)
  base = checkpointing.checksums({"x": x})["x"]
  assert checkpointing.checksums({"x": x.at[2, 3].set(jnp.nextafter(x[2, 3], 10.0))})["x"] != base
  assert checkpointing.checksums({"x": x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])})["x"] != base
  assert checkpointing.checksums({"x": x.astype(jnp.bfloat16)})["x"] != checkpointing.checksums({"x": x})["x"]


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_a_damaged_newest_step_falls_back_for_training_and_inference(workdir, caplog, damage):
  if damage == "truncated":
    _truncate(workdir, 3)
  else:
    _flip_bit(workdir, 3, _kernel(3))
  with caplog.at_level(logging.WARNING):
    step, state = _restore(workdir)
  assert step == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  said = _warnings(caplog)
  assert "checkpoints/3 is damaged" in said and "resuming from the newest intact one, step 2" in said
  # the damaged step is set aside (kept), so the resumed run can save step 3 again
  assert (workdir / "checkpoints.damaged" / "3" / "state").is_dir()
  assert checkpointing.saved_steps(workdir) == [1, 2]
  ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=5)
  assert ckpt.save(3, _state(3))
  ckpt.close()
  assert _restore(workdir)[0] == 3


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_inference_reads_the_newest_step_with_intact_parameters(workdir, caplog, damage):
  if damage == "truncated":
    _truncate(workdir, 3)
  else:
    _flip_bit(workdir, 3, _state(3)["params"][GROUP]["dense"]["bias"]["value"])
  with caplog.at_level(logging.WARNING):
    step_dir, params = checkpointing.intact_params(workdir, GROUP)
  assert step_dir == workdir / "checkpoints" / "2"
  np.testing.assert_array_equal(
    params[("dense", "bias")], np.asarray(_state(2)["params"][GROUP]["dense"]["bias"]["value"])
  )
  said = _warnings(caplog)
  assert "checkpoints/3" in said and "using the newest intact one" in said and "checkpoints/2" in said
  # the step folder itself is refused, pointing at the workdir
  with pytest.raises(CheckpointDamagedError, match="pass the workdir"):
    checkpointing.checkpoint_params(workdir / "checkpoints" / "3", GROUP)
  assert (workdir / "checkpoints" / "3").is_dir()  # inference never moves anything


def test_damage_in_the_optimizer_state_only_leaves_inference_on_the_newest_step(workdir, caplog):
  _flip_bit(workdir, 3, _state(3)["opt_state"][GROUP]["mu"]["dense"]["kernel"]["value"])
  with caplog.at_level(logging.WARNING):
    step_dir, params = checkpointing.intact_params(workdir, GROUP)
  assert step_dir.name == "3" and not _warnings(caplog)
  np.testing.assert_array_equal(params[("dense", "kernel")], np.asarray(_kernel(3)))
  assert _restore(workdir)[0] == 2  # training needs the optimizer state: it falls back


def test_no_intact_step_is_one_clear_error(workdir):
  for step in (1, 2, 3):
    _truncate(workdir, step)
  with pytest.raises(CheckpointDamagedError, match="no intact checkpoint under") as e:
    _restore(workdir)
  assert all(f"checkpoints/{s} is damaged" in str(e.value) for s in (1, 2, 3))
  assert checkpointing.saved_steps(workdir) == [1, 2, 3]  # nothing moved when nothing could be resumed
  with pytest.raises(CheckpointDamagedError, match="has intact parameters"):
    checkpointing.intact_params(workdir, GROUP)


def test_a_step_of_another_model_is_refused_not_fallen_back_from(workdir):
  template = _state(0)
  template["params"][GROUP]["dense"]["kernel"]["value"] = jnp.zeros((96, 48))
  ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=5)
  with pytest.raises(CheckpointReadError, match=r"does not fit .* 1 of another shape \(e.g. params/model/dense") as e:
    ckpt.restore(template, _shardings(template))
  ckpt.close()
  assert not isinstance(e.value, CheckpointDamagedError)
  assert checkpointing.saved_steps(workdir) == [1, 2, 3]


def test_steps_saved_before_checksums_read_unverified(workdir):
  for step in (1, 2, 3):
    os.remove(workdir / "checkpoints" / str(step) / "checksums" / "checksums.json")
  assert _restore(workdir)[0] == 3
  assert checkpointing.intact_params(workdir, GROUP)[0].name == "3"


SHARDED = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mimajax import checkpointing
x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 24)), jnp.float32)
tree = {"a": x, "b": x.astype(jnp.bfloat16), "k": jax.random.key(3), "s": jnp.int32(5)}
mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
sharded = {"a": jax.device_put(x, NamedSharding(mesh, P("data", "fsdp"))),
           "b": jax.device_put(tree["b"], NamedSharding(mesh, P(None, "data"))), "k": tree["k"], "s": tree["s"]}
print(json.dumps({"one": checkpointing.checksums(tree), "eight": checkpointing.checksums(sharded),
                  "eight_per_array": checkpointing.checksums(sharded, per_array=True)}))
"""


def test_checksums_do_not_depend_on_the_sharding():
  out = subprocess.run([sys.executable, "-c", SHARDED], cwd=Path(__file__).parents[1], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["one"] == result["eight"] == result["eight_per_array"] and len(result["one"]) == 4
