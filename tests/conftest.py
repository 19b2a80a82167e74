"""Shared fixtures: tiny PyTorch reference models with random weights, saved in the real formats."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub from the tests

import pytest

import mimajax  # noqa: F401  (sets flax's sharding mode before any module is built)

# The tests use the same helpers as `mimajax parity`.
from mimajax.parity import nchw, nhwc, perturb_, rel_err  # noqa: E402, F401

TINY_UNET = dict(
  block_out_channels=(32, 64),
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  layers_per_block=2,
  cross_attention_dim=32,
  norm_num_groups=8,
  attention_head_dim=4,
  sample_size=16,
)

TINY_VAE = dict(
  block_out_channels=(32, 64),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  norm_num_groups=8,
  latent_channels=4,
  layers_per_block=1,
)


def _factory(tmp_path, torch_cls, defaults, name):
  def build(seed=0, **overrides):
    import torch

    torch.manual_seed(seed)
    model = perturb_(torch_cls(**{**defaults, **overrides}), seed).eval()
    folder = tmp_path / f"{name}_{seed}_{abs(hash(str(sorted(overrides.items()))))}"
    model.save_pretrained(folder)
    return model, folder

  return build


@pytest.fixture
def torch_unet_factory(tmp_path):
  """build(seed, **overrides) -> (diffusers UNet2DConditionModel with random weights, its saved folder)."""
  from diffusers import UNet2DConditionModel

  return _factory(tmp_path, UNet2DConditionModel, TINY_UNET, "unet")


@pytest.fixture
def torch_vae_factory(tmp_path):
  """build(seed, **overrides) -> (diffusers AutoencoderKL with random weights, its saved folder)."""
  from diffusers import AutoencoderKL

  return _factory(tmp_path, AutoencoderKL, TINY_VAE, "vae")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent compilation cache for one test module: a later run in it (the loop's own process or a resumed
  run) reuses what an earlier test compiled instead of compiling the same step again."""
  import jax

  path = tmp_path_factory.mktemp("jax_cache")
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
