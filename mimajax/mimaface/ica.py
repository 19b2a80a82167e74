"""Inter-clip Affinity (ICA, MIMAFace eq. 3-4) and the widened U-Net input that carries it.

The U-Net input is `[noisy latent 4 | render latent 4 | conditioning latents 4 | mask 1]` (13
channels, the official release's layout). The paper's W_cond, a conv on the conditioning latents
and mask added to the U-Net's input features, is exactly the extra input channels of `conv_in`:
conv is linear in its input channels, so conv_in([x; c]) = conv_in_x(x) + W_cond(c). Starting
from SD1.5, the new channels are zero-initialised and the model is unchanged at step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.models.unet2d import UNet2DConditionModel

LATENT_CHANNELS = 4
INPUT_CHANNELS = 3 * LATENT_CHANNELS + 1  # noisy | render | conditioning latents | mask


def unet_input(noisy: jax.Array, render: jax.Array, cond_latents: jax.Array, mask: jax.Array) -> jax.Array:
  """Concatenates the four inputs on the channel axis: (..., 4), (..., 4), (..., 4), (..., 1) -> (..., 13)."""
  for name, x, c in (("noisy", noisy, 4), ("render", render, 4), ("cond_latents", cond_latents, 4), ("mask", mask, 1)):
    if x.shape[-1] != c or x.shape[:-1] != noisy.shape[:-1]:
      raise ValueError(f"unet_input: {name} has shape {x.shape}; expected {noisy.shape[:-1] + (c,)}")
  return jnp.concatenate([noisy, render, cond_latents, mask.astype(noisy.dtype)], axis=-1)


ICA_SCHEDULES = ("paper", "release")
RELEASE_MAX_FRAMES = 4  # train_video.py: prev_frame_num = random.randint(1, 4)


def ica_training_condition(
  rng: jax.Array, latents: jax.Array, *, sigma: float = 0.1, max_frames: int | None = None, schedule: str = "paper"
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Paper eq. 3-4: for clips (B, F, h, w, 4), k ~ U{0..F/4} leading frames carry s_gt + N(0, sigma^2).

  Returns (conditioning latents, mask (B, F, h, w, 1), k (B,)). The noise bridges the gap between
  clean ground-truth latents in training and generated ones at inference. schedule="release": one k for the whole
  batch, 0 with probability 1/2, else U{1..4} (capped at F - 1), as train_video.py draws it.
  """
  if schedule not in ICA_SCHEDULES:
    raise ValueError(f"ICA schedule {schedule!r}; expected one of {ICA_SCHEDULES}")
  if latents.ndim != 5:
    raise ValueError(f"ICA expects clip latents (B, F, h, w, C); got shape {latents.shape}")
  b, f = latents.shape[:2]
  max_k = f // 4 if max_frames is None else max_frames
  k_rng, noise_rng = jax.random.split(rng)
  if schedule == "release":
    half, pick = jax.random.split(k_rng)
    some = jax.random.randint(pick, (), 1, min(RELEASE_MAX_FRAMES, f - 1) + 1)
    k = jnp.broadcast_to(jnp.where(jax.random.bernoulli(half, 0.5), some, 0), (b,))
  else:
    k = jax.random.randint(k_rng, (b,), 0, max_k + 1)
  keep = (jnp.arange(f)[None, :] < k[:, None]).astype(latents.dtype)[:, :, None, None, None]
  noisy_gt = latents + sigma * jax.random.normal(noise_rng, latents.shape, latents.dtype)
  return noisy_gt * keep, jnp.broadcast_to(keep, latents.shape[:-1] + (1,)), k


def clean_condition(rng: jax.Array, latents: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
  """Stage 1 (images (B, h, w, 4)) as the release trains it: with probability p, for the whole batch, the ICA
  channels carry the clean target latents with mask 1 (train_image.py's 1%); otherwise zeros."""
  on = jax.random.bernoulli(rng, p).astype(latents.dtype)
  return latents * on, jnp.broadcast_to(on, latents.shape[:-1] + (1,))


def ica_inference_condition(
  previous: jax.Array | None, shape: tuple[int, ...], k: int = 3
) -> tuple[jax.Array, jax.Array]:
  """Conditioning for a clip of `shape` (B, F, h, w, 4): the last k latents of the previous clip, or none."""
  b, f, h, w, c = shape
  if previous is None or k == 0:
    return jnp.zeros(shape), jnp.zeros((b, f, h, w, 1))
  if not 0 < k < f:
    raise ValueError(f"ICA: k={k} conditioning frames must be in [1, {f - 1}] for clips of {f} frames")
  if previous.shape[0] != b or previous.shape[2:] != (h, w, c) or previous.shape[1] < k:
    raise ValueError(f"ICA: previous clip latents {previous.shape} do not fit clips of shape {shape} with k={k}")
  cond = jnp.concatenate([previous[:, -k:], jnp.zeros((b, f - k, h, w, c), previous.dtype)], axis=1)
  mask = jnp.concatenate([jnp.ones((b, k, h, w, 1)), jnp.zeros((b, f - k, h, w, 1))], axis=1)
  return cond, mask


def widen_conv_in(kernel: np.ndarray | jax.Array, in_channels: int = INPUT_CHANNELS) -> jax.Array:
  """An HWIO conv_in kernel with its input channels extended by zeros (SD1.5's 4 -> 13)."""
  kh, kw, cin, cout = kernel.shape
  if in_channels < cin:
    raise ValueError(f"widen_conv_in: cannot narrow conv_in from {cin} to {in_channels} input channels")
  return jnp.concatenate([jnp.asarray(kernel), jnp.zeros((kh, kw, in_channels - cin, cout), kernel.dtype)], axis=2)


def widen_unet_input(unet: UNet2DConditionModel, in_channels: int = INPUT_CHANNELS) -> UNet2DConditionModel:
  """A copy of `unet` taking `in_channels` inputs, the new conv_in channels zero (output unchanged)."""
  cfg = unet.config.replace(in_channels=in_channels)
  graphdef, state = nnx.split(unet)
  new = nnx.eval_shape(
    lambda: UNet2DConditionModel(cfg, dtype=unet.dtype, attention_impl=unet.attention_impl, rngs=nnx.Rngs(0))
  )
  new_graphdef, new_state = nnx.split(new)
  flat = dict(nnx.to_flat_state(state))
  leaves = []
  for path, var in nnx.to_flat_state(new_state):
    value = flat[path][...]
    if path == ("conv_in", "kernel"):
      value = widen_conv_in(value, in_channels)
    leaves.append((path, var.replace(value)))
  return nnx.merge(new_graphdef, nnx.from_flat_state(leaves))


# The release's infer_video.py: each clip starts from the previous clip's last 3 latents (prev_frame_num).
RELEASE_OVERLAP = 3


def inference_overlap(num_frames: int, *, release: bool = False) -> int:
  """k at inference: how many of the previous clip's last latents each clip after the first conditions on.

  The one rule `animate`, `export` and the sampler defaults share. Paper checkpoints: F // 4, the largest
  k their training drew (eq. 3), at least 1; the release's folders: its prev_frame_num (3). Images: 0.
  """
  if num_frames <= 1:
    return 0
  if release:
    return min(RELEASE_OVERLAP, num_frames - 1)
  return max(1, num_frames // 4)
