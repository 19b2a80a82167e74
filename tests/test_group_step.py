"""The step over named parameter groups: each group moves only by its own loss, BatchNorm statistics advance
micro-batch by micro-batch under accumulation, and untrained parameters cost no gradient computation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import families, train_step
from mimajax.models.layers import linear
from mimajax.training import reporting


class Normed(nnx.Module):
  def __init__(self, rngs):
    self.inp = linear(3, 8, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.out = linear(8, 1, axes=("embed", None), rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.norm(self.inp(x))))[:, 0]


def _build(losses, patterns=(), accumulation_steps=1):
  modules = {"a": Normed(nnx.Rngs(0)), "b": Normed(nnx.Rngs(1))}
  graphdefs, params, rests = train_step.split_groups(modules)
  configs = {
    g: families.OptimizerConfig(learning_rate=1e-2, weight_decay=0.0, max_grad_norm=None, trainable=patterns)
    for g in modules
  }
  optimizers = {g: train_step.make_group_optimizer(params[g], configs[g]) for g in modules}
  untrained = {g: train_step.untrained_paths(params[g], configs[g]) for g in modules}
  state = train_step.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state={g: optimizers[g].init(params[g]) for g in modules},
    rng=jax.random.key(0),
    buffers=train_step.carried(rests),
  )
  step = train_step.make_train_step(graphdefs, losses, optimizers, rests=rests, untrained=untrained,
                                    accumulation_steps=accumulation_steps)  # fmt: skip
  return state, jax.jit(step)


def _batch(n=8):
  return {"x": jax.random.normal(jax.random.key(3), (n, 3))}


def only_a(modules, batch, rng, extra):
  return jnp.mean(modules["a"](batch["x"]) ** 2), {}


def b_through_a(modules, batch, rng, extra):  # b's loss reads a: a must not move by it
  return jnp.mean((modules["b"](batch["x"]) - modules["a"](batch["x"])) ** 2), {}


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_each_group_moves_only_by_its_own_loss():
  state, step = _build({"a": lambda *a: (jnp.zeros(()), {}), "b": b_through_a})
  new, metrics = step(state, _batch())
  before, after = _flat(state.params), _flat(new.params)
  assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("['a']"))
  assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("['b']"))
  assert {"a/loss", "b/loss", "a/grad_norm", "b/grad_norm", "finite"} <= set(metrics)


def test_accumulation_advances_batch_statistics_per_micro_batch():
  state, step = _build({"a": only_a, "b": lambda *a: (jnp.zeros(()), {})}, accumulation_steps=2)
  x = _batch()["x"]
  new, _ = step(state, {"x": x})
  # Two BatchNorm updates (momentum 0.9) in order, as two steps on the halves would make them.
  inp = state.params["a"]["inp"]["kernel"][...]
  m1, m2 = (jnp.mean(h @ inp, axis=0) for h in (x[:4], x[4:]))
  want = 0.9 * (0.1 * m1) + 0.1 * m2
  np.testing.assert_allclose(new.buffers["a"]["norm"]["mean"][...], want, rtol=1e-5, atol=1e-7)


def test_untrained_parameters_are_not_differentiated():
  losses = {"a": only_a, "b": lambda *a: (jnp.zeros(()), {})}
  full, step_full = _build(losses)
  head, step_head = _build(losses, patterns=("^out/",))
  batch = _batch(256)
  new, _ = step_head(head, batch)
  before, after = _flat(head.params["a"]), _flat(new.params["a"])
  assert [k for k in before if not np.array_equal(before[k], after[k])] == [
    "['out']['bias'].value",
    "['out']['kernel'].value",
  ]
  flops = [reporting.compiled_flops(s.lower(st, batch).compile()) for s, st in ((step_full, full), (step_head, head))]
  assert flops[1] < flops[0], flops  # no weight gradient for inp, norm
