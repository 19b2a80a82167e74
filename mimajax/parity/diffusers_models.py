"""diffusers' U-Net, VAE and UNetMotionModel (AnimateDiff) against mimajax's, through the real on-disk format.

Each check builds the PyTorch module (random, perturbed weights, or a local pretrained folder), saves it with
save_pretrained, loads it through mimajax's converter, runs both on the same random inputs and returns the
relative L2 error ||jax - torch|| / ||torch||. torch and diffusers are imported only inside these functions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

from configs import common
from mimajax.convert.animatediff_format import load_unet_motion
from mimajax.convert.diffusers_format import load_unet, load_vae
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig, UNetMotionConfig
from mimajax.models.vae import VAEConfig
from mimajax.parity.common import nchw, nhwc, perturb_, rel_err


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


def motion_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  log: Callable[[str], None] = print,
  *,
  motion: MotionConfig | None = None,
  batch: int = 1,
  num_frames: int = 4,
  per_frame_context: bool = False,
  attention_impl: str | None = None,
) -> float:
  """diffusers UNetMotionModel (random, perturbed weights) vs mimajax's video U-Net on random video latents.

  "tiny": the tiny SD U-Net of configs/common.py with motion modules in the mid block too; "sd15": SD1.5's
  U-Net with the AnimateDiff v3 motion adapter config (32x32 latents to keep CPU time reasonable).
  """
  if pretrained:
    raise ValueError("--pretrained is not supported for --component motion (random weights only)")
  import torch
  from diffusers import UNetMotionModel as TorchUNetMotion

  unet_cfg = UNetConfig(**common.model_config(size).unet.to_dict())
  motion = motion or (MotionConfig(use_motion_mid_block=True) if size == "tiny" else MotionConfig())
  config = UNetMotionConfig.from_unet(unet_cfg, motion)
  torch.manual_seed(seed)
  ref = TorchUNetMotion(**config.to_diffusers())
  perturb_(ref, seed)  # also makes the zero-initialised parts non-trivial
  ref.eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    ours = load_unet_motion(tmp, attention_impl=attention_impl)
  rng = np.random.default_rng(seed)
  side = unet_cfg.sample_size if size == "tiny" else 32
  x = rng.standard_normal((batch, num_frames, unet_cfg.in_channels, side, side), dtype=np.float32)
  t = rng.integers(0, 1000, size=(batch,))
  seq = 77 if size == "sd15" else 7
  ctx_shape = (batch, num_frames, seq) if per_frame_context else (batch, seq)
  ctx = rng.standard_normal(ctx_shape + (unet_cfg.cross_attention_dim,), dtype=np.float32)
  # diffusers wants (B, C, F, H, W) latents and one context row per frame (its pipeline repeat_interleaves).
  torch_ctx = ctx.reshape(batch * num_frames, seq, -1) if per_frame_context else np.repeat(ctx, num_frames, axis=0)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 2, 1, 3, 4)), torch.from_numpy(t), torch.from_numpy(torch_ctx)).sample
  want = want.numpy().transpose(0, 2, 1, 3, 4)  # (B, F, C, H, W)
  got = ours(jnp.asarray(x.transpose(0, 1, 3, 4, 2)), jnp.asarray(t), jnp.asarray(ctx))  # channels-last frames
  err = rel_err(np.asarray(got).transpose(0, 1, 4, 2, 3), want)
  log(f"motion unet[{size}] noise prediction {tuple(want.shape)} (B, F, C, H, W): rel_err={err:.3e}")
  return err
