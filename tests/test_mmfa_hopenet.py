"""Hopenet (MMFA's R source) against a PyTorch transcription of deep-head-pose's at random weights, its strict import,
and the torch-free reader of torch files (legacy and zip formats)."""

import pickle

import jax
import numpy as np
import pytest

from conftest import nchw, rel_err
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.mmfa import hopenet
from mimajax.mmfa.keypoints import rotation_from_degrees

BLOCKS = (1, 1, 1, 1)  # one Bottleneck per stage: every layer type and key pattern of ResNet-50, fast


def _torch_hopenet(seed=0):
  """deep-head-pose's Hopenet: torchvision's ResNet layout, AvgPool2d(7), fc_yaw / fc_pitch / fc_roll and the
  vestigial fc_finetune. The backbone modules come from mimajax.parity.d3dfr's torchvision transcription."""
  import torch
  from torch import nn

  from mimajax.parity.d3dfr import randomise_, torch_recon

  resnet = torch_recon("deep3dfacerecon", BLOCKS).backbone

  class Hopenet(nn.Module):
    def __init__(self):
      super().__init__()
      for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        setattr(self, name, getattr(resnet, name))
      self.avgpool = nn.AvgPool2d(7)
      self.fc_yaw, self.fc_pitch, self.fc_roll = (nn.Linear(2048, 66) for _ in range(3))
      self.fc_finetune = nn.Linear(2048 + 3, 3)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
      x = x.view(x.size(0), -1)
      return self.fc_yaw(x), self.fc_pitch(x), self.fc_roll(x)

  torch.manual_seed(seed)
  model = randomise_(Hopenet(), seed).eval()
  with torch.no_grad():
    for fc in (model.fc_yaw, model.fc_pitch, model.fc_roll):
      fc.weight.mul_(0.3)  # logits of a few units: a softmax that is neither flat nor one-hot
  return model


def _torch_degrees(logits):
  """face-vid2vid's headpose_pred_to_degree."""
  import torch

  p = torch.softmax(logits, dim=1)
  return (p * torch.arange(66, dtype=torch.float32)).sum(1) * 3 - 99


def test_hopenet_matches_torch_through_a_legacy_pkl(tmp_path):
  import torch

  model = _torch_hopenet()
  path = tmp_path / "hopenet_robust_alpha1.pkl"
  # deep-head-pose's checkpoints predate torch 1.6: the legacy (non-zip) format, a plain state dict
  torch.save(model.state_dict(), str(path), _use_new_zipfile_serialization=False)
  ours = hopenet.load_hopenet(path, blocks=BLOCKS)

  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, size=(2, 224, 224, 3)).astype(np.float32)
  x = np.asarray(hopenet.preprocess(images))  # 224 px already: normalisation only
  mean, std = np.array(hopenet.IMAGENET_MEAN), np.array(hopenet.IMAGENET_STD)
  np.testing.assert_allclose(x, (images - mean) / std, atol=1e-6)
  with torch.no_grad():
    ref = model(torch.from_numpy(nchw(x)))
  got = jax.jit(lambda m, v: m(v))(ours, x)
  for name, r in zip(hopenet.HEADS, ref):
    err = rel_err(np.asarray(got[name]), r.numpy())
    assert err < 1e-4, (name, err)
  degrees = hopenet.predict_degrees(ours, images)
  for name, r in zip(hopenet.HEADS, ref):
    np.testing.assert_allclose(np.asarray(degrees[name]), _torch_degrees(r).numpy(), atol=2e-3)
  for r in ref:  # the bins' softmax is neither one-hot nor flat, so the expectation is exercised
    p = torch.softmax(r, dim=1)
    assert 0.05 < float(p.max()) < 0.9
  rot = np.asarray(hopenet.rotation(ours, images))
  want = np.asarray(rotation_from_degrees(degrees["yaw"], degrees["pitch"], degrees["roll"]))
  np.testing.assert_allclose(rot, want, atol=1e-6)


def test_import_is_strict_and_round_trips():
  model = _torch_hopenet(1)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = hopenet.hopenet_from_state_dict(state, BLOCKS)
  back = hopenet.hopenet_to_state_dict(ours)
  kept = {k for k in state if not k.startswith("fc_finetune.") and not k.endswith("num_batches_tracked")}
  assert set(back) == kept and all(np.array_equal(back[k], state[k]) for k in kept)
  broken = dict(state)
  del broken["layer3.0.downsample.1.running_var"]
  broken["fc_roll.weight"] = broken["fc_roll.weight"][:10]
  with pytest.raises(CheckpointKeyError) as e:
    hopenet.hopenet_from_state_dict(broken, BLOCKS)
  assert "layer3.0.downsample.1.running_var" in e.value.missing
  assert any(k == "fc_roll.weight" for k, *_ in e.value.mismatched)


def test_preprocess_resizes_to_224():
  images = np.random.default_rng(2).uniform(size=(1, 64, 64, 3)).astype(np.float32)
  assert hopenet.preprocess(images).shape == (1, 224, 224, 3)


@pytest.mark.parametrize("zip_format", [False, True])
def test_torch_files_read_without_torch(tmp_path, zip_format):
  import torch

  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {
    "module.a.weight": base,
    "module.a.bias": base[1, 2:5],  # a view into the same storage, at an offset
    "module.b.t": base.t(),  # non-contiguous strides
    "module.c.long": torch.tensor([1, -2, 3], dtype=torch.int64),
    "module.c.half": torch.tensor([0.5, 1.5], dtype=torch.float16),
    "module.c.scalar": torch.tensor(2.5),
    "module.nested": {"x": torch.ones(2, 2)},
  }
  path = tmp_path / "state.pth"
  torch.save(state, str(path), _use_new_zipfile_serialization=zip_format)
  got = hopenet.read_torch_state_dict(path)
  want = {k.removeprefix("module."): v for k, v in state.items() if k != "module.nested"}
  want["nested.x"] = state["module.nested"]["x"]
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
    assert got[k].dtype == v.numpy().dtype, k


def test_torch_file_with_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("this must never run",))

  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    for header in (hopenet._LEGACY_MAGIC, hopenet._LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(header, f)
    pickle.dump({"weight": Evil()}, f)
  with pytest.raises(CheckpointReadError, match="builtins.print"):
    hopenet.read_torch_state_dict(path)
  with pytest.raises(CheckpointReadError, match="not found"):
    hopenet.read_torch_state_dict(tmp_path / "missing.pkl")
