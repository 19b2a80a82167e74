"""Deep3DFaceRecon's coefficient network (ReconNetWrapper) in Flax NNX, channels-last, and its PyTorch import.

Two checkpoints share one architecture, a torchvision-layout ResNet-50 whose pooled 2048 features feed a list of
1x1 convs, one per coefficient group, concatenated in order:

  deep3dfacerecon  sicxu/Deep3DFaceRecon_pytorch models/networks.py `ReconNetWrapper` (`epoch_20.pth`: a dict whose
                   'net_recon' holds `backbone.*` and `final_layers.{0..6}.*`): id 80, exp 64, tex 80, angle 3,
                   gamma 27, (tx, ty) 2, tz 1 -> 257. Input RGB 224x224 in [0, 1] (util/preprocess.py align_img).
  release          the MIMAFace release's `ResNet50_nofc([256, 256], 257 + 4)` (models/D3DFR/model_resnet.py, loaded
                   from `netG_epoch_25.pth`, a plain state dict, `module.` prefixes stripped): the same seven layers
                   plus an eighth, 4 outputs commented "pupil" (the gaze columns 257:261), under the misspelt name
                   `fianl_layers`. Input RGB 256x256 in [-1, 1] (D3DFR_ReconModel.py: the frame warped to 256 by the
                   5-point similarity of mimajax.faces.alignment.release_warp).

The backbone is torchvision's ResNet-50 v1.5 (the stride on the 3x3 conv): conv1 7x7/2, bn1, ReLU, maxpool 3/2,
layer1..4 of [3, 4, 6, 3] Bottlenecks (conv1 1x1, conv2 3x3/s, conv3 1x1 with bn1..3; `downsample.0/1` = 1x1 conv +
BN on the first block of each stage), global average pool. BatchNorm is inference-only (running statistics,
eps 1e-5). Module paths are the torch names, so the import is key for key through mimajax.convert.state_dict.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.errors import CheckpointReadError
from mimajax.models.layers import InferenceBatchNorm, TorchConv

RESNET50_BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)  # bottleneck widths per stage; outputs are 4x
EXPANSION = 4
FEATURES = 2048
BN_EPS = 1e-5
GROUPS = (("identity", 80), ("expression", 64), ("texture", 80), ("angle", 3), ("gamma", 27), ("txy", 2), ("tz", 1))
GAZE_GROUP = ("gaze", 4)  # the release's eighth layer ("pupil")


@dataclasses.dataclass(frozen=True)
class Variant:
  """What differs between Deep3DFaceRecon's checkpoint and the release's: head name and width, input size and range."""

  name: str
  head: str  # the torch name of the list of final 1x1 convs
  gaze: bool
  size: int
  signed_input: bool  # inputs in [-1, 1] rather than [0, 1]

  @property
  def groups(self) -> tuple[tuple[str, int], ...]:
    return GROUPS + ((GAZE_GROUP,) if self.gaze else ())

  @property
  def width(self) -> int:
    return sum(n for _, n in self.groups)


VARIANTS = {
  "deep3dfacerecon": Variant("deep3dfacerecon", "final_layers", gaze=False, size=224, signed_input=False),
  "release": Variant("release", "fianl_layers", gaze=True, size=256, signed_input=True),
}


def Conv(cin: int, cout: int, k: int, stride: int = 1, *, rngs: nnx.Rngs) -> TorchConv:
  """Every backbone conv: bias-free, torch padding, full fp32 precision."""
  return TorchConv(cin, cout, k, stride, precision=jax.lax.Precision.HIGHEST, rngs=rngs)


class BatchNorm(InferenceBatchNorm):
  """Inference BatchNorm2d with the scale folded into the inverse deviation before it multiplies (this network's
  order of operations, kept so its figures stay bit for bit what they were)."""

  def __init__(self, channels: int):
    super().__init__(channels, eps=BN_EPS)

  def __call__(self, x: jax.Array) -> jax.Array:
    inv = self.scale[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    return (x - self.running_mean[...]) * inv + self.bias[...]


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride 2, padding 1): the padding is -inf, so border windows see only real pixels."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck (v1.5): relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1 x)))))) + shortcut)."""

  def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
    cout = width * EXPANSION
    self.conv1, self.bn1 = Conv(cin, width, 1, rngs=rngs), BatchNorm(width)
    self.conv2, self.bn2 = Conv(width, width, 3, stride, rngs=rngs), BatchNorm(width)
    self.conv3, self.bn3 = Conv(width, cout, 1, rngs=rngs), BatchNorm(cout)
    # torchvision adds the projection where the shape changes: the first block of every stage
    self.downsample = nnx.List([Conv(cin, cout, 1, stride, rngs=rngs), BatchNorm(cout)]) if (
      stride != 1 or cin != cout
    ) else None  # fmt: skip

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = jax.nn.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    return jax.nn.relu(h + shortcut)


class ResNetBackbone(nnx.Module):
  """torchvision's ResNet without its fc (`use_last_fc=False`): images (N, H, W, 3) -> pooled features (N, 2048)."""

  def __init__(self, blocks: Sequence[int] = RESNET50_BLOCKS, *, rngs: nnx.Rngs):
    if len(blocks) != 4 or min(blocks) < 1:
      raise ValueError(f"blocks must be four positive counts (layer1..layer4), got {tuple(blocks)}")
    self.conv1, self.bn1 = Conv(3, 64, 7, 2, rngs=rngs), BatchNorm(64)
    cin = 64
    for stage, (n, width) in enumerate(zip(blocks, WIDTHS)):
      layer = []
      for i in range(n):
        layer.append(Bottleneck(cin, width, 2 if (i == 0 and stage > 0) else 1, rngs=rngs))
        cin = width * EXPANSION
      setattr(self, f"layer{stage + 1}", nnx.List(layer))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
    return x.mean(axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))


