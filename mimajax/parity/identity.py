"""CurricularFace IR-101 (mimajax.metrics.ir101) against a PyTorch IR net with the release's module names.

The PyTorch twin below is a transcription of the architecture (CurricularFace's backbone/model_irse.py, as the
MIMAFace release ships it) built from torch.nn.Sequential so its state-dict keys are exactly the checkpoint's
(`input_layer.0.weight`, `body.N.res_layer.{0..4}.*`, `body.N.shortcut_layer.{0,1}.*`, `output_layer.{0,3,4}.*`).
It is saved with torch.save and read back through our importer, so the real file path is exercised.
torch is imported only inside these functions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from mimajax.metrics import ir101
from mimajax.parity.common import nchw, rel_err

SIZES = {"tiny": (1, 1, 1, 1), "sd15": ir101.IR101_UNITS, "full": ir101.IR101_UNITS}


def torch_ir(units: Sequence[int]):
  """A PyTorch IR backbone (eval mode) whose forward returns (embedding, body output flattened NCHW)."""
  import torch
  from torch import nn

  class Unit(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int):
      super().__init__()
      if cin == depth:
        self.shortcut_layer = nn.MaxPool2d(1, stride)
      else:
        self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
      self.res_layer = nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
        nn.PReLU(depth),
        nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
        nn.BatchNorm2d(depth),
      )

    def forward(self, x):
      return self.res_layer(x) + self.shortcut_layer(x)

  class Backbone(nn.Module):
    def __init__(self):
      super().__init__()
      self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
      units_, cin = [], 64
      for n, depth in zip(units, ir101.DEPTHS):
        for i in range(n):
          units_.append(Unit(cin, depth, 2 if i == 0 else 1))
          cin = depth
      self.body = nn.Sequential(*units_)
      self.output_layer = nn.Sequential(
        nn.BatchNorm2d(512),
        nn.Dropout(0.4),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 512),
        nn.BatchNorm1d(512, affine=False),
      )

    def forward(self, x):
      h = self.body(self.input_layer(x))
      return self.output_layer(h), torch.flatten(h, 1)

  return Backbone().eval()


def randomise_(model, seed: int = 0):
  """Non-trivial weights: every BatchNorm gets random running statistics and affine parameters, every PReLU a
  random slope, so a mistake in any of them (or in eps) shows up in the outputs."""
  import torch
  from torch import nn

  gen = torch.Generator().manual_seed(seed)
  rand = lambda shape: torch.rand(shape, generator=gen)  # noqa: E731
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(0.5 + rand(m.running_var.shape))
        m.num_batches_tracked.fill_(1000)
        if m.affine:
          m.weight.copy_(0.5 + rand(m.weight.shape))
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, nn.PReLU):
        m.weight.copy_(rand(m.weight.shape) * 0.5)
      elif isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return model


def reference_ir(units, pretrained: str | None, tmp: Path, seed: int):
  """(the PyTorch IR net, the .pth our importer reads): the user's weights loaded into it strictly, or random
  weights (non-trivial BatchNorm statistics) saved into `tmp` in the release's file layout."""
  import torch

  reference = torch_ir(units)
  if pretrained:
    state = torch.load(str(pretrained), map_location="cpu", weights_only=True)
    reference.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return reference, Path(pretrained)
  path = tmp / ir101.WEIGHTS_FILE
  torch.save(randomise_(reference, seed).state_dict(), path)
  return reference, path


def ir101_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  batch: int = 2,
  log: Callable[[str], None] = print,
  **kw,
) -> float:
  """The PyTorch IR net vs mimajax's, through a saved .pth: max relative L2 error of embedding and deep_features.

  size "tiny": one unit per stage (same names, fast); "sd15"/"full": IR-101 ([3, 13, 30, 3]). With
  `pretrained` (a CurricularFace_Backbone.pth), the real weights are loaded into both (always IR-101).
  """
  import torch

  units = ir101.IR101_UNITS if pretrained else SIZES[size]
  with tempfile.TemporaryDirectory() as tmp:
    reference, path = reference_ir(units, pretrained, Path(tmp), seed)
    t0 = time.perf_counter()
    ours = ir101.load_ir101(path, units)
    log(f"ir101 parity: units {list(units)}, {'weights ' + str(path) if pretrained else 'random weights'}; "
        f"imported in {time.perf_counter() - t0:.1f}s")  # fmt: skip

  x = np.random.default_rng(seed).uniform(-1, 1, (batch, ir101.INPUT_SIZE, ir101.INPUT_SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    t0 = time.perf_counter()
    ref_emb, ref_deep = (t.numpy() for t in reference(torch.from_numpy(nchw(x))))
    t_torch = time.perf_counter() - t0
  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
  t0 = time.perf_counter()
  emb, deep = (np.asarray(a) for a in forward(state, x))
  t_jax = time.perf_counter() - t0
  errs = {"embedding": rel_err(emb, ref_emb), "deep_features": rel_err(deep, ref_deep)}
  for name, err in errs.items():
    log(f"  {name:14s} rel_err={err:.3e}")
  log(f"  torch forward {t_torch:.1f}s, jax compile+forward {t_jax:.1f}s (batch {batch})")
  return max(errs.values())
