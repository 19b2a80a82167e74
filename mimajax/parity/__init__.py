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
  image_metrics     ssim (PSNR and SSIM vs scikit-image) and lpips (vs the `lpips` package, same weights)
  fid               inception (the FID Inception-v3 vs its TorchScript file) and fid (vs pytorch-fid's distance)
  identity          ir101 (CurricularFace IR-101 vs a PyTorch IR-101 with the release's names)
  d3dfr             Deep3DFaceRecon's ReconNet (ResNet-50 + final layers, the release's gaze layer) vs PyTorch
  face_features     face_features (the release MIA's 25088-d input: alignment, warp, crop, IR-101; uses identity's twin)
  mmfa              mmfa_init (MMFA's face-vid2vid modules filled from a saved face-vid2vid checkpoint vs its PyTorch
                    transcription, mimajax/mmfa/pytorch/face_vid2vid.py; eval and train mode)

The metric checks compare against their own bound (TOLERANCES), not the models' PARITY_TOLERANCE.

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


def _lazy(module: str, name: str):
  """A check whose module (and its reference packages) is imported only when the check runs."""

  def check(**kw) -> float:
    import importlib

    return getattr(importlib.import_module(f"mimajax.parity.{module}"), name)(**kw)

  check.__name__ = name
  return check


ssim_parity = _lazy("image_metrics", "ssim_parity")
lpips_parity = _lazy("image_metrics", "lpips_parity")
inception_parity = _lazy("fid", "inception_parity")
fid_parity = _lazy("fid", "fid_parity")
ir101_parity = _lazy("identity", "ir101_parity")
d3dfr_parity = _lazy("d3dfr", "d3dfr_parity")
face_features_parity = _lazy("face_features", "face_features_parity")
mmfa_init_parity = _lazy("mmfa", "mmfa_init_parity")

COMPONENTS = {
  "unet": unet_parity,
  "vae": vae_parity,
  "scheduler": scheduler_parity,
  "clip": clip_parity,
  "motion": motion_parity,
  "mimaface": mimaface_parity,
  "ssim": ssim_parity,
  "lpips": lpips_parity,
  "inception": inception_parity,
  "fid": fid_parity,
  "ir101": ir101_parity,
  "face_features": face_features_parity,
  "d3dfr": d3dfr_parity,
  "mmfa_init": mmfa_init_parity,
}
# Bounds on rel_err per component (the metrics' references are exact algorithms, so most are tighter).
TOLERANCES = {"ssim": 1e-5, "lpips": 1e-4, "inception": 1e-4, "fid": 1e-6, "ir101": 1e-4, "face_features": 1e-4}
TOLERANCES["d3dfr"] = 1e-4
TOLERANCES["mmfa_init"] = 1e-4

__all__ = [
  "COMPONENTS",
  "PARITY_TOLERANCE",
  "TOLERANCES",
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
