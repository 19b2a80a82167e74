"""Shared fixtures: tiny PyTorch reference models with random weights, saved in the real formats."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub from the tests

import numpy as np
import pytest

import mimajax  # noqa: F401  (sets flax's sharding mode before any module is built)


def perturb_(module, seed=0, scale=0.02):
  """Noise on every parameter so zero/one-initialised tensors (norms, biases) are exercised."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return module


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(x):
  return np.moveaxis(np.asarray(x), -1, 1)


def nhwc(x):
  return np.moveaxis(np.asarray(x), 1, -1)


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
