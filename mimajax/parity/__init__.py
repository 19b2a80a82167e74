"""Numerical parity of mimajax against its PyTorch references: `mimajax parity --component NAME`.

Each check builds the PyTorch model (random weights, or a local pretrained folder), saves it in the real
on-disk format, loads it through mimajax's converter, runs both on the same random inputs and returns the
relative L2 error ||jax - torch|| / ||torch||. torch, diffusers and transformers are imported only inside
the check functions.

  common            PARITY_TOLERANCE, rel_err, nchw / nhwc, perturb_ (imports nothing else of this package)
  diffusers_models  unet, vae and motion (diffusers' UNet2DConditionModel, AutoencoderKL, UNetMotionModel)
  scheduler         DDPM noising / velocity, DDIM and Euler loops against diffusers' schedulers
  clip              transformers' CLIP vision model
  mimaface          the whole stage-2 MIMAFace against its PyTorch export (imported when run)

This module holds the COMPONENTS table the command dispatches on; the check modules import only `common`.
"""

from __future__ import annotations

from mimajax.parity.clip import clip_parity
from mimajax.parity.common import PARITY_TOLERANCE, nchw, nhwc, perturb_, rel_err
from mimajax.parity.diffusers_models import motion_parity, unet_parity, vae_parity
from mimajax.parity.scheduler import scheduler_parity


def mimaface_parity(size: str = "tiny", pretrained: str | None = None, seed: int = 0, log=print, **kw) -> float:
  """The whole stage-2 MIMAFace (CLIP, MIA, renders, a U-Net step, DDIM + CFG + ICA, decoded frames) vs its export."""
  from mimajax.parity import mimaface as parity_mimaface  # MIMAFace, its export and PyTorch twin: only when run

  return parity_mimaface.mimaface_parity(size=size, pretrained=pretrained, seed=seed, log=log, **kw)


COMPONENTS = {
  "unet": unet_parity,
  "vae": vae_parity,
  "scheduler": scheduler_parity,
  "clip": clip_parity,
  "motion": motion_parity,
  "mimaface": mimaface_parity,
}

__all__ = [
  "COMPONENTS",
  "PARITY_TOLERANCE",
  "clip_parity",
  "mimaface_parity",
  "motion_parity",
  "nchw",
  "nhwc",
  "perturb_",
  "rel_err",
  "scheduler_parity",
  "unet_parity",
  "vae_parity",
]
