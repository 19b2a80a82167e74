"""The expression VAE of MMFA (sec. 3.3, Fig. 4, eq. 10-13): f_exp -> N(mu, sigma^2) -> z -> reconstructed f_exp.

It is trained after, and separately from, the animator (sec. 3.4) on the expression codes f_exp of the frozen
expression encoder, so that expressions can be sampled and interpolated in a continuous Gaussian latent space
(sec. 4.4). The equations are missing from the paper's text; from its prose:
  eq. 10  q(z | f_exp) = N(mu, diag(sigma^2)), (mu, log sigma^2) = Enc(f_exp)
  eq. 11  z = mu + sigma * eps, eps ~ N(0, I)                 (the reparameterisation trick)
  eq. 12  f_exp_hat = Dec(z)
  eq. 13  L_VAE = lambda_rec L_rec + lambda_kl KL(q(z | f_exp) || N(0, I)) + lambda_adv L_adv
The paper's three weights and the networks' sizes are lost; ours are below (VAE_WEIGHTS) with their reasons.

Posterior collapse: sec. 3.3 reports that the KL term converges faster than the reconstruction and the VAE then
decodes a constant average expression (Zhang et al. 2019), and adds an adversarial loss (Tang et al. 2022) on the
reconstructed codes, which it says restores their diversity. Besides that loss (a small MLP discriminator on f_exp
vectors, least squares like the animator's GAN), two standard remedies are options here, both off when at their
defaults' neutral values: a KL warm-up (kl_warmup: lambda_kl ramped linearly from 0, Bowman et al. 2016) and free
bits (kl_divergence's free_bits: each latent dimension's batch-mean KL is not penalised below that many nats,
Kingma et al. 2016), which keeps the encoder informative.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa import losses
from mimajax.models.layers import linear


class VAEWeights(NamedTuple):
  """Eq. 13's balance weights (the paper's are lost; configs/mmfa.py expression_vae holds the same). Our choices:
  reconstruction 1; KL 0.01, a beta well below 1 because the paper's collapse is the KL winning over the
  reconstruction; adversarial 0.1, a regulariser that must not dominate the reconstruction of codes it only has to
  keep diverse."""

  reconstruction: float = 1.0
  kl: float = 0.01
  adversarial: float = 0.1


VAE_WEIGHTS = VAEWeights()
LEAKY_SLOPE = 0.2  # our choice (the paper gives no activation): LeakyReLU keeps small codes' gradients alive


def _mlp(sizes: Sequence[int], *, rngs: nnx.Rngs) -> nnx.List:
  """Linear layers of the given widths; logical axes alternate (embed, mlp) / (mlp, embed) as in models.layers."""
  return nnx.List([
    linear(a, b, axes=("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"), rngs=rngs)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  ])  # fmt: skip


def _run(layers: nnx.List, x: jax.Array, last_activation: bool = False) -> jax.Array:
  for i, layer in enumerate(layers):
    x = layer(x)
    if i < len(layers) - 1 or last_activation:
      x = jax.nn.leaky_relu(x, LEAKY_SLOPE)
  return x


class ExpressionVAE(nnx.Module):
  """Eq. 10-12 on expression codes (N, exp_dim). Sizes are ours: hidden widths of the encoder, mirrored by the
  decoder; the encoder's last hidden layer feeds two heads, mu and log sigma^2."""

  def __init__(self, exp_dim: int, latent_dim: int, hidden: Sequence[int] = (256, 256), *, rngs: nnx.Rngs):
    hidden = tuple(hidden)
    if not hidden:
      raise ValueError("ExpressionVAE needs at least one hidden layer")
    self.exp_dim, self.latent_dim = exp_dim, latent_dim
    self.encoder = _mlp((exp_dim, *hidden), rngs=rngs)
    axes = ("embed", "mlp") if len(hidden) % 2 == 1 else ("mlp", "embed")  # continues the alternation
    self.mu = linear(hidden[-1], latent_dim, axes=axes, rngs=rngs)
    # log sigma^2 starts at 0 (sigma = 1): the prior's width, so the first KL is that of the means alone
    self.log_var = linear(hidden[-1], latent_dim, axes=axes, rngs=rngs, kernel_init=nnx.initializers.zeros)
    self.decoder = _mlp((latent_dim, *hidden[::-1], exp_dim), rngs=rngs)

  def encode(self, f_exp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eq. 10: (mu, log sigma^2), each (N, latent_dim)."""
    h = _run(self.encoder, f_exp, last_activation=True)
    return self.mu(h), self.log_var(h)

  def decode(self, z: jax.Array) -> jax.Array:
    """Eq. 12: z (N, latent_dim) -> f_exp_hat (N, exp_dim), no output activation (codes are signed)."""
    return _run(self.decoder, z)

  def __call__(self, f_exp: jax.Array, key: jax.Array | None = None) -> dict:
    """Encode, sample z (eq. 11; the mean when no key is given, i.e. at inference) and decode."""
    mu, log_var = self.encode(f_exp)
    z = mu if key is None else reparameterise(mu, log_var, key)
    return dict(mu=mu, log_var=log_var, z=z, reconstruction=self.decode(z))

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n expression codes decoded from the prior N(0, I)."""
    return self.decode(jax.random.normal(key, (n, self.latent_dim), jnp.float32))

  def interpolate(self, f_a: jax.Array, f_b: jax.Array, alphas: jax.Array) -> jax.Array:
    """Sec. 4.4's expression interpolation: the codes decoded along the line between the posterior means of f_a and
    f_b (each (N, exp_dim)), at alphas (A,) in [0, 1] -> (A, N, exp_dim)."""
    mu_a, _ = self.encode(f_a)
    mu_b, _ = self.encode(f_b)
    a = jnp.asarray(alphas, jnp.float32)[:, None, None]
    return jax.vmap(self.decode)((1.0 - a) * mu_a[None] + a * mu_b[None])


def reparameterise(mu: jax.Array, log_var: jax.Array, key: jax.Array) -> jax.Array:
  """Eq. 11: z = mu + exp(log sigma^2 / 2) * eps, eps ~ N(0, I)."""
  eps = jax.random.normal(key, mu.shape, mu.dtype)
  return mu + jnp.exp(0.5 * log_var) * eps


class ExpressionDiscriminator(nnx.Module):
  """The adversarial term's critic (sec. 3.3): an MLP on expression codes (N, exp_dim) -> (N,) scores. Our sizes; a
  least-squares GAN target (1 real, 0 fake), like the animator's."""

  def __init__(self, exp_dim: int, hidden: Sequence[int] = (256, 256), *, rngs: nnx.Rngs):
    self.layers = _mlp((exp_dim, *tuple(hidden), 1), rngs=rngs)

  def __call__(self, f_exp: jax.Array) -> jax.Array:
    return _run(self.layers, f_exp)[:, 0]


def kl_divergence(mu: jax.Array, log_var: jax.Array, free_bits: float = 0.0) -> jax.Array:
  """KL(N(mu, sigma^2) || N(0, I)), summed over latent dimensions, mean over the batch (eq. 13's KL term):
  per dimension 0.5 (mu^2 + sigma^2 - 1 - log sigma^2).

  free_bits > 0: each dimension's batch-mean KL is replaced by max(KL_d, free_bits) (Kingma et al. 2016), so the
  optimiser gains nothing by pushing a dimension below free_bits nats (its gradient is zero there)."""
  per_dim = 0.5 * (jnp.square(mu) + jnp.exp(log_var) - 1.0 - log_var)
  per_dim = per_dim.reshape(-1, per_dim.shape[-1]).mean(axis=0)
  if free_bits > 0:
    per_dim = jnp.maximum(per_dim, free_bits)
  return per_dim.sum()


def reconstruction_loss(reconstruction: jax.Array, f_exp: jax.Array) -> jax.Array:
  """Eq. 13's reconstruction term: squared error summed over the code's dimensions, mean over the batch (a Gaussian
  log-likelihood up to constants, on the same per-sample scale as the summed KL). Our choice of norm."""
  return jnp.square(reconstruction - f_exp).reshape(f_exp.shape[0], -1).sum(-1).mean()


def kl_warmup(step: jax.Array | int, warmup_steps: int) -> jax.Array:
  """The KL weight's factor at `step`: linear from 0 to 1 over warmup_steps (1 throughout when warmup_steps <= 0)."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)


def vae_loss(f_exp: jax.Array, outputs: dict, fake_scores: jax.Array, *, weights: VAEWeights = VAE_WEIGHTS,
             kl_scale: jax.Array | float = 1.0, free_bits: float = 0.0) -> tuple[jax.Array, dict]:  # fmt: skip
  """Eq. 13 for the VAE's update: (total, {reconstruction, kl, adversarial}) with the terms unweighted.

  f_exp: the encoder's codes (targets; stop-gradient, they come from the frozen animator). outputs: ExpressionVAE's
  dict. fake_scores: the discriminator's scores of outputs["reconstruction"] (and of prior samples, if the caller
  adds them). kl_scale: kl_warmup's factor."""
  f_exp = jax.lax.stop_gradient(f_exp)
  terms = dict(
    reconstruction=reconstruction_loss(outputs["reconstruction"], f_exp),
    kl=kl_divergence(outputs["mu"], outputs["log_var"], free_bits),
    adversarial=losses.lsgan_generator_loss([fake_scores]),
  )
  total = (weights.reconstruction * terms["reconstruction"] + weights.kl * kl_scale * terms["kl"]
           + weights.adversarial * terms["adversarial"])  # fmt: skip
  return total, terms


def vae_discriminator_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """The critic's least-squares loss: real codes f_exp towards 1, reconstructed (or sampled) codes towards 0. Score
  the fake codes as D(stop_gradient(codes)) so that this update does not reach the VAE."""
  return losses.lsgan_discriminator_loss([real_scores], [fake_scores])
