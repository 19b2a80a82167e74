"""Importing the official MIMAFace release layout: every key lands, mismatches are named."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import TINY_UNET, perturb_
from mimajax.convert import animatediff_format
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.mimaface import release_format
from mimajax.mimaface.mia import MIAConfig, ReleaseMIA

MIA = MIAConfig(
  variant="release", clip_dim=32, cross_attention_dim=32, face_recognition_dim=50, clip_tokens=17, release_layers=2
)


def _torch_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
  """A tiny release folder in the official layout, every tensor random."""
  return write_release(tmp_path_factory.mktemp("release"))


def write_release(root, mia_config: MIAConfig = MIA):
  """Writes a tiny release folder (random tensors) at `root`: (root, U-Net, 3dunet, CLIP states, the MIA)."""
  from diffusers import MotionAdapter, UNet2DConditionModel
  from transformers import CLIPVisionConfig, CLIPVisionModel

  torch.manual_seed(0)
  unet = perturb_(UNet2DConditionModel(**TINY_UNET))
  unet.save_pretrained(root / "pretrained_unet")
  adapter = perturb_(
    MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=4,
                  use_motion_mid_block=False, motion_norm_num_groups=8)
  )  # fmt: skip
  motion = animatediff_format.motion_state_to_original(_torch_state(adapter))
  unet3d = {k: torch.from_numpy(v) for k, v in motion.items()}
  unet3d["conv_in.weight"] = torch.randn(32, 13, 3, 3)
  unet3d["conv_in.bias"] = torch.randn(32)
  unet3d["down_blocks.0.resnets.0.conv1.weight"] = torch.randn(32, 32, 3, 3)  # spatial: the release ignores it
  torch.save(unet3d, root / "3dunet.pth")
  clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8))  # fmt: skip
  perturb_(clip).save_pretrained(root / "vision_encoder")
  mia = ReleaseMIA(mia_config, rngs=nnx.Rngs(3))
  leaves, treedef = jax.tree.flatten(nnx.state(mia, nnx.Param))
  nnx.update(
    mia,
    jax.tree.unflatten(
      treedef,
      [l + 0.01 * np.random.default_rng(i).standard_normal(l.shape).astype(np.float32) for i, l in enumerate(leaves)],
    ),
  )
  release_format.save_release_mia(mia, root / "mim.pth")
  return root, _torch_state(unet), unet3d, _torch_state(clip), mia


def test_every_release_key_lands(release_dir):
  root, unet_sd, unet3d, clip_sd, mia = release_dir
  model = release_format.load_release(root, motion_heads=4)
  cfg = model.config
  assert cfg.mia.variant == "release" and cfg.video and cfg.unet.in_channels == 13
  assert cfg.mia.face_recognition_dim == 50 and cfg.mia.release_layers == 2 and not cfg.motion.use_motion_mid_block
  # U-Net: spatial weights from pretrained_unet/, conv_in and motion modules from 3dunet.pth
  ours = animatediff_format.unet_motion_to_torch_state(model.unet)
  np.testing.assert_array_equal(ours["conv_in.weight"], unet3d["conv_in.weight"].numpy())
  np.testing.assert_array_equal(
    ours["down_blocks.0.resnets.0.conv1.weight"], unet_sd["down_blocks.0.resnets.0.conv1.weight"]
  )
  motion = animatediff_format.motion_state_from_original(
    {k: v.numpy() for k, v in unet3d.items() if "motion_modules" in k}
  )
  for k, v in motion.items():
    if k.endswith(".pe"):  # positional tables are regenerated (checked against the file to 2e-3 on load)
      np.testing.assert_allclose(ours[k], v, atol=1e-5, err_msg=k)
    else:
      np.testing.assert_array_equal(ours[k], v, err_msg=k)
  for k, v in unet_sd.items():
    if not k.startswith("conv_in."):
      np.testing.assert_array_equal(ours[k], v, err_msg=k)
  # CLIP and MIA
  from mimajax.convert import clip_format

  clip_ours = {k.removeprefix("vision_model."): v for k, v in clip_format.clip_to_torch_state(model.clip).items()}
  for k, v in clip_sd.items():
    k = k.removeprefix("vision_model.")  # transformers 5 saves CLIPVisionModel without the prefix
    if "position_ids" not in k:
      np.testing.assert_array_equal(clip_ours[k], v, err_msg=k)
  want = release_format.mia_key_map(mia).to_torch(nnx.state(mia, nnx.Param))
  got = release_format.mia_key_map(model.mia).to_torch(nnx.state(model.mia, nnx.Param))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_release_mismatches_are_named(release_dir, tmp_path):
  import shutil

  root = release_dir[0]
  bad = tmp_path / "bad"
  shutil.copytree(root, bad)
  # a paper-variant adapter saved where the release expects its post-fuse module
  state = torch.load(bad / "mim.pth")
  state["cross_attention.to_q.weight"] = state.pop("mapper.resblocks.1.attn.c_qkv.weight")
  torch.save(state, bad / "mim.pth")
  with pytest.raises(CheckpointKeyError, match=r"(?s)missing keys.*c_qkv.*unexpected keys.*cross_attention"):
    release_format.load_release(bad, motion_heads=4)
  (bad / "mim.pth").unlink()
  with pytest.raises(CheckpointReadError, match="missing mim.pth"):
    release_format.load_release(bad, motion_heads=4)
  unet3d = torch.load(root / "3dunet.pth")
  unet3d["conv_in.weight"] = unet3d["conv_in.weight"][:, :9]
  torch.save(unet3d, bad / "3dunet.pth")
  shutil.copy(root / "mim.pth", bad / "mim.pth")
  with pytest.raises(CheckpointKeyError, match="takes 9 channels"):
    release_format.load_release(bad, motion_heads=4)
