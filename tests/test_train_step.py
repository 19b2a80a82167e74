"""The jitted train step: trainable masks, accumulation, NaN handling, sharding over 8 simulated devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimajax import families, sharding, train, train_step
from mimajax.models.layers import linear


class TinyRegressor(nnx.Module):
  def __init__(self, rngs):
    self.encoder = linear(4, 8, rngs=rngs)
    self.head = linear(8, 1, axes=("mlp", None), rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.encoder(x)))


def mse(modules, batch, rng, extra):
  del rng, extra
  loss = jnp.mean((modules["model"](batch["x"])[:, 0] - batch["y"]) ** 2)
  return loss, {"mse": loss}


def _initial_state(modules, tx, seed):
  """The training loop's own initialiser, on a one-device mesh."""
  task = families.Task(modules=modules, losses={}, optimizers={}, axis_rules={"model": ()}, iterator=None,
                       images_per_step=0)  # fmt: skip
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return train.init_sharded_state(task, {"model": tx}, jax.random.key(seed), mesh)


def _step_for(loss_fn, patterns, *, seed=0, accumulation_steps=1, lr=1e-2, max_grad_norm=None):
  modules = {"model": TinyRegressor(nnx.Rngs(0))}
  graphdefs, params, rests = train_step.split_groups(modules)
  tx = train_step.make_optimizer(train_step.trainable_labels(params["model"], patterns), learning_rate=lr,
                                 max_grad_norm=max_grad_norm, weight_decay=0.0)  # fmt: skip
  state = _initial_state(modules, tx, seed)
  step = train_step.make_train_step(graphdefs, {"model": loss_fn}, {"model": tx}, rests=rests,
                                    accumulation_steps=accumulation_steps)  # fmt: skip
  return state, step


def _setup(patterns, accumulation_steps=1, lr=1e-2, max_grad_norm=None):
  state, step = _step_for(mse, patterns, accumulation_steps=accumulation_steps, lr=lr, max_grad_norm=max_grad_norm)
  return state, jax.jit(step)


def _batch(n=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(k1, (n, 4)), "y": jax.random.normal(k2, (n,))}


