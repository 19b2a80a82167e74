"""CurricularFace's IR-101 face-recognition backbone (inference only, channels-last) and its PyTorch import.

The architecture is the "IR" ResNet of InsightFace / CurricularFace (`backbone/model_irse.py`, also shipped by
the MIMAFace release as `models/ArcFace/curricularface_model.py`), checked against both:

  input_layer   conv3x3(3->64, no bias), BatchNorm2d, PReLU(64)
  body          units [3, 13, 30, 3] at depths 64, 128, 256, 512; the first unit of each stage has stride 2.
                A unit is res_layer = BN(in), conv3x3(in->d), PReLU(d), conv3x3(d->d, stride s), BN(d) plus a
                shortcut: MaxPool2d(1, s) (a strided subsample) when in == d, else conv1x1 stride s + BN(d).
  output_layer  BatchNorm2d(512), Dropout(0.4), Flatten (NCHW order), Linear(512*7*7, 512),
                BatchNorm1d(512, affine=False)

(Both references' IR unit has no BatchNorm between the first conv and the PReLU, unlike face.evoLVe's older
bottleneck_IR, so `res_layer` has five entries 0..4.) Every module keeps the torch Sequential index as its
path (`body/3/res_layer/1/kernel` <-> `body.3.res_layer.1.weight`), so the import is key-for-key.

`deep_features` is the body output (512x7x7) flattened in PyTorch's NCHW order (25088 values), the feature the
MIMAFace release's `CurricularFaceOurCrop.deep_features` returns. Inputs are RGB 112x112 in [-1, 1].
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.models.layers import InferenceBatchNorm, TorchConv

IR101_UNITS = (3, 13, 30, 3)  # IR-101 (CurricularFace's num_layers=100)
DEPTHS = (64, 128, 256, 512)
INPUT_SIZE = 112
EMBED_DIM = 512
BN_EPS = 1e-5  # torch's BatchNorm default, which the checkpoints were trained with
WEIGHTS_FILE = "CurricularFace_Backbone.pth"


Conv = TorchConv  # bias-free, torch padding, XLA's default precision


def BatchNorm(channels: int, *, affine: bool = True) -> InferenceBatchNorm:
  return InferenceBatchNorm(channels, affine=affine, eps=BN_EPS)


class PReLU(nnx.Module):
  """Per-channel PReLU, max(0, x) + a * min(0, x); the slope keeps torch's leaf name `weight`."""

  def __init__(self, channels: int):
    self.weight = nnx.Param(jnp.full((channels,), 0.25, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, x, self.weight[...] * x)


class Subsample(nnx.Module):
  """MaxPool2d(kernel 1, stride s): a 1x1 max is the pixel itself, so it keeps every s-th row and column."""

  def __init__(self, stride: int):
    self.stride = stride

  def __call__(self, x: jax.Array) -> jax.Array:
    return x[:, :: self.stride, :: self.stride]


class Identity(nnx.Module):
  """Stands where torch has a stateless layer (Dropout at eval), so the Sequential indices stay aligned."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class FlattenNCHW(nnx.Module):
  """torch's view(N, -1) of an NCHW map, from our NHWC map: the Linear's input order is the checkpoint's."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _run(layers, x):
  for layer in layers:
    x = layer(x)
  return x


class IRUnit(nnx.Module):
  """One IR residual unit (CurricularFace's bottleneck_IR): res_layer(x) + shortcut_layer(x)."""

  def __init__(self, cin: int, depth: int, stride: int, *, rngs: nnx.Rngs):
    if cin == depth:
      self.shortcut_layer = Subsample(stride)
    else:
      self.shortcut_layer = nnx.List([Conv(cin, depth, 1, stride, rngs=rngs), BatchNorm(depth)])
    self.res_layer = nnx.List(
      [BatchNorm(cin), Conv(cin, depth, 3, rngs=rngs), PReLU(depth), Conv(depth, depth, 3, stride, rngs=rngs),
       BatchNorm(depth)]
    )  # fmt: skip

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = self.shortcut_layer(x) if isinstance(self.shortcut_layer, Subsample) else _run(self.shortcut_layer, x)
    return _run(self.res_layer, x) + shortcut


class IRBackbone(nnx.Module):
  """The IR backbone at 112x112: images (N, 112, 112, 3) in [-1, 1] -> (embedding (N, 512), deep_features).

  `units` per stage: IR101_UNITS for the real network; fewer (same names) for fast parity checks.
  The embedding is the raw BatchNorm1d output (the release does not normalise it); callers normalise.
  """

  def __init__(self, units: Sequence[int] = IR101_UNITS, *, rngs: nnx.Rngs):
    if len(units) != len(DEPTHS) or min(units) < 1:
      raise ValueError(f"units must be four positive counts (one per stage of depth {DEPTHS}), got {units}")
    self.units = tuple(units)
    self.input_layer = nnx.List([Conv(3, 64, 3, rngs=rngs), BatchNorm(64), PReLU(64)])
    body, cin = [], 64
    for n, depth in zip(units, DEPTHS):
      for i in range(n):
        body.append(IRUnit(cin, depth, 2 if i == 0 else 1, rngs=rngs))
        cin = depth
    self.body = nnx.List(body)
    side = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
    self.output_layer = nnx.List(
      [BatchNorm(512), Identity(), FlattenNCHW(), nnx.Linear(512 * side * side, EMBED_DIM, rngs=rngs),
       BatchNorm(EMBED_DIM, affine=False)]
    )  # fmt: skip

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"IR backbone input must be (N, {INPUT_SIZE}, {INPUT_SIZE}, 3), got {x.shape}")
    h = _run(self.body, _run(self.input_layer, x.astype(jnp.float32)))
    deep = self.output_layer[2](h)  # the body output in NCHW flatten order, as the release's deep_features
    return _run(self.output_layer, h), deep


