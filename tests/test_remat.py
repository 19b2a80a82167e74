"""Rematerialised U-Net layers give the same values and gradients as stored activations; bf16 keeps fp32 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mimajax.mimaface import factory as mimaface_factory
from mimajax.models import factory, remat


def _value_and_grads(policy, dtype="float32"):
  cfg = tiny.get_config("2")
  cfg.model.dtype = dtype
  cfg.model.attention_impl = "xla"
  model = mimaface_factory.build_mimaface(cfg.model, stage=2, rngs=nnx.Rngs(0))
  remat.set_remat(model.unet, policy)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (1, 4, 8, 8, 13))
  context = jax.random.normal(jax.random.key(2), (1, 4, 32))

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p, rest).unet(x, jnp.array([10]), context) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)], params


@pytest.fixture(scope="module")
def reference():
  return _value_and_grads("none")


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_policy_matches_stored_activations(reference, policy):
  value, grads, _ = _value_and_grads(policy)
  ref_value, ref_grads, _ = reference
  assert value == pytest.approx(ref_value, rel=1e-6)
  num = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(grads, ref_grads)))
  den = np.sqrt(sum(float(np.sum(b**2)) for b in ref_grads))
  assert num / den < 1e-5


def test_unknown_remat_policy_is_refused():
  model = factory.build_unet(tiny.get_config().model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat policy 'sometimes' unknown"):
    remat.set_remat(model, "sometimes")


def test_bf16_compute_keeps_fp32_master_weights(reference):
  value, grads, params = _value_and_grads("dots", dtype="bfloat16")
  assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  assert {g.dtype for g in grads} == {np.dtype("float32")}
  assert value == pytest.approx(reference[0], rel=5e-2)  # bf16 activations: close, not equal
