"""What every parity check shares: the tolerance, the relative L2 error, layout moves, torch weight noise.

Imports nothing else of mimajax.parity, so every check module (mimaface's too) can use it without a cycle.
"""

from __future__ import annotations

import numpy as np

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