class ReconNet(nnx.Module):
  """Deep3DFaceRecon's ReconNetWrapper: (N, S, S, 3) normalised RGB -> (N, 257), or (N, 261) with the release's gaze.

  The final 1x1 convs act on a 1x1 map, so they are Linears here (kernel (2048, k)); the import reshapes the torch
  (k, 2048, 1, 1) weights. Inputs are already normalised for the variant (`normalise`).
  """

  def __init__(self, variant: str = "deep3dfacerecon", blocks: Sequence[int] = RESNET50_BLOCKS, *, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f"D3DFR variant {variant!r} unknown; expected one of {sorted(VARIANTS)}")
    self.variant, self.blocks = variant, tuple(blocks)
    self.backbone = ResNetBackbone(blocks, rngs=rngs)
    # zero-initialised as in both references (an untrained head predicts the mean face)
    self.final_layers = nnx.List(
      [nnx.Linear(FEATURES, n, kernel_init=nnx.initializers.zeros, rngs=rngs) for _, n in VARIANTS[variant].groups]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    features = self.backbone(x.astype(jnp.float32))
    outs = [jnp.matmul(features, f.kernel[...], precision=jax.lax.Precision.HIGHEST) + f.bias[...]
            for f in self.final_layers]  # fmt: skip
    return jnp.concatenate(outs, axis=-1)


def normalise(images_uint8, variant: str) -> jax.Array:
  """uint8 RGB crops (N, S, S, 3) -> the variant's input: [0, 1] (Deep3DFaceRecon's ToTensor) or [-1, 1] (the
  release's Normalize(0.5, 0.5))."""
  x = jnp.asarray(images_uint8, jnp.float32) / 255.0
  return x * 2.0 - 1.0 if VARIANTS[variant].signed_input else x


# ----------------------------------------------------------------------------------------------------------
# PyTorch checkpoint import


def _key_map(model: ReconNet) -> KeyMap:
  head = VARIANTS[model.variant].head
  return KeyMap(
    nnx.state(model),
    renames=(("final_layers", head),) if head != "final_layers" else (),
    conv1x1=lambda key: key.startswith(f"{head}."),
    what=f"D3DFR ReconNet ({model.variant}, blocks {list(model.blocks)})",
  )


def read_torch_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A D3DFR checkpoint as {torch key: array}: Deep3DFaceRecon's dict's 'net_recon', or the release's plain state
  dict; `module.` prefixes (DataParallel; the release strips them too) and BatchNorm counters are dropped.
  weights_only: no pickled code runs. torch is imported only here."""
  import torch

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointReadError(f"D3DFR weights {path!r} not found (a Deep3DFaceRecon epoch_20.pth or the MIMAFace "
                              "release's netG_epoch_25.pth)")  # fmt: skip
  try:
    raw = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors all mean an unusable file)
    raise CheckpointReadError(f"cannot read the D3DFR weights {path!r}: {type(e).__name__}: {e}") from e
  if isinstance(raw, dict) and isinstance(raw.get("net_recon"), dict):
    raw = raw["net_recon"]
  if not isinstance(raw, dict):
    raise CheckpointReadError(f"{path!r}: expected a state dict or a dict with 'net_recon', found {type(raw).__name__}")
  out = {}
  for key, value in raw.items():
    key = key[len("module.") :] if key.startswith("module.") else key
    if key.endswith("num_batches_tracked") or not hasattr(value, "detach"):
      continue
    out[key] = value.detach().cpu().float().numpy()
  return out


def detect_variant(state: Mapping[str, np.ndarray]) -> str:
  """ "release" when the head is the release's `fianl_layers`, else "deep3dfacerecon" (whose strict check then lists
  whatever does not fit)."""
  return "release" if any(k.startswith("fianl_layers.") for k in state) else "deep3dfacerecon"


def recon_from_state_dict(state: Mapping[str, np.ndarray], variant: str | None = None,
                          blocks: Sequence[int] = RESNET50_BLOCKS, *, where: str = "") -> ReconNet:  # fmt: skip
  """A ReconNet holding `state`, strictly: every missing, unexpected or mis-shaped key raises CheckpointKeyError
  listing them all, and nothing is loaded."""
  variant = variant or detect_variant(state)
  model = nnx.eval_shape(lambda: ReconNet(variant, blocks, rngs=nnx.Rngs(0)))  # shapes only: no eager init
  arrays = _key_map(model).to_flax(state, assumed=where)
  return merge_params(model, arrays, where=where or "D3DFR ReconNet")


def load_d3dfr(path: str | os.PathLike, variant: str | None = None,
               blocks: Sequence[int] = RESNET50_BLOCKS) -> ReconNet:  # fmt: skip
  """epoch_20.pth (Deep3DFaceRecon) or netG_epoch_25.pth (the MIMAFace release) -> ReconNet; the variant follows
  the head's name unless given."""
  state = read_torch_state(path)
  variant = variant or detect_variant(state)
  return recon_from_state_dict(state, variant, blocks, where=f"{os.fspath(path)} as {variant}, blocks {list(blocks)}")


def recon_to_state_dict(model: ReconNet) -> dict[str, np.ndarray]:
  """The inverse of the import (torch key -> array in torch layout), for tests."""
  return _key_map(model).to_torch(nnx.state(model))