def _flat(params):
  return {train_step.path_string(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(params["model"])}


def test_frozen_parameters_do_not_move_and_have_no_optimizer_state():
  state, step = _setup(["^head/"])
  before = _flat(state.params)
  for i in range(3):
    state, metrics = step(state, _batch(seed=i))
  after = _flat(state.params)
  for k in before:
    if k.startswith("encoder/"):
      np.testing.assert_array_equal(after[k], before[k])
    else:
      assert not np.array_equal(after[k], before[k]), k
  # Adam moments exist only for the two head tensors (kernel, bias): 2 x (mu, nu) = 4 arrays, + count
  moment_sizes = sorted(int(x.size) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moment_sizes == [1, 1, 8, 8]
  assert int(state.step) == 3 and bool(metrics["finite"])


def test_patterns_that_match_nothing_are_refused():
  with pytest.raises(ValueError, match="match no parameter"):
    _setup(["^unet/"])


def test_gradient_accumulation_equals_the_large_batch():
  big, step_big = _setup([".*"], accumulation_steps=1)
  acc, step_acc = _setup([".*"], accumulation_steps=4)
  for i in range(3):
    big, m_big = step_big(big, _batch(seed=i))
    acc, m_acc = step_acc(acc, _batch(seed=i))
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
  for k, v in _flat(big.params).items():
    np.testing.assert_allclose(_flat(acc.params)[k], v, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="does not split into 4"):
    step_acc(acc, _batch(n=6))


def weighted_mse(modules, batch, rng, extra):
  """A loss reading a network-like entry of the batch (train_step.SHARED_KEY) that is not split into micro-batches."""
  del rng, extra
  shared = batch[train_step.SHARED_KEY]
  loss = jnp.mean(shared["weights"][:, 0] * (modules["model"](batch["x"])[:, 0] - batch["y"]) ** 2) * shared["scale"]
  return loss, {"mse": loss}


def test_accumulation_passes_the_shared_entry_whole():
  """An 8-row weight table under SHARED_KEY with 4 micro-batches of 2 rows: split, its shape would not match."""
  shared = {"weights": jnp.full((2, 1), 2.0), "scale": jnp.float32(0.5)}  # (2, 1): broadcast over 2 rows only
  results = []
  for n in (1, 4):
    state, step = _step_for(weighted_mse, [".*"], accumulation_steps=n)
    for i in range(2):
      batch = {**_batch(n=2 * n, seed=i), train_step.SHARED_KEY: shared}
      if n == 1:  # the same 8 samples in one batch: weights broadcast over the rows as a (1,) column
        batch = {**_batch(n=8, seed=i), train_step.SHARED_KEY: {"weights": jnp.full((1, 1), 2.0), "scale": 0.5}}
      state, metrics = jax.jit(step)(state, batch)
    results.append((float(metrics["loss"]), _flat(state.params)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  for k, v in results[0][1].items():
    np.testing.assert_allclose(results[1][1][k], v, rtol=1e-5, atol=1e-7)


def test_non_finite_step_keeps_the_state_and_names_the_step():
  state, step = _setup([".*"])
  state, _ = step(state, _batch())
  good = _flat(state.params)
  bad = _batch()
  bad["y"] = bad["y"].at[0].set(jnp.nan)
  new, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  assert int(new.step) == 1
  for k, v in _flat(new.params).items():
    np.testing.assert_array_equal(v, good[k])
  with pytest.raises(FloatingPointError, match=r"step 1 in \['grad_norm', 'loss', 'mse'\]"):
    train_step.check_finite(jax.device_get(metrics), 1)


@pytest.mark.parametrize("lr, bad_step", [(1e30, 1), (1e18, 2)])
def test_an_overflowing_update_with_a_finite_loss_keeps_the_state(lr, bad_step):
  """A tanh-bounded loss stays finite (with zero gradients) whatever the weights: only the update shows the
  divergence. lr = 1e30 throws the weights to ~1e30 at once (finite, beyond param_limit: their squares overflow);
  lr = 1e18 to ~1e18 (accepted), then the decoupled weight decay lr * wd * p ~ 1e34 takes them beyond."""

  def bounded(modules, batch, rng, extra):
    del rng, extra
    loss = jnp.mean((jnp.tanh(modules["model"](batch["x"])[:, 0]) - batch["y"]) ** 2)
    return loss, {"mse": loss}

  modules = {"model": TinyRegressor(nnx.Rngs(0))}
  graphdefs, params, rests = train_step.split_groups(modules)
  tx = train_step.make_optimizer(train_step.trainable_labels(params["model"], [".*"]), learning_rate=lr,
                                 max_grad_norm=None, weight_decay=1e-2)  # fmt: skip
  state = _initial_state(modules, tx, 0)
  step = jax.jit(train_step.make_train_step(graphdefs, {"model": bounded}, {"model": tx}, rests=rests))
  for i in range(1, bad_step):
    state, metrics = step(state, _batch(seed=i))
    assert bool(metrics["finite"]) and 1e16 < max(np.abs(v).max() for v in _flat(state.params).values()) < 2.0**64
  good = _flat(state.params)
  new, metrics = step(state, _batch(seed=bad_step))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))  # nothing else tells
  assert not bool(metrics["finite"]) and int(new.step) == bad_step - 1
  leaves = [np.asarray(x) for x in jax.tree.leaves((new.params, new.opt_state)) if np.asarray(x).dtype.kind == "f"]
  assert all(np.isfinite(x).all() for x in leaves) and max(np.abs(x).max() for x in leaves) < 2.0**64
  for k, v in _flat(new.params).items():
    np.testing.assert_array_equal(v, good[k])
  with pytest.raises(
    FloatingPointError, match=rf"step {bad_step} in .*updated parameters.*left at step {bad_step - 1}"
  ):
    train_step.check_finite(jax.device_get(metrics), bad_step)


def test_step_rng_is_fold_in_of_the_step():
  """Resuming from a saved state continues the exact random stream (the key depends only on rng and step)."""
  seen = []

  def record(modules, batch, rng, extra):
    seen.append(rng)
    return mse(modules, batch, rng, extra)

  state, step = _step_for(record, [".*"], seed=7)
  state, _ = step(state, _batch())
  state, _ = step(state, _batch())
  assert jnp.array_equal(jax.random.key_data(seen[1]), jax.random.key_data(jax.random.fold_in(jax.random.key(7), 1)))


def test_sharded_step_matches_single_device_on_8_simulated_devices():
  script = os.path.join(os.path.dirname(__file__), "_sharded_train_step.py")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["param_rel_err"] < 1e-5, result["param_rel_err"]
  # Per tensor, Adam's normalised update turns reduction-order noise in near-zero gradients into up to
  # lr-sized steps, so single small tensors may differ more than the whole; the global bound is the contract.
  assert result["max_tensor_rel_err"] < 1e-3, (result["worst_tensor"], result["max_tensor_rel_err"])
  assert result["bank_rel_err"] < 1e-5
  assert result["moments_like_params"], "Adam moments are not laid out like their parameters"
  assert abs(result["loss_sharded"] - result["loss_single"]) <= 1e-5 * abs(result["loss_single"])
  specs = result["specs"]
  # the rules: embed -> fsdp, heads -> tensor, conv_out -> fsdp, norm replicated
  q = "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q/kernel"
  assert specs[q] == "P('fsdp', 'tensor')", specs[q]
  assert specs["unet/conv_in/kernel"] == "P(None, None, None, 'fsdp')", specs["unet/conv_in/kernel"]
  assert specs["unet/conv_norm_out/scale"] == "P(None,)", specs["unet/conv_norm_out/scale"]
