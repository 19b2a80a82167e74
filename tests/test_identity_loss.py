"""Identity contrastive loss (eq. 2) against explicit loops, the denoising loss, and the photometric augmentations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax.mimaface.augment import PhotometricConfig, photometric_augment
from mimajax.mimaface.losses import diffusion_loss, identity_contrastive_loss


def reference_loss(anchors, positives, bank, bank_labels, bank_valid, labels, temperature=1.0, in_batch=True):
  """Eq. 2 by explicit loops: mean over anchors of the mean over positives of -log(e^s+ / (e^s+ + sum e^s-))."""
  cos = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  total = 0.0
  for i in range(len(anchors)):
    candidates = [(positives[i], True)]  # (token, is it a positive of anchor i)
    if in_batch:
      for j in range(len(anchors)):
        if j != i:
          candidates += [(positives[j], labels[j] == labels[i]), (anchors[j], labels[j] == labels[i])]
    for m in range(len(bank)):
      if bank_valid[m]:
        candidates.append((bank[m], bank_labels[m] == labels[i]))
    negatives = sum(math.exp(cos(anchors[i], z) / temperature) for z, pos in candidates if not pos)
    terms = []
    for z, pos in candidates:
      if pos:
        e = math.exp(cos(anchors[i], z) / temperature)
        terms.append(-math.log(e / (e + negatives)))
    total += sum(terms) / len(terms)
  return total / len(anchors)


def _case(seed=0):
  rng = np.random.default_rng(seed)
  anchors = rng.normal(size=(3, 4)).astype(np.float32)
  positives = (anchors + 0.3 * rng.normal(size=(3, 4))).astype(np.float32)
  labels = np.array([7, 2, 7])
  bank = rng.normal(size=(6, 4)).astype(np.float32)
  # Same identity (7, 2), other identities (5, 9), invalid same-identity and invalid other slots.
  bank_labels = np.array([7, 5, 2, 9, 7, 3])
  bank_valid = np.array([True, True, True, True, False, False])
  return anchors, positives, bank, bank_labels, bank_valid, labels


def test_single_pair_by_hand():
  # sim(z, z+) = 1, one negative with sim 0: -log(e / (e + 1)).
  loss = identity_contrastive_loss(
    jnp.array([[2.0, 0.0]]),
    jnp.array([[1.0, 0.0]]),
    jnp.array([[0.0, 3.0]]),
    jnp.array([4]),
    jnp.array([True]),
    jnp.array([1]),
  )
  assert float(loss) == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_matches_explicit_loops(in_batch, temperature):
  case = _case()
  got = identity_contrastive_loss(*(jnp.asarray(x) for x in case), temperature=temperature, in_batch=in_batch)
  assert float(got) == pytest.approx(reference_loss(*case, temperature=temperature, in_batch=in_batch), rel=1e-5)


def test_invalid_bank_entries_are_ignored():
  anchors, positives, bank, bank_labels, bank_valid, labels = _case()
  base = identity_contrastive_loss(anchors, positives, bank, bank_labels, bank_valid, labels)
  scrambled = bank.copy()
  scrambled[~bank_valid] = 100 * anchors[0]  # would be a strong positive for anchor 0 if it counted
  assert float(identity_contrastive_loss(anchors, positives, scrambled, bank_labels, bank_valid, labels)) == float(base)
  valid = np.ones_like(bank_valid)
  assert (
    abs(float(identity_contrastive_loss(anchors, positives, scrambled, bank_labels, valid, labels)) - float(base))
    > 1e-3
  )


def test_lower_temperature_sharpens_separated_identities():
  # Positives aligned with their anchors, negatives orthogonal: a smaller tau gives a smaller loss.
  anchors = jnp.eye(4)[:2]
  bank = jnp.eye(4)[2:]
  args = (anchors, anchors, bank, jnp.array([5, 6]), jnp.array([True, True]), jnp.array([0, 1]))
  losses = [float(identity_contrastive_loss(*args, temperature=t)) for t in (1.0, 0.5, 0.1)]
  assert losses[0] > losses[1] > losses[2] > 0
  # Negatives at sim 0: the other sample's two views and the 2 bank entries; the positive at sim 1.
  assert losses[0] == pytest.approx(math.log(1 + 4 * math.exp(-1)), rel=1e-5)


def test_gradient_is_finite_and_flows_to_both_views():
  anchors, positives, bank, bank_labels, bank_valid, labels = _case()
  grad = jax.jit(jax.grad(identity_contrastive_loss, argnums=(0, 1)))(
    anchors, positives, bank, bank_labels, bank_valid, labels
  )
  for g in grad:
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 1e-4
  # No negatives at all (one sample, empty bank): the loss is 0 and its gradient finite.
  one = (anchors[:1], positives[:1], bank, bank_labels, np.zeros(6, bool), labels[:1])
  loss, g = jax.value_and_grad(identity_contrastive_loss)(*one)
  assert float(loss) == 0.0 and np.isfinite(np.asarray(g)).all()


def test_shape_errors():
  anchors, positives, bank, bank_labels, bank_valid, labels = _case()
  with pytest.raises(ValueError, match="positive_ids"):
    identity_contrastive_loss(anchors, positives[:2], bank, bank_labels, bank_valid, labels)
  with pytest.raises(ValueError, match="bank_tokens"):
    identity_contrastive_loss(anchors, positives, bank[:, :3], bank_labels, bank_valid, labels)


def test_diffusion_loss_mean_and_weights():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
  per_sample = ((pred - target) ** 2).reshape(2, -1).mean(1)
  assert float(diffusion_loss(pred, target)) == pytest.approx(per_sample.mean(), rel=1e-6)
  w = np.array([0.5, 2.0])
  assert float(diffusion_loss(pred, target, jnp.asarray(w))) == pytest.approx((per_sample * w).mean(), rel=1e-6)


# --- photometric augmentations -------------------------------------------------------------

NONE = dict(
  p_color_jitter=0.0, p_grayscale=0.0, p_filter=0.0, p_lighting=0.0, p_vignette=0.0, p_gamma_contrast=0.0, p_noise=0.0
)


def _images(b=6, size=32, seed=0):
  v, u = np.mgrid[0:size, 0:size] / size
  base = np.stack([u, v, 0.5 + 0.4 * np.sin(9 * u) * np.cos(7 * v)], -1)
  shift = np.random.default_rng(seed).uniform(-0.1, 0.1, size=(b, 1, 1, 3))
  return jnp.asarray(np.clip(base[None] + shift, 0, 1), jnp.float32)


def test_augment_deterministic_given_rng_and_jittable():
  x = _images()
  a = photometric_augment(jax.random.key(1), x)
  np.testing.assert_array_equal(a, photometric_augment(jax.random.key(1), x))
  np.testing.assert_allclose(jax.jit(photometric_augment)(jax.random.key(1), x), a, atol=1e-5)
  b = photometric_augment(jax.random.key(2), x)
  assert float(jnp.abs(a - b).max()) > 0.05
  # Per-sample choices: the samples are not all changed alike.
  change = jnp.abs(a - x).mean(axis=(1, 2, 3))
  assert float(change.max() - change.min()) > 0.01


@pytest.mark.parametrize("value_range,dtype", [((0.0, 1.0), jnp.float32), ((-1.0, 1.0), jnp.bfloat16)])
def test_augment_keeps_range_shape_dtype(value_range, dtype):
  lo, hi = value_range
  x = (_images() * (hi - lo) + lo).astype(dtype)
  cfg = PhotometricConfig(value_range=value_range, p_noise=1.0, noise_std=0.5, p_lighting=1.0)
  y = photometric_augment(jax.random.key(0), x, cfg)
  assert y.shape == x.shape and y.dtype == dtype
  assert float(y.min()) >= lo and float(y.max()) <= hi
  assert float(y.min()) < lo + 0.05  # strong noise reaches the bounds: they are clipped, not rescaled


def test_augment_with_nothing_enabled_is_identity():
  x = _images()
  np.testing.assert_array_equal(photometric_augment(jax.random.key(0), x, PhotometricConfig(**NONE)), x)


def _only(name, **kw):
  return PhotometricConfig(**{**NONE, name: 1.0, **kw})


def test_each_operation_does_what_it_says():
  x = _images()
  key = jax.random.key(3)
  gray = photometric_augment(key, x, _only("p_grayscale"))
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  tv = lambda y: float(jnp.abs(jnp.diff(y, axis=1)).mean() + jnp.abs(jnp.diff(y, axis=2)).mean())
  blurred = photometric_augment(key, x, _only("p_filter", blur_sigma=(1.5, 2.0)))  # some samples blur, others sharpen
  assert tv(blurred) != pytest.approx(tv(x), rel=1e-3)
  vig = photometric_augment(key, x, _only("p_vignette", vignette_strength=0.5))
  ratio = vig / jnp.maximum(x, 1e-3)
  assert float(ratio[:, 0, 0].mean()) < float(ratio[:, 16, 16].mean()) - 0.1  # corners darker than the centre
  lit = photometric_augment(key, x, _only("p_lighting", lighting_strength=0.4))
  assert float(jnp.abs(lit - x).max()) > 0.05
  noisy = photometric_augment(key, x, _only("p_noise", noise_std=0.1))
  assert float(jnp.std(noisy - x)) > 0.01
  gamma = photometric_augment(key, x, _only("p_gamma_contrast"))
  for i in range(x.shape[0]):  # a monotone curve per sample
    order = np.argsort(np.asarray(x[i]).ravel())
    assert (np.diff(np.asarray(gamma[i]).ravel()[order]) >= -1e-6).all()
  assert float(jnp.abs(gamma - x).max()) > 0.01
  jitter = photometric_augment(key, x, _only("p_color_jitter"))
  assert float(jnp.abs(jitter - x).mean()) > 0.01