# ----------------------------------------------------------------------------------------------------------
# PyTorch checkpoint import


def _key_map(model: IRBackbone) -> KeyMap:
  return KeyMap(nnx.state(model), what=f"CurricularFace IR backbone (units {list(model.units)})")


def read_torch_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A .pth state dict as numpy arrays (weights_only: no pickled code runs). torch is imported only here.

  A `module.` prefix (DataParallel checkpoints; the release strips it the same way) is removed, and
  BatchNorm's `num_batches_tracked` counters are dropped: they do not affect inference.
  """
  import torch

  raw = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
    raw = raw["state_dict"]
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a state dict (key -> tensor), found {type(raw).__name__}")
  out = {}
  for key, value in raw.items():
    key = key[len("module.") :] if key.startswith("module.") else key
    if key.endswith("num_batches_tracked"):
      continue
    out[key] = value.detach().cpu().float().numpy()
  return out


def ir_from_state_dict(
  state: dict[str, np.ndarray], units: Sequence[int] = IR101_UNITS, *, where: str = ""
) -> IRBackbone:
  """An IRBackbone holding `state` (torch key -> array), strictly: every missing, unexpected or mis-shaped key
  raises CheckpointKeyError listing them all, and nothing is loaded."""
  # An abstract model (shapes only): initialising the real one eagerly costs ~20 s on CPU for nothing.
  model = nnx.eval_shape(lambda: IRBackbone(units, rngs=nnx.Rngs(0)))
  arrays = _key_map(model).to_flax(state, assumed=where)
  return merge_params(model, arrays, where=where or "CurricularFace IR backbone")


def load_ir101(path: str | os.PathLike, units: Sequence[int] = IR101_UNITS) -> IRBackbone:
  """CurricularFace_Backbone.pth (or any IR checkpoint of CurricularFace's names) as an IRBackbone."""
  return ir_from_state_dict(read_torch_state(path), units, where=f"{path} as IR units {list(units)}")


def ir_to_state_dict(model: IRBackbone) -> dict[str, np.ndarray]:
  """The inverse of the import (torch key -> array in torch layout), used by tests."""
  return _key_map(model).to_torch(nnx.state(model))


# ----------------------------------------------------------------------------------------------------------
# Evaluator-facing network


def _resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """torch's F.interpolate(mode='bilinear', align_corners=False) on NHWC: half-pixel centres, no antialias."""
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False)


def preprocess(images: np.ndarray | jax.Array, crop: str = "release") -> jax.Array:
  """uint8 (N, H, W, 3) RGB frames -> (N, 112, 112, 3) in [-1, 1] ((x / 255 - 0.5) / 0.5).

  crop="release": the MIMAFace release's CurricularFaceOurCrop: resize to 256, keep rows 0:224 and columns
  16:240, resize to 112 (its face crops carry more forehead/hair than a 112 ArcFace crop). crop="full": the
  whole frame resized to 112. Bilinear resizes as torch's (no antialias).
  """
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = (x - 0.5) / 0.5
  if crop == "release":
    x = _resize_bilinear(x, 256)[:, :224, 16:240]
  elif crop != "full":
    raise ValueError(f"crop must be 'release' or 'full', got {crop!r}")
  return _resize_bilinear(x, INPUT_SIZE)
