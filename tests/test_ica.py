"""ICA conditioning (paper eq. 3-4) and the zero-initialised 13-channel U-Net input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from mimajax.mimaface import ica
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig

CFG = UNetConfig(
  block_out_channels=(16, 32),
  cross_attention_dim=16,
  norm_num_groups=8,
  attention_head_dim=2,
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def test_zero_initialised_new_channels_leave_the_output_unchanged():
  """Widening SD's 4-channel conv_in to 13 with zeros: same output whatever the new inputs hold."""
  sd = UNet2DConditionModel(CFG, rngs=nnx.Rngs(0))
  wide = ica.widen_unet_input(sd)
  assert wide.config.in_channels == 13 and wide.conv_in.kernel.shape == (3, 3, 13, 16)
  k = jax.random.split(jax.random.key(0), 4)
  noisy = jax.random.normal(k[0], (2, 8, 8, 4))
  render = jax.random.normal(k[1], (2, 8, 8, 4))
  cond = jax.random.normal(k[2], (2, 8, 8, 4))
  mask = jnp.ones((2, 8, 8, 1))
  ctx = jax.random.normal(k[3], (2, 3, 16))
  t = jnp.array([5, 900])
  want = jax.jit(lambda m, *a: m(*a))(sd, noisy, t, ctx)
  got = jax.jit(lambda m, *a: m(*a))(wide, ica.unet_input(noisy, render, cond, mask), t, ctx)
  # equal up to fp32 summation order (the conv's reduction over 13 vs 4 channels is blocked differently)
  assert rel_err(got, want) < 1e-6
  # and the widened weights are trainable: the new channels get gradients
  graphdef, params = nnx.split(wide, nnx.Param)
  x = ica.unet_input(noisy, render, cond, mask)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, ctx) ** 2)))(params)
  assert float(jnp.abs(grads["conv_in"]["kernel"][...][:, :, 4:]).sum()) > 0


def test_ica_training_condition_follows_eq_3_4():
  latents = jax.random.normal(jax.random.key(1), (64, 12, 4, 4, 4))
  cond, mask, k = ica.ica_training_condition(jax.random.key(2), latents, sigma=0.1)
  k = np.asarray(k)
  assert k.min() == 0 and k.max() == 3  # U{0..F/4} with F = 12, all values seen over 64 samples
  for b in range(64):
    np.testing.assert_array_equal(np.asarray(mask[b, :, 0, 0, 0]), (np.arange(12) < k[b]).astype(np.float32))
    assert float(jnp.abs(cond[b, k[b] :]).max()) == 0.0
    if k[b]:
      residual = np.asarray(cond[b, : k[b]] - latents[b, : k[b]])
      assert 0.07 < residual.std() < 0.13  # N(0, 0.1^2) noise on the ground truth
  again = ica.ica_training_condition(jax.random.key(2), latents, sigma=0.1)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(cond))


def test_ica_inference_condition_uses_the_last_k_latents():
  prev = jax.random.normal(jax.random.key(3), (1, 12, 4, 4, 4))
  cond, mask = ica.ica_inference_condition(prev, (1, 12, 4, 4, 4), k=3)
  np.testing.assert_array_equal(np.asarray(cond[:, :3]), np.asarray(prev[:, -3:]))
  assert float(jnp.abs(cond[:, 3:]).max()) == 0 and float(mask[:, :3].min()) == 1 and float(mask[:, 3:].max()) == 0
  first, first_mask = ica.ica_inference_condition(None, (1, 12, 4, 4, 4), k=3)
  assert float(jnp.abs(first).max()) == 0 and float(first_mask.max()) == 0


def test_ica_bad_inputs():
  with pytest.raises(ValueError, match=r"clip latents \(B, F, h, w, C\)"):
    ica.ica_training_condition(jax.random.key(0), jnp.zeros((2, 4, 4, 4)))
  with pytest.raises(ValueError, match="k=12 conditioning frames"):
    ica.ica_inference_condition(jnp.zeros((1, 12, 4, 4, 4)), (1, 12, 4, 4, 4), k=12)
  with pytest.raises(ValueError, match="previous clip latents"):
    ica.ica_inference_condition(jnp.zeros((1, 12, 8, 8, 4)), (1, 12, 4, 4, 4), k=3)
  with pytest.raises(ValueError, match="render has shape"):
    ica.unet_input(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match="cannot narrow"):
    ica.widen_conv_in(jnp.zeros((3, 3, 13, 8)), 4)
