"""Numerical parity of mimajax components against their diffusers PyTorch references.

Each check builds the PyTorch module (random weights, or a local pretrained folder), saves it in
the real on-disk format, loads it through mimajax's converter, runs both on the same random
inputs and returns the relative L2 error ||jax - torch|| / ||torch||. torch and diffusers are
imported only inside these functions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

from configs import common
from mimajax.models.unet_config import UNetConfig
from mimajax.models.vae import VAEConfig

PARITY_TOLERANCE = 1e-4  # fp32 relative L2 error


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shape mismatch: ours {ours.shape} vs reference {ref.shape}")
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def nchw(x):
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))


def nhwc(x):
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


def perturb_(module, seed: int = 0, scale: float = 0.02):
  """Adds noise to every parameter of a torch module (in place, returned) so zero/one inits are exercised too."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return module


def _config_for(size: str, component: str):
  cfg = common.model_config(size)
  return UNetConfig(**cfg.unet.to_dict()) if component == "unet" else VAEConfig(**cfg.vae.to_dict())


def _reference(torch_cls, component: str, size: str, pretrained: str | None, seed: int, tmp: str):
  """(torch module in eval mode, the diffusers folder mimajax loads it from)."""
  import torch

  torch.manual_seed(seed)
  if pretrained:
    folder = Path(pretrained) / component if (Path(pretrained) / component).is_dir() else Path(pretrained)
    ref = torch_cls.from_pretrained(str(folder), torch_dtype=torch.float32)
  else:
    ref = torch_cls(**_config_for(size, component).to_diffusers())
    perturb_(ref, seed)
    folder = Path(tmp) / component
    ref.save_pretrained(str(folder))  # the real on-disk format (config.json + safetensors)
  return ref.eval(), folder


def unet_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  batch: int = 2,
  log: Callable[[str], None] = print,
) -> float:
  """UNet2DConditionModel (diffusers) vs mimajax on random latents, timesteps and text context."""
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  from mimajax.convert.diffusers_format import load_unet

  with tempfile.TemporaryDirectory() as tmp:
    ref, folder = _reference(TorchUNet, "unet", size, pretrained, seed, tmp)
    ours = load_unet(folder)
  cfg = ours.config
  rng = np.random.default_rng(seed)
  side = cfg.sample_size if size == "tiny" else 64
  x = rng.standard_normal((batch, cfg.in_channels, side, side), dtype=np.float32)
  t = rng.integers(0, 1000, size=(batch,))
  ctx = rng.standard_normal((batch, 77 if size == "sd15" else 7, cfg.cross_attention_dim), dtype=np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
  got = nchw(ours(jnp.asarray(nhwc(x)), jnp.asarray(t), jnp.asarray(ctx)))
  err = rel_err(got, want)
  log(f"unet[{size}{', pretrained' if pretrained else ''}] noise prediction {tuple(want.shape)}: rel_err={err:.3e}")
  return err


def vae_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  batch: int = 2,
  log: Callable[[str], None] = print,
) -> float:
  """AutoencoderKL (diffusers) vs mimajax: posterior mean and logvar, and decoded images."""
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  from mimajax.convert.diffusers_format import load_vae

  with tempfile.TemporaryDirectory() as tmp:
    ref, folder = _reference(TorchVAE, "vae", size, pretrained, seed, tmp)
    ours = load_vae(folder)
  side = 64 if size == "tiny" else 256
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, ours.config.in_channels, side, side)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(images)).latent_dist
    want = {
      "mean": post.mean.numpy(),
      "logvar": post.logvar.numpy(),
      "decoded": ref.decode(post.mean).sample.numpy(),
    }
  ours_post = ours.encode(jnp.asarray(nhwc(images)))
  got = {
    "mean": nchw(ours_post.mean),
    "logvar": nchw(ours_post.logvar),
    "decoded": nchw(ours.decode(jnp.asarray(nhwc(want["mean"])))),
  }
  errs = {k: rel_err(got[k], want[k]) for k in want}
  for k, e in errs.items():
    log(f"vae[{size}] {k} {tuple(want[k].shape)}: rel_err={e:.3e}")
  return max(errs.values())


def scheduler_parity(size: str = "tiny", seed: int = 0, log: Callable[[str], None] = print) -> float:
  from mimajax.diffusion import schedulers

  err = schedulers.scheduler_parity(size=size, seed=seed)
  log(f"scheduler[{size}] DDPM noising/velocity, DDIM and Euler loops (eps and v): max rel_err={err:.3e}")
  return err


def clip_parity(size: str = "tiny", pretrained: str | None = None, seed: int = 0, log=print) -> float:
  """transformers' CLIPVisionModelWithProjection vs mimajax: every hidden state, e_id, image embeds."""
  from mimajax.convert import clip_format

  return clip_format.clip_parity(size=size, pretrained=pretrained, seed=seed, log=log)


def motion_parity(size: str = "tiny", pretrained: str | None = None, seed: int = 0, log=print) -> float:
  """diffusers' UNetMotionModel (AnimateDiff) vs mimajax's video U-Net on random video latents."""
  if pretrained:
    raise ValueError("--pretrained is not supported for --component motion (random weights only)")
  from mimajax.convert import animatediff_format

  return animatediff_format.motion_parity(size=size, seed=seed, log=log)


def mimaface_parity(size: str = "tiny", pretrained: str | None = None, seed: int = 0, log=print, **kw) -> float:
  """The whole stage-2 MIMAFace (CLIP, MIA, renders, a U-Net step, DDIM + CFG + ICA, decoded frames) vs its export."""
  from mimajax.parity import mimaface as parity_mimaface

  return parity_mimaface.mimaface_parity(size=size, pretrained=pretrained, seed=seed, log=log, **kw)


COMPONENTS = {
  "unet": unet_parity,
  "vae": vae_parity,
  "scheduler": scheduler_parity,
  "clip": clip_parity,
  "motion": motion_parity,
  "mimaface": mimaface_parity,
}
