"""Training losses: the identity contrastive loss (MIMAFace eq. 2) and the (min-SNR weighted) denoising loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def identity_contrastive_loss(
  anchor_ids: jax.Array,
  positive_ids: jax.Array,
  bank_tokens: jax.Array,
  bank_labels: jax.Array,
  bank_valid: jax.Array,
  labels: jax.Array,
  temperature: float = 1.0,
  *,
  in_batch: bool = True,
) -> jax.Array:
  """Paper eq. 2, InfoNCE on cosine similarities of ID tokens, averaged over positive pairs and anchors.

  For anchor z_i = anchor_ids[i] (the class token e_id of source image i) and each of its positives z_i^+:

    L_id(i, +) = -log( exp(sim(z_i, z_i^+) / tau) / ( exp(sim(z_i, z_i^+) / tau) + sum_j exp(sim(z_i, z_j^-) / tau) ) )

  with sim the cosine similarity and tau = `temperature` (the paper's formula has none: tau = 1).
  Each term has one positive in its denominator, exactly as eq. 2; the loss is the mean of
  L_id(i, +) over the positives of anchor i, then the mean over anchors.

  Positives of anchor i: positive_ids[i] (its photometrically augmented view) and the valid bank
  entries with label labels[i]. Negatives z_j^-: the valid bank entries with another label.
  With `in_batch` (default), the other samples j != i of the batch also take part, both their
  anchor and augmented tokens: positives if labels[j] == labels[i] (the same person in another
  image), negatives otherwise. They give negatives while the bank is still empty and make the
  batch's identities repel each other with a gradient on both sides; anchor i itself is excluded.

  Shapes: anchor_ids, positive_ids (B, D); bank_tokens (M, D); bank_labels, bank_valid (M,);
  labels (B,). The bank is read without gradient; compute the loss before enqueuing this batch.
  """
  b, d = anchor_ids.shape
  if positive_ids.shape != (b, d) or labels.shape != (b,):
    raise ValueError(
      f"identity loss: anchor_ids {anchor_ids.shape}, positive_ids {positive_ids.shape} and labels "
      f"{labels.shape} must be (B, D), (B, D), (B,)"
    )
  m = bank_tokens.shape[0]
  if bank_tokens.shape != (m, d) or bank_labels.shape != (m,) or bank_valid.shape != (m,):
    raise ValueError(
      f"identity loss: bank_tokens {bank_tokens.shape}, bank_labels {bank_labels.shape}, bank_valid "
      f"{bank_valid.shape} must be (M, {d}), (M,), (M,)"
    )
  anchors = _normalize(anchor_ids)
  positives = _normalize(positive_ids)
  bank = _normalize(jax.lax.stop_gradient(bank_tokens))

  # Candidates: [own/other augmented views (B) | other anchors (B) | bank (M)].
  candidates = jnp.concatenate([positives, anchors, bank], axis=0)
  cand_labels = jnp.concatenate([labels, labels, bank_labels]).astype(jnp.int32)
  eye = jnp.eye(b, dtype=bool)
  batch_valid = jnp.full((b, b), in_batch)
  valid = jnp.concatenate(
    [
      batch_valid | eye,  # the own augmented view always counts
      batch_valid & ~eye,  # never the anchor itself
      jnp.broadcast_to(jnp.asarray(bank_valid, bool)[None, :], (b, m)),
    ],
    axis=1,
  )
  same = labels.astype(jnp.int32)[:, None] == cand_labels[None, :]
  is_positive = valid & same
  is_negative = valid & ~same

  logits = anchors @ candidates.T / temperature  # (B, 2B + M)
  neg_lse = jax.nn.logsumexp(jnp.where(is_negative, logits, -jnp.inf), axis=1, keepdims=True)
  # -log(e^s / (e^s + e^N)) = softplus(N - s); no negatives: N = -inf and the term is 0.
  pair_loss = jax.nn.softplus(neg_lse - logits)
  per_anchor = jnp.sum(jnp.where(is_positive, pair_loss, 0.0), axis=1) / jnp.sum(is_positive, axis=1)
  return jnp.mean(per_anchor)


def diffusion_loss(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean over samples of the per-sample MSE, each optionally scaled by `weights` (B,) (e.g. min-SNR)."""
  if pred.shape != target.shape:
    raise ValueError(f"diffusion loss: pred {pred.shape} and target {target.shape} differ")
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per_sample = err.reshape(err.shape[0], -1).mean(axis=1)
  if weights is not None:
    per_sample = per_sample * weights.astype(jnp.float32)
  return per_sample.mean()
