"""Deep3DFaceRecon's coefficient network (mimajax.face3d.d3dfr) against a PyTorch ReconNet with the release's names.

torchvision is not importable beside torch 2.13 here, so the backbone is transcribed with torchvision's exact
module names (conv1, bn1, layer1.0.conv1 ... layerN.0.downsample.0/1, the stride on conv2), wrapped as
Deep3DFaceRecon's ReconNetWrapper (`backbone`, `final_layers`) or the MIMAFace release's ResNet50_nofc (the same plus
a 4-wide gaze layer, under `fianl_layers`). It is saved with torch.save in the checkpoint's own layout
(Deep3DFaceRecon: {'net_recon': state}; the release: the state dict with DataParallel's `module.` prefix) and read
back through our importer. torch is imported only inside these functions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from mimajax.face3d import d3dfr
from mimajax.parity.common import nchw, rel_err

SIZES = {"tiny": (1, 1, 1, 1), "sd15": d3dfr.RESNET50_BLOCKS, "full": d3dfr.RESNET50_BLOCKS}


def torch_recon(variant: str = "release", blocks: Sequence[int] = d3dfr.RESNET50_BLOCKS):
  """A PyTorch ReconNet (eval mode) whose state-dict keys are the variant's checkpoint keys."""
  import torch
  from torch import nn

  class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
      super().__init__()
      cout = width * d3dfr.EXPANSION
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return self.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for stage, (n, width) in enumerate(zip(blocks, d3dfr.WIDTHS)):
        layer = []
        for i in range(n):
          layer.append(Bottleneck(cin, width, 2 if (i == 0 and stage > 0) else 1))
          cin = width * d3dfr.EXPANSION
        setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      return self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

  spec = d3dfr.VARIANTS[variant]

  class Recon(nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = ResNet()
      head = nn.ModuleList([nn.Conv2d(d3dfr.FEATURES, n, 1, bias=True) for _, n in spec.groups])
      setattr(self, spec.head, head)

    def forward(self, x):
      feats = self.backbone(x)
      return torch.flatten(torch.cat([layer(feats) for layer in getattr(self, spec.head)], dim=1), 1)

  return Recon().eval()


def randomise_(model, seed: int = 0):
  """Non-trivial weights: random BatchNorm running statistics and affine parameters (so a wrong eps or a missing
  statistic shows), fan-in scaled convs (activations stay O(1) through 16 blocks), random head biases."""
  import torch
  from torch import nn

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        m.num_batches_tracked.fill_(1000)
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return model


def save_checkpoint(model, path: str | Path, variant: str) -> Path:
  """torch.save in the variant's file layout: Deep3DFaceRecon's {'net_recon': ...} (epoch_20.pth), or the release's
  DataParallel state dict with `module.` prefixes (netG_epoch_25.pth)."""
  import torch

  state = model.state_dict()
  if variant == "release":
    torch.save({f"module.{k}": v for k, v in state.items()}, str(path))
  else:
    torch.save({"net_recon": state, "epoch": 20}, str(path))
  return Path(path)


def d3dfr_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  batch: int = 2,
  variant: str | None = None,
  log: Callable[[str], None] = print,
  **kw,
) -> float:
  """The PyTorch ReconNet vs mimajax's through a saved checkpoint: relative L2 error of the coefficients.

  size "tiny": one Bottleneck per stage (same names); "sd15"/"full": ResNet-50. Without `variant`, the release's
  (261 outputs, 256 px) and Deep3DFaceRecon's (257, 224 px) are both checked and the larger error returned. With
  `pretrained` (epoch_20.pth or netG_epoch_25.pth), its weights go into both (always ResNet-50).
  """
  import torch

  if pretrained:
    state = d3dfr.read_torch_state(pretrained)
    variants = [variant or d3dfr.detect_variant(state)]
  else:
    variants = [variant] if variant else ["release", "deep3dfacerecon"]
  blocks = d3dfr.RESNET50_BLOCKS if pretrained else SIZES[size]
  errs = {}
  for v in variants:
    reference = torch_recon(v, blocks)
    with tempfile.TemporaryDirectory() as tmp:
      if pretrained:
        reference.load_state_dict({k: torch.from_numpy(a) for k, a in state.items()}, strict=False)
        missing = [k for k in reference.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
          raise ValueError(f"{pretrained}: {len(missing)} keys of the {v} ReconNet missing, e.g. {missing[:3]}")
        path = Path(pretrained)
      else:
        path = save_checkpoint(randomise_(reference, seed), Path(tmp) / f"{v}.pth", v)
      t0 = time.perf_counter()
      ours = d3dfr.load_d3dfr(path, v, blocks)
      t_import = time.perf_counter() - t0
    side = d3dfr.VARIANTS[v].size
    x = np.random.default_rng(seed).uniform(0, 1, (batch, side, side, 3)).astype(np.float32)
    if d3dfr.VARIANTS[v].signed_input:
      x = x * 2 - 1
    with torch.no_grad():
      t0 = time.perf_counter()
      ref = reference(torch.from_numpy(nchw(x))).numpy()
      t_torch = time.perf_counter() - t0
    graphdef, params = nnx.split(ours)
    forward = jax.jit(lambda s, a: nnx.merge(graphdef, s)(a))
    t0 = time.perf_counter()
    out = np.asarray(forward(params, x))
    t_jax = time.perf_counter() - t0
    errs[v] = rel_err(out, ref)
    log(f"d3dfr parity ({v}, blocks {list(blocks)}, {side} px, {ref.shape[1]} outputs, "
        f"{'weights ' + str(path) if pretrained else 'random weights'}): rel_err={errs[v]:.3e}; import "
        f"{t_import:.1f}s, torch {t_torch:.1f}s, jax compile+forward {t_jax:.1f}s (batch {batch})")  # fmt: skip
  return max(errs.values())
