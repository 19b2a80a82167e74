"""The expression VAE (sec. 3.3, eq. 10-13): the KL against its closed form and a hand example, free bits, the
warm-up, the reparameterisation, the loss terms, shapes, jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.mmfa import expression_vae as ev


def test_kl_hand_example():
  # dim 1: mu 1, sigma 1 -> (1 + 1 - 1 - 0) / 2 = 0.5; dim 2: mu 0, sigma 0.5 -> -log 0.5 + 0.25 / 2 - 0.5
  mu = jnp.asarray([[1.0, 0.0]])
  log_var = jnp.log(jnp.asarray([[1.0, 0.25]]))
  want = 0.5 + (np.log(2.0) + 0.125 - 0.5)
  np.testing.assert_allclose(float(ev.kl_divergence(mu, log_var)), want, rtol=1e-6)
  # free bits: each dimension's batch mean is raised to 0.4 nats at least: 0.5 stays, 0.318 -> 0.4
  np.testing.assert_allclose(float(ev.kl_divergence(mu, log_var, free_bits=0.4)), 0.9, rtol=1e-6)
  assert float(ev.kl_divergence(jnp.zeros((3, 4)), jnp.zeros((3, 4)))) == 0.0  # the prior itself


def test_kl_matches_closed_form_and_torch():
  import torch

  rng = np.random.default_rng(0)
  mu = rng.normal(size=(5, 6)).astype(np.float32)
  sigma = rng.uniform(0.2, 2.0, size=(5, 6)).astype(np.float32)
  closed = (np.log(1.0 / sigma) + (sigma**2 + mu**2) / 2 - 0.5).sum(-1).mean()
  q = torch.distributions.Normal(torch.from_numpy(mu), torch.from_numpy(sigma))
  p = torch.distributions.Normal(torch.zeros(5, 6), torch.ones(5, 6))
  ref = torch.distributions.kl_divergence(q, p).sum(-1).mean().item()
  got = float(ev.kl_divergence(jnp.asarray(mu), jnp.log(jnp.asarray(sigma) ** 2)))
  np.testing.assert_allclose(got, closed, rtol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_free_bits_stop_the_gradient_below_the_floor():
  mu = jnp.asarray([[0.1, 2.0], [0.1, 2.0]])
  grad = jax.grad(lambda m: ev.kl_divergence(m, jnp.zeros_like(m), free_bits=0.5))(mu)
  # dimension 0: KL 0.005 < 0.5, no gradient; dimension 1: KL 2 > 0.5, d/dmu = mu / batch
  np.testing.assert_allclose(np.asarray(grad), [[0.0, 1.0], [0.0, 1.0]], atol=1e-6)


def test_reparameterise_statistics_and_warmup():
  mu = jnp.full((20000, 2), 1.5)
  log_var = jnp.log(jnp.asarray([[0.25, 4.0]]).repeat(20000, 0))
  z = np.asarray(ev.reparameterise(mu, log_var, jax.random.key(0)))
  np.testing.assert_allclose(z.mean(0), [1.5, 1.5], atol=0.05)
  np.testing.assert_allclose(z.std(0), [0.5, 2.0], rtol=0.03)
  np.testing.assert_allclose([float(ev.kl_warmup(s, 100)) for s in (0, 50, 100, 500)], [0, 0.5, 1, 1])
  assert float(ev.kl_warmup(0, 0)) == 1.0


def test_vae_loss_terms_hand_example():
  f_exp = jnp.asarray([[1.0, 2.0], [0.0, 0.0]])
  outputs = dict(reconstruction=jnp.asarray([[1.0, 1.0], [1.0, 0.0]]), mu=jnp.asarray([[1.0], [0.0]]),
                 log_var=jnp.zeros((2, 1)))  # fmt: skip
  scores = jnp.asarray([0.5, 1.0])
  total, terms = ev.vae_loss(f_exp, outputs, scores, weights=ev.VAEWeights(1.0, 2.0, 3.0), kl_scale=0.5)
  np.testing.assert_allclose(float(terms["reconstruction"]), (1.0 + 1.0) / 2)  # squared errors summed per sample
  np.testing.assert_allclose(float(terms["kl"]), 0.5 / 2)  # the first sample's mu^2 / 2, batch mean
  np.testing.assert_allclose(float(terms["adversarial"]), (0.25 + 0.0) / 2)
  np.testing.assert_allclose(float(total), 1.0 * 1.0 + 2.0 * 0.5 * 0.25 + 3.0 * 0.125, rtol=1e-6)
  np.testing.assert_allclose(float(ev.vae_discriminator_loss(jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0]))),
                             (0.0 + 1.0) / 2 + (0.0 + 1.0) / 2)  # fmt: skip


def test_vae_shapes_and_jit_grad():
  vae = ev.ExpressionVAE(12, 4, hidden=(16, 8), rngs=nnx.Rngs(0))
  disc = ev.ExpressionDiscriminator(12, hidden=(16,), rngs=nnx.Rngs(1))
  f_exp = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12)), jnp.float32)
  out = vae(f_exp, jax.random.key(0))
  assert out["mu"].shape == out["log_var"].shape == out["z"].shape == (3, 4)
  assert out["reconstruction"].shape == (3, 12)
  np.testing.assert_array_equal(np.asarray(out["log_var"]), 0.0)  # the zero-initialised head: sigma = 1 at start
  assert np.array_equal(np.asarray(vae(f_exp)["z"]), np.asarray(vae(f_exp)["mu"]))  # no key: the mean
  assert vae.sample(jax.random.key(1), 5).shape == (5, 12)
  path = vae.interpolate(f_exp[:1], f_exp[1:2], jnp.linspace(0, 1, 3))
  assert path.shape == (3, 1, 12)
  np.testing.assert_allclose(np.asarray(path[0]), np.asarray(vae(f_exp[:1])["reconstruction"]), atol=1e-6)
  assert disc(f_exp).shape == (3,)

  @nnx.jit
  def step(vae, disc, f_exp, key):
    def loss(vae):
      out = vae(f_exp, key)
      total, _ = ev.vae_loss(f_exp, out, disc(out["reconstruction"]), kl_scale=ev.kl_warmup(10, 100))
      return total

    return nnx.value_and_grad(loss)(vae)

  value, grads = step(vae, disc, f_exp, jax.random.key(2))
  assert np.isfinite(float(value))
  leaves = jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
