"""Hopenet (Ruiz et al. 2018, "Fine-Grained Head Pose Estimation Without Keypoints"), MMFA's source of R (sec. 3.2).

natanielruiz/deep-head-pose code/hopenet.py `Hopenet(Bottleneck, [3, 4, 6, 3], 66)`: a torchvision ResNet-50 (conv1,
bn1, layer1..layer4; `AvgPool2d(7)` over layer4's 7x7 map at 224 px) and three Linear(2048, 66) heads fc_yaw,
fc_pitch, fc_roll of 3-degree bins (-99..99, read by keypoints.headpose_from_bins). The backbone is
mimajax.face3d.d3dfr.ResNetBackbone (the same torchvision layout and names; its global mean equals AvgPool2d(7) at
224 px), so the state dict maps key for key. The checkpoint's vestigial `fc_finetune` ("from previous
experiments", unused in forward) is dropped on import.

Input (face-vid2vid's train code, modules/model.py, and deep-head-pose's test code): RGB resized to 224 x 224 and
ImageNet-normalised; `preprocess` does both (jax.image.resize bilinear with antialiasing on downscale: torchvision's
tensor Resize with antialias=True). face-vid2vid turns the three degrees into R with get_rotation_matrix
(keypoints.rotation_from_degrees); `rotation` does that.

Weights are read without torch (`read_torch_state_dict`): zip archives (torch >= 1.6) with
mimajax.metrics.inception's restricted reader, and the legacy format of torch < 1.6 that deep-head-pose's
hopenet_robust_alpha1.pkl and torchvision's vgg19-dcbb9e9d.pth use, with the restricted reader below.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mimajax.convert.state_dict import KeyMap, merge_params
from mimajax.errors import CheckpointReadError
from mimajax.face3d.d3dfr import EXPANSION, RESNET50_BLOCKS, WIDTHS, ResNetBackbone
from mimajax.metrics.inception import TORCH_STORAGE_DTYPES, state_dict_from_file
from mimajax.mmfa.keypoints import NUM_BINS, headpose_from_bins, rotation_from_degrees

SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VESTIGIAL = ("fc_finetune.",)  # in every Hopenet checkpoint, never used by its forward
HEADS = ("yaw", "pitch", "roll")


class Hopenet(ResNetBackbone):
  """Normalised images (N, H, W, 3) -> {yaw, pitch, roll: (N, num_bins) logits}. 224 px is what it was trained at."""

  def __init__(self, blocks: Sequence[int] = RESNET50_BLOCKS, num_bins: int = NUM_BINS, *, rngs: nnx.Rngs):
    super().__init__(blocks, rngs=rngs)
    self.blocks, self.num_bins = tuple(blocks), num_bins
    features = WIDTHS[-1] * EXPANSION
    self.fc_yaw = nnx.Linear(features, num_bins, rngs=rngs)
    self.fc_pitch = nnx.Linear(features, num_bins, rngs=rngs)
    self.fc_roll = nnx.Linear(features, num_bins, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    features = super().__call__(x.astype(jnp.float32))
    heads = (self.fc_yaw, self.fc_pitch, self.fc_roll)
    return {name: jnp.matmul(features, fc.kernel[...], precision=jax.lax.Precision.HIGHEST) + fc.bias[...]
            for name, fc in zip(HEADS, heads)}  # fmt: skip


def preprocess(images: jax.Array, size: int = SIZE) -> jax.Array:
  """Images (N, H, W, 3) in [0, 1] -> Hopenet's input: resized to size x size, ImageNet-normalised."""
  images = images.astype(jnp.float32)
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear", antialias=True)
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def predict_degrees(model: Hopenet, images: jax.Array) -> dict[str, jax.Array]:
  """Images (N, H, W, 3) in [0, 1] -> {yaw, pitch, roll: (N,) degrees} (the bins' softmax expectation)."""
  logits = model(preprocess(images))
  return {name: headpose_from_bins(logits[name]) for name in HEADS}


def rotation(model: Hopenet, images: jax.Array) -> jax.Array:
  """R (N, 3, 3) in the keypoint frame from Hopenet's degrees, as face-vid2vid builds it (get_rotation_matrix)."""
  d = predict_degrees(model, images)
  return rotation_from_degrees(d["yaw"], d["pitch"], d["roll"])


# ----------------------------------------------------------------------------------------------------------
# Import


def _key_map(model: Hopenet) -> KeyMap:
  return KeyMap(nnx.state(model), what=f"Hopenet (blocks {list(model.blocks)}, {model.num_bins} bins)")


def hopenet_from_state_dict(state: Mapping[str, np.ndarray], blocks: Sequence[int] = RESNET50_BLOCKS,
                            num_bins: int = NUM_BINS, *, where: str = "") -> Hopenet:  # fmt: skip
  """A Hopenet holding `state` (torch keys), strictly: every missing, unexpected or mis-shaped key raises
  CheckpointKeyError listing them all. fc_finetune and BatchNorm counters are dropped first."""
  state = {k: v for k, v in state.items()
           if not k.startswith(VESTIGIAL) and not k.endswith("num_batches_tracked")}  # fmt: skip
  model = nnx.eval_shape(lambda: Hopenet(blocks, num_bins, rngs=nnx.Rngs(0)))
  arrays = _key_map(model).to_flax(state, assumed=where)
  return merge_params(model, arrays, where=where or "Hopenet")


