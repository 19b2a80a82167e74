"""Exact round trips between mimajax models and the diffusers / SD single-file formats, and error paths."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mimajax.convert import diffusers_format as df
from mimajax.convert import sd_single_file
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.vae import AutoencoderKL, VAEConfig

UNET_CFG = UNetConfig(
  block_out_channels=(32, 64),
  cross_attention_dim=32,
  norm_num_groups=8,
  attention_head_dim=4,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
VAE_CFG = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)


def _random_params(model, seed=0):
  """Every parameter random (norm scales and zero biases included) so a dropped key shows."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _flat_params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  fa, fb = _flat_params(a), _flat_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert np.array_equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def unet():
  return _random_params(UNet2DConditionModel(UNET_CFG, rngs=nnx.Rngs(0)), 1)


@pytest.fixture(scope="module")
def vae():
  return _random_params(AutoencoderKL(VAE_CFG, rngs=nnx.Rngs(0)), 2)


@pytest.mark.parametrize("use_linear_projection", [False, True])
def test_diffusers_folder_round_trip_is_exact(tmp_path, use_linear_projection):
  from diffusers import UNet2DConditionModel as TorchUNet

  cfg = UNET_CFG.replace(use_linear_projection=use_linear_projection)
  ours = _random_params(UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), 3)
  df.save_unet(ours, tmp_path / "unet")
  # diffusers loads it strictly, and its weights are ours bit for bit
  ref = TorchUNet.from_pretrained(tmp_path / "unet")
  saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
  ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert ref_sd.keys() == saved.keys()
  for k in saved:
    assert np.array_equal(ref_sd[k], saved[k]), k
  # a folder diffusers writes loads back into exactly the same parameters
  ref.save_pretrained(tmp_path / "resaved")
  _assert_same_params(ours, df.load_unet(tmp_path / "resaved"))


def test_vae_folder_round_trip_is_exact(tmp_path, vae):
  from diffusers import AutoencoderKL as TorchVAE

  df.save_vae(vae, tmp_path / "vae")
  ref = TorchVAE.from_pretrained(tmp_path / "vae")
  ref.save_pretrained(tmp_path / "resaved", safe_serialization=False)  # the legacy .bin format too
  _assert_same_params(vae, df.load_vae(tmp_path / "resaved"))


def test_single_file_round_trip_is_exact(tmp_path, unet, vae):
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  from diffusers import UNet2DConditionModel as TorchUNet

  path = tmp_path / "sd.safetensors"
  sd_single_file.save_models(path, unet=unet, vae=vae)
  u2, v2 = sd_single_file.load_models(path, UNET_CFG, VAE_CFG)
  _assert_same_params(unet, u2)
  _assert_same_params(vae, v2)
  # diffusers' own single-file loader reads the same weights
  df.save_unet(unet, tmp_path / "unet_cfg")
  ref = TorchUNet.from_single_file(str(path), config=str(tmp_path / "unet_cfg"), local_files_only=True)
  want = df.unet_to_torch_state(unet)
  for k, v in ref.state_dict().items():
    assert torch.equal(v, torch.from_numpy(want[k])), k
  df.save_vae(vae, tmp_path / "vae_cfg")
  ref_vae = TorchVAE.from_single_file(str(path), config=str(tmp_path / "vae_cfg"), local_files_only=True)
  want = df.vae_to_torch_state(vae)
  for k, v in ref_vae.state_dict().items():
    assert torch.equal(v, torch.from_numpy(want[k])), k


def _saved_unet(tmp_path, unet):
  folder = tmp_path / "unet"
  df.save_unet(unet, folder)
  return folder, folder / "diffusion_pytorch_model.safetensors"


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path, unet):
  folder, weights = _saved_unet(tmp_path, unet)
  state = load_file(weights)
  del state["conv_in.weight"]
  state["down_blocks.0.extra.weight"] = np.zeros((1,), np.float32)
  state["mid_block.attentions.0.proj_in.weight"] = np.zeros((64, 64), np.float32)  # conv 1x1 expected
  save_file(state, weights)
  with pytest.raises(CheckpointKeyError) as info:
    df.load_unet(folder)
  message = str(info.value)
  assert "conv_in.weight" in message and "down_blocks.0.extra.weight" in message
  assert "mid_block.attentions.0.proj_in.weight" in message and "(64, 64, 1, 1)" in message
  assert "nothing was loaded" in message
  assert info.value.missing == ["conv_in.weight"]
  assert info.value.unexpected == ["down_blocks.0.extra.weight"]


def test_config_that_does_not_match_the_weights(tmp_path, unet):
  folder, _ = _saved_unet(tmp_path, unet)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["layers_per_block"] = 1
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointKeyError, match=r"unexpected keys .*\n.*down_blocks\.0\.attentions\.1"):
    df.load_unet(folder)


def test_unreadable_and_missing_files(tmp_path, unet):
  folder, weights = _saved_unet(tmp_path, unet)
  weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
  with pytest.raises(CheckpointReadError, match="cannot read safetensors file"):
    df.load_unet(folder)
  weights.unlink()
  with pytest.raises(CheckpointReadError, match="no weights in"):
    df.load_unet(folder)
  with pytest.raises(CheckpointReadError, match="no config.json"):
    df.load_unet(tmp_path / "nowhere")
  (folder / "config.json").write_text("{not json")
  with pytest.raises(CheckpointReadError, match="cannot read .*config.json"):
    df.load_unet(folder)
  with pytest.raises(CheckpointReadError, match="no checkpoint file"):
    sd_single_file.load_models(tmp_path / "missing.safetensors", UNET_CFG)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x00" * 64)
  with pytest.raises(CheckpointReadError, match="cannot read checkpoint"):
    sd_single_file.load_models(bad, UNET_CFG)


@pytest.mark.parametrize(
  "value, found",
  [("int", "an int (3)"), ("str", "a str ('x')"), ("dict", "a dict"), ("list", "a list")],
)
def test_bin_with_a_value_that_is_no_tensor_is_refused_naming_the_key(tmp_path, value, found):
  torch = pytest.importorskip("torch")
  values = {"int": 3, "str": "x", "dict": {"w": torch.zeros(1)}, "list": [torch.zeros(1)]}
  torch.save({"conv_in.weight": torch.zeros(2, 2), "extra": values[value]}, tmp_path / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointReadError, match=re.escape(f"key 'extra' holds {found}") + ".*expected a tensor"):
    df.read_state_dict(tmp_path)


def test_bin_that_is_no_state_dict_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save([torch.zeros(2)], tmp_path / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointReadError, match=r"holds a list.*expected a state dict"):
    df.read_state_dict(tmp_path)


def test_save_never_leaves_a_partial_folder(tmp_path, unet):
  folder, _ = _saved_unet(tmp_path, unet)
  with pytest.raises(FileExistsError, match="not empty"):
    df.save_unet(unet, folder)
  target = tmp_path / "new"
  with pytest.raises(TypeError):
    df.write_folder(target, {"x": object()}, {})  # config that cannot be serialised
  assert not target.exists()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
