"""The Flax AutoencoderKL against diffusers' on random weights and images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nchw, nhwc, rel_err
from mimajax.convert.diffusers_format import load_vae
from mimajax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    dict(
      layers_per_block=2,
      block_out_channels=(16, 32, 32),
      latent_channels=8,
      scaling_factor=0.13,
      down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
  ],
  ids=["sd_tiny", "three_blocks", "no_quant_no_attn"],
)
def test_vae_matches_diffusers(torch_vae_factory, overrides):
  import torch

  ref, folder = torch_vae_factory(**overrides)
  ours = load_vae(folder)
  side = 8 * 2 ** (len(ours.config.block_out_channels) - 1)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, side, side)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(images)).latent_dist
    decoded = ref.decode(post.mean).sample.numpy()
  ours_post = ours.encode(jnp.asarray(nhwc(images)))
  assert rel_err(nchw(ours_post.mean), post.mean.numpy()) < 1e-5
  assert rel_err(nchw(ours_post.logvar), post.logvar.numpy()) < 1e-5
  assert rel_err(nchw(ours.decode(jnp.asarray(nhwc(post.mean.numpy())))), decoded) < 1e-5


def test_scaled_latents_round_trip_the_scaling_factor():
  cfg = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, scaling_factor=0.5)
  vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
  z = vae.encode_latents(images)
  np.testing.assert_allclose(z, vae.encode(images).mean * 0.5, rtol=1e-6)
  np.testing.assert_allclose(vae.decode_latents(z), vae.decode(vae.encode(images).mean), rtol=1e-5, atol=1e-6)
  sampled = vae.encode_latents(images, jax.random.key(1))
  assert not np.allclose(sampled, z)


def test_diagonal_gaussian_sample_and_kl():
  moments = jnp.concatenate([jnp.full((2, 3, 3, 4), 0.5), jnp.full((2, 3, 3, 4), np.log(0.25))], axis=-1)
  post = DiagonalGaussian.from_moments(moments)
  np.testing.assert_allclose(post.std, 0.5, rtol=1e-6)
  # KL(N(0.5, 0.25) || N(0, 1)) per dim = 0.5 * (0.25 + 0.25 - 1 - ln 0.25)
  per_dim = 0.5 * (0.25 + 0.25 - 1 - np.log(0.25))
  np.testing.assert_allclose(post.kl(), np.full((2,), per_dim * 36), rtol=1e-5)
  samples = post.sample(jax.random.key(0))
  assert samples.shape == (2, 3, 3, 4)
  huge = DiagonalGaussian.from_moments(jnp.concatenate([jnp.zeros((1, 1, 1, 1)), jnp.full((1, 1, 1, 1), 99.0)], -1))
  assert float(huge.logvar.max()) == 20.0  # clipped as in LDM


def test_vae_rejects_bad_shapes_and_configs():
  vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\) images"):
    vae.encode(jnp.ones((1, 3, 16, 16)))
  with pytest.raises(ValueError, match=r"\(B, h, w, 4\) latents"):
    vae.decode(jnp.ones((1, 4, 8, 8)))
  with pytest.raises(ValueError, match="not supported"):
    VAEConfig.from_diffusers({"down_block_types": ["DownEncoderBlock2DCausal"]})