def load_hopenet(path: str | os.PathLike, blocks: Sequence[int] = RESNET50_BLOCKS) -> Hopenet:
  """A local deep-head-pose checkpoint (hopenet_robust_alpha1.pkl, hopenet_alpha*.pkl; legacy or zip torch format,
  a plain state dict, `module.` prefixes stripped) -> Hopenet."""
  return hopenet_from_state_dict(read_torch_state_dict(path), blocks, where=os.fspath(path))


def hopenet_to_state_dict(model: Hopenet) -> dict[str, np.ndarray]:
  """The inverse of the import (torch key -> array in torch layout), for tests."""
  return _key_map(model).to_torch(nnx.state(model))


# ----------------------------------------------------------------------------------------------------------
# torch files without torch


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{dotted key: array} of a torch.save'd state dict in either torch format, without importing torch; nested
  dicts are flattened with dots and DataParallel's `module.` prefixes removed. Only tensors, storages and
  OrderedDicts are accepted from the pickle (any other global raises CheckpointReadError before anything runs)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointReadError(f"{path!r} not found")
  try:
    if zipfile.is_zipfile(path):
      flat = state_dict_from_file(path)
    else:
      flat = _flatten(_read_legacy(path))
  except (pickle.UnpicklingError, ValueError, EOFError, KeyError, TypeError) as e:
    raise CheckpointReadError(f"cannot read the torch file {path!r}: {type(e).__name__}: {e}") from e
  return {k.removeprefix("module."): v for k, v in flat.items()}


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
# inception's torch-archive table, plus bfloat16 (legacy files may hold it)
_STORAGE_DTYPES = {**TORCH_STORAGE_DTYPES, "BFloat16Storage": ml_dtypes.bfloat16}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage whose bytes follow the pickle in the file (filled after unpickling)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, numel, None


class _View:
  def __init__(self, base: _Storage, offset: int, numel: int):
    self.base, self.offset, self.numel = base, offset, numel


class _LazyTensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def array(self) -> np.ndarray:
    s = self.storage
    data = s.data if isinstance(s, _Storage) else s.base.data[s.offset : s.offset + s.numel]
    if not self.size:
      return np.array(data[self.offset])
    if min(self.size) > 0:
      last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
      if min(self.stride) < 0 or last >= data.size:
        raise ValueError(f"tensor of size {self.size} / stride {self.stride} overruns its storage of {data.size}")
    view = np.lib.stride_tricks.as_strided(data[self.offset :], self.size, [st * data.itemsize for st in self.stride])
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


class _LegacyUnpickler(pickle.Unpickler):
  def __init__(self, file, storages: dict):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
      return _rebuild_parameter
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weight file (not a tensor record)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id in a legacy torch file: {str(pid)[:80]}")
    _, storage_type, key, _location, numel, view = pid
    if key not in self.storages:
      self.storages[key] = _Storage(storage_type.dtype, int(numel))
    base = self.storages[key]
    if view is None:
      return base
    _view_key, offset, view_numel = view
    return _View(base, int(offset), int(view_numel))


class _Plain(pickle.Unpickler):
  """The legacy header's pickles (magic, protocol, system info, storage keys): no globals at all."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a torch file header")


def _read_legacy(path: str):
  """torch.save's format before 1.6 (torch/serialization.py _legacy_save): pickles of the magic number, protocol
  version and system info, the object (storages as persistent ids), the list of storage keys, then each storage as
  an int64 element count followed by its raw little-endian values."""
  with open(path, "rb") as f:
    if _Plain(f).load() != _LEGACY_MAGIC:
      raise ValueError("not a torch file (neither a zip archive nor the legacy format's magic number)")
    if _Plain(f).load() != _LEGACY_PROTOCOL:
      raise ValueError("unsupported legacy torch protocol version")
    info = _Plain(f).load()
    if isinstance(info, dict) and not info.get("little_endian", True):
      raise ValueError("big-endian torch files are not supported")
    storages: dict = {}
    obj = _LegacyUnpickler(f, storages).load()
    for key in _Plain(f).load():
      storage = storages[key]
      numel = int.from_bytes(f.read(8), "little", signed=True)
      if numel != storage.numel:
        raise ValueError(f"storage {key}: {numel} values in the file, the pickle says {storage.numel}")
      raw = f.read(numel * storage.dtype.itemsize)
      if len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f"storage {key}: the file ends early")
      storage.data = np.frombuffer(raw, dtype=storage.dtype)
  return obj


def _flatten(obj) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}

  def walk(node, prefix: str):
    if isinstance(node, _LazyTensor):
      out[prefix] = node.array()
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}.{k}" if prefix else str(k))

  walk(obj, "")
  return out
