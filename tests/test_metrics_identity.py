"""Identity networks for CSIM: IR-101 parity and its strict import, and dlib embeddings that separate people."""

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from mimajax.errors import CheckpointKeyError
from mimajax.metrics.assets import MissingWeights
from mimajax.metrics.identity import IdentityNet, cosine_similarity, load_identity

PORTRAITS = Path(__file__).resolve().parents[1] / ".cache" / "test_assets" / "face_recognition"
NAMES = ("obama", "obama2", "obama3", "biden")
PERSON = {"obama": "obama", "obama2": "obama", "obama3": "obama", "biden": "biden"}


def _portraits() -> dict[str, np.ndarray]:
  from PIL import Image

  missing = [n for n in NAMES if not (PORTRAITS / f"{n}.jpg").is_file()]
  if missing:
    pytest.fail(f"test portraits {missing} missing under {PORTRAITS}: run `bash launch/setup.sh`")
  return {n: np.asarray(Image.open(PORTRAITS / f"{n}.jpg").convert("RGB")) for n in NAMES}


def test_ir101_parity_tiny():
  from mimajax.parity.identity import ir101_parity

  assert ir101_parity(size="tiny", seed=1) < 1e-4


def _tiny_torch_state() -> dict[str, np.ndarray]:
  from mimajax.parity.identity import randomise_, torch_ir

  state = randomise_(torch_ir((1, 1, 1, 1))).state_dict()
  return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_ir_import_is_strict():
  from mimajax.metrics.ir101 import ir_from_state_dict

  state = _tiny_torch_state()
  ir_from_state_dict(state, (1, 1, 1, 1))  # the twin's own keys load
  broken = dict(state)
  del broken["body.1.res_layer.2.weight"]
  broken["body.2.res.0.weight"] = broken.pop("body.2.res_layer.0.weight")
  with pytest.raises(CheckpointKeyError) as err:
    ir_from_state_dict(broken, (1, 1, 1, 1))
  message = str(err.value)
  assert "body.1.res_layer.2.weight" in message and "body.2.res_layer.0.weight" in message
  assert "body.2.res.0.weight" in message  # the unexpected (renamed) key is named too
  with pytest.raises(CheckpointKeyError, match="body.3"):
    ir_from_state_dict(state, (1, 1, 2, 1))  # a deeper model than the checkpoint: its extra unit is missing


def test_ir_preprocess_matches_torch_interpolate():
  import torch
  import torch.nn.functional as F

  from mimajax.metrics.ir101 import preprocess

  images = np.random.default_rng(0).integers(0, 256, (2, 200, 200, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
  x = F.interpolate(x, size=[256, 256], mode="bilinear")
  ref = F.interpolate(x[:, :, :224, 16:240], size=[112, 112], mode="bilinear").permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(preprocess(images, "release")), ref, atol=1e-5)


def test_curricularface_without_weights_names_the_file():
  with pytest.raises(MissingWeights, match="CurricularFace_Backbone.pth.*no package ships it"):
    load_identity("curricularface")
  with pytest.raises(ValueError, match="unknown identity network"):
    load_identity("arcface")


def test_cosine_similarity():
  a = np.array([[1.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(cosine_similarity(a, np.array([[2.0, 0.0], [-3.0, -4.0]])), [1.0, -1.0], atol=1e-6)


@pytest.fixture(scope="module")
def dlib_case():
  net = load_identity("dlib")
  return net, _portraits()


def _check_ordering(names, emb, label):
  """Every same-person cosine above every different-person cosine; prints the matrix."""
  sims = emb @ emb.T
  print(f"\n{label}: cosine similarity\n" + " " * 8 + "".join(f"{n:>8s}" for n in names))
  for i, n in enumerate(names):
    print(f"{n:>8s}" + "".join(f"{sims[i, j]:8.3f}" for j in range(len(names))))
  same = [sims[i, j] for i, j in combinations(range(len(names)), 2) if PERSON[names[i]] == PERSON[names[j]]]
  diff = [sims[i, j] for i, j in combinations(range(len(names)), 2) if PERSON[names[i]] != PERSON[names[j]]]
  print(f"{label}: same-person min {min(same):.3f}, different-person max {max(diff):.3f}")
  assert min(same) > max(diff), f"{label}: identities not separated (same min {min(same)}, diff max {max(diff)})"


def test_dlib_embeddings_separate_people(dlib_case):
  net, photos = dlib_case
  assert isinstance(net, IdentityNet) and "128-d" in net.network
  rows = [net.embed(photos[n][None]) for n in NAMES]  # whole photos differ in size: one at a time
  emb, found = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
  assert found.all() and emb.shape == (4, 128) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  _check_ordering(NAMES, emb, "whole photos")


@pytest.mark.parametrize("size", [128, 64])
def test_dlib_embeddings_separate_people_at_crop_scale(dlib_case, size):
  """Face crops as an animation model outputs them: the detector's box enlarged 1.8x, resized to `size` px."""
  from PIL import Image

  net, photos = dlib_case
  crops = []
  for n in NAMES:
    box = net._detect(photos[n])
    cx, cy = (box.left() + box.right()) / 2, (box.top() + box.bottom()) / 2
    half = 0.9 * max(box.width(), box.height())
    region = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    crops.append(np.asarray(Image.fromarray(photos[n]).crop(region).resize((size, size), Image.BICUBIC)))
  emb, found = net.embed(np.stack(crops))
  print(f"\n{size} px crops: found {found.tolist()}")
  assert found.all()
  _check_ordering(NAMES, emb, f"{size} px crops")


def test_dlib_no_face_is_not_found(dlib_case):
  net, _ = dlib_case
  frames = np.full((2, 128, 128, 3), 128, np.uint8)
  frames[1] = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
  emb, found = net.embed(frames)
  assert found.tolist() == [False, False] and emb.shape == (2, 128) and np.isfinite(emb).all()
  net_photo = load_identity("dlib", assume_crop=False)
  emb, found = net_photo.embed(frames[:1])
  assert not found[0] and not emb.any()  # no crop assumed: nothing to embed
