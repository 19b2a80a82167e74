"""Tests for mimajax.convert.sd_single_file (diffusers <-> original SD single-file key map).

The reference for the original (LDM) layout is diffusers' own single-file loader
(``from_single_file`` / ``diffusers.loaders.single_file_utils``), run offline against a
local config folder. Every parameter is filled with distinct random values first, so a
key that diffusers' loader silently skipped (it loads with strict=False) or that landed on
the wrong parameter shows up as a value mismatch.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
  convert_ldm_unet_checkpoint,
  convert_ldm_vae_checkpoint,
)

from mimajax.convert.sd_single_file import (  # noqa: E402
  LDM_UNET_PREFIX,
  LDM_VAE_PREFIX,
  load_single_file,
  save_single_file,
  unet_diffusers_to_ldm,
  unet_expected_shapes,
  unet_key_map,
  unet_ldm_to_diffusers,
  vae_diffusers_to_ldm,
  vae_expected_shapes,
  vae_ldm_to_diffusers,
)
from mimajax.errors import CheckpointKeyError  # noqa: E402

# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------

_UNET_BASE = dict(sample_size=16, cross_attention_dim=32, norm_num_groups=8)

UNET_CONFIGS = {
  # SD1.x-like: conv proj, every block cross-attention.
  "lpb1_conv_proj": dict(
    _UNET_BASE,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=False,
  ),
  # SD2.x-like: linear proj, 2 transformer layers, plain last down / first up block.
  "lpb2_linear_proj_tl2": dict(
    _UNET_BASE,
    block_out_channels=(32, 64),
    layers_per_block=2,
    attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
    transformer_layers_per_block=2,
  ),
  # Three blocks, DownBlock2D last (the SD layout, shrunk), per-block heads / transformer depth.
  "3blocks_downblock_last": dict(
    _UNET_BASE,
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    attention_head_dim=(2, 4, 4),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=False,
    transformer_layers_per_block=(1, 2, 1),
  ),
}
# diffusers' own single-file converter assumes an int layers_per_block, so this one is checked
# against the model's shapes and by round trip only.
UNET_CONFIGS_EXTRA = {
  "per_block_lpb_scale_shift": dict(
    _UNET_BASE,
    block_out_channels=(32, 64, 64),
    layers_per_block=(1, 2, 1),
    attention_head_dim=4,
    cross_attention_dim=(32, 16, 24),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=(2, 1, 1),
    resnet_time_scale_shift="scale_shift",
  ),
}

_VAE_BASE = dict(
  block_out_channels=(32, 64),
  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
  norm_num_groups=8,
  latent_channels=4,
  sample_size=32,
)
VAE_CONFIGS = {
  "lpb1": dict(_VAE_BASE, layers_per_block=1),
  "lpb2": dict(_VAE_BASE, layers_per_block=2),
  "3blocks_lpb2": dict(
    _VAE_BASE,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
  ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Give every parameter distinct random values (norm weights/biases included)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.state_dict().values():
      p.copy_(torch.randn(p.shape, generator=g))


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


_CACHE: dict = {}


def _unet(name: str):
  if name not in _CACHE:
    cfg = {**UNET_CONFIGS, **UNET_CONFIGS_EXTRA}[name]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg)
    _randomize(model, seed=1)
    _CACHE[name] = (model, dict(model.config), _numpy_state(model))
  return _CACHE[name]


def _vae(name: str):
  key = "vae/" + name
  if key not in _CACHE:
    torch.manual_seed(0)
    model = AutoencoderKL(**VAE_CONFIGS[name])
    _randomize(model, seed=2)
    _CACHE[key] = (model, dict(model.config), _numpy_state(model))
  return _CACHE[key]


def _assert_states_equal(got: dict, want: dict) -> None:
  assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
  for k in want:
    a = got[k].detach().cpu().numpy() if isinstance(got[k], torch.Tensor) else np.asarray(got[k])
    assert a.shape == want[k].shape, k
    assert a.dtype == want[k].dtype, k
    assert np.array_equal(a, want[k]), k


# --------------------------------------------------------------------------------------
# 0) the map is built from the config: key set and shapes equal the real diffusers model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*UNET_CONFIGS, *UNET_CONFIGS_EXTRA])
def test_unet_expected_shapes_match_diffusers_model(name):
  _, cfg, sd = _unet(name)
  assert unet_expected_shapes(cfg) == {k: v.shape for k, v in sd.items()}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_expected_shapes_match_diffusers_model(name):
  _, cfg, sd = _vae(name)
  assert vae_expected_shapes(cfg) == {k: v.shape for k, v in sd.items()}


def test_known_ldm_names():
  """Spot-check names against the original SD1.5 layout (4 blocks, 2 layers per block)."""
  cfg = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
  )
  m = unet_key_map(cfg)
  shapes = unet_expected_shapes(cfg, layout="ldm")
  assert len(m) == 686  # SD1.5 U-Net parameter count
  assert m["time_embedding.linear_2.weight"] == "time_embed.2.weight"
  assert m["conv_in.weight"] == "input_blocks.0.0.weight"
  assert m["down_blocks.0.resnets.1.norm1.weight"] == "input_blocks.2.0.in_layers.0.weight"
  assert m["down_blocks.0.attentions.1.proj_in.weight"] == "input_blocks.2.1.proj_in.weight"
  assert m["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
  assert m["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
  assert m["down_blocks.3.resnets.1.conv2.weight"] == "input_blocks.11.0.out_layers.3.weight"
  assert m["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
  )
  assert m["mid_block.resnets.1.time_emb_proj.weight"] == "middle_block.2.emb_layers.1.weight"
  assert m["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
  assert m["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
  assert m["up_blocks.3.attentions.2.proj_out.bias"] == "output_blocks.11.1.proj_out.bias"
  assert m["conv_norm_out.weight"] == "out.0.weight"
  assert m["conv_out.weight"] == "out.2.weight"
  assert "output_blocks.11.2.conv.weight" not in shapes  # no upsampler after the last up block
  assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
  assert shapes["output_blocks.3.0.skip_connection.weight"] == (1280, 2560, 1, 1)

  vcfg = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
  )
  vshapes = vae_expected_shapes(vcfg, layout="ldm")
  assert len(vshapes) == 248  # SD1.5 VAE parameter count
  assert vshapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
  assert vshapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  assert "decoder.up.0.upsample.conv.weight" not in vshapes
  assert "encoder.down.3.downsample.conv.weight" not in vshapes


# --------------------------------------------------------------------------------------
# 1) round trip diffusers -> ldm -> diffusers is exact
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*UNET_CONFIGS, *UNET_CONFIGS_EXTRA])
def test_unet_round_trip_exact(name):
  _, cfg, sd = _unet(name)
  ldm = unet_diffusers_to_ldm(sd, cfg)
  assert len(ldm) == len(sd)
  assert all(k.startswith(("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.")) for k in ldm)
  back = unet_ldm_to_diffusers(ldm, cfg)
  _assert_states_equal(back, sd)


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_round_trip_exact(name):
  _, cfg, sd = _vae(name)
  ldm = vae_diffusers_to_ldm(sd, cfg)
  assert len(ldm) == len(sd)
  c = cfg["block_out_channels"][-1]
  for part in ("encoder", "decoder"):
    for n in ("q", "k", "v", "proj_out"):
      assert ldm[f"{part}.mid.attn_1.{n}.weight"].shape == (c, c, 1, 1)
  back = vae_ldm_to_diffusers(ldm, cfg)
  _assert_states_equal(back, sd)
  assert back["encoder.mid_block.attentions.0.to_q.weight"].shape == (c, c)


# --------------------------------------------------------------------------------------
# 2) saved files load in diffusers' own single-file loader, offline, with a local config
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_file_loads_in_diffusers_from_single_file(name, tmp_path):
  model, cfg, sd = _unet(name)
  cfg_dir = tmp_path / "unet_cfg"
  model.save_pretrained(cfg_dir)  # only config.json is read from here
  path = tmp_path / "sd.safetensors"
  save_single_file(path, unet_state=sd, unet_config=cfg)

  loaded = UNet2DConditionModel.from_single_file(str(path), config=str(cfg_dir), local_files_only=True)
  _assert_states_equal(loaded.state_dict(), sd)

  # diffusers' converter (strict key set: from_single_file itself loads with strict=False)
  ldm = {LDM_UNET_PREFIX + k: torch.from_numpy(v) for k, v in unet_diffusers_to_ldm(sd, cfg).items()}
  _assert_states_equal(convert_ldm_unet_checkpoint(ldm, cfg), sd)

  unet, vae = load_single_file(path, unet_config=cfg)
  assert vae is None
  _assert_states_equal(unet, sd)


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_file_loads_in_diffusers_from_single_file(name, tmp_path):
  model, cfg, sd = _vae(name)
  cfg_dir = tmp_path / "vae_cfg"
  model.save_pretrained(cfg_dir)
  path = tmp_path / "sd.safetensors"
  save_single_file(path, vae_state=sd, vae_config=cfg)

  loaded = AutoencoderKL.from_single_file(str(path), config=str(cfg_dir), local_files_only=True)
  _assert_states_equal(loaded.state_dict(), sd)

  ldm = {LDM_VAE_PREFIX + k: torch.from_numpy(v) for k, v in vae_diffusers_to_ldm(sd, cfg).items()}
  _assert_states_equal(convert_ldm_vae_checkpoint(ldm, cfg), sd)

  unet, vae = load_single_file(path, vae_config=cfg)
  assert unet is None
  _assert_states_equal(vae, sd)


def test_combined_file_and_ckpt_pickle(tmp_path):
  umodel, ucfg, usd = _unet("3blocks_downblock_last")
  vmodel, vcfg, vsd = _vae("lpb2")
  ucfg_dir, vcfg_dir = tmp_path / "unet", tmp_path / "vae"
  umodel.save_pretrained(ucfg_dir)
  vmodel.save_pretrained(vcfg_dir)

  path = tmp_path / "both.safetensors"
  save_single_file(path, unet_state=usd, unet_config=ucfg, vae_state=vsd, vae_config=vcfg)
  _assert_states_equal(
    UNet2DConditionModel.from_single_file(str(path), config=str(ucfg_dir), local_files_only=True).state_dict(),
    usd,
  )
  _assert_states_equal(
    AutoencoderKL.from_single_file(str(path), config=str(vcfg_dir), local_files_only=True).state_dict(), vsd
  )
  unet, vae = load_single_file(path, unet_config=ucfg, vae_config=vcfg)
  _assert_states_equal(unet, usd)
  _assert_states_equal(vae, vsd)
  assert load_single_file(path) == (None, None)

  # The same weights as an LDM-style .ckpt pickle: wrapped in "state_dict", with text-encoder and
  # EMA keys that belong to neither namespace, plus a non-tensor top-level entry.
  from safetensors.torch import load_file

  sd = dict(load_file(str(path)))
  sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
  sd["model_ema.decay"] = torch.tensor(0.9999)
  sd["model_ema.diffusion_modelconv_inweight"] = torch.zeros(1)
  ckpt = tmp_path / "both.ckpt"
  torch.save({"state_dict": sd, "global_step": 7}, ckpt)
  unet, vae = load_single_file(ckpt, unet_config=str(ucfg_dir), vae_config=str(vcfg_dir / "config.json"))
  _assert_states_equal(unet, usd)
  _assert_states_equal(vae, vsd)


def test_bfloat16_safetensors_and_ckpt(tmp_path):
  ml_dtypes = pytest.importorskip("ml_dtypes")
  _, cfg, sd = _vae("lpb1")
  bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  path = tmp_path / "vae_bf16.safetensors"
  save_single_file(path, vae_state=bf, vae_config=cfg)
  _, vae = load_single_file(path, vae_config=cfg)
  _assert_states_equal(vae, bf)

  from safetensors.torch import load_file

  tsd = load_file(str(path))
  assert next(iter(tsd.values())).dtype == torch.bfloat16
  ckpt = tmp_path / "vae_bf16.pt"
  torch.save(tsd, ckpt)
  _, vae = load_single_file(ckpt, vae_config=cfg)
  _assert_states_equal(vae, bf)


def test_standalone_vae_file_without_prefix(tmp_path):
  """Standalone LDM VAE files (vae-ft-mse-*.ckpt) keep encoder./decoder. at top level."""
  _, cfg, sd = _vae("lpb1")
  ldm = {k: torch.from_numpy(v) for k, v in vae_diffusers_to_ldm(sd, cfg).items()}
  ldm["loss.logvar"] = torch.zeros(())
  path = tmp_path / "vae.pt"
  torch.save({"state_dict": ldm}, path)
  _, vae = load_single_file(path, vae_config=cfg)
  _assert_states_equal(vae, sd)


# --------------------------------------------------------------------------------------
# 3) errors: missing / unexpected / mis-shaped keys and a config that does not match
# --------------------------------------------------------------------------------------


def test_missing_key_raises():
  _, cfg, sd = _unet("lpb1_conv_proj")
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  bad = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(CheckpointKeyError) as ei:
    unet_diffusers_to_ldm(bad, cfg)
  msg = str(ei.value)
  assert isinstance(ei.value, ValueError)
  assert "Missing keys (1)" in msg and key in msg
  assert "Unexpected" not in msg and "Mis-shaped" not in msg
  assert "block_out_channels=[32, 64]" in msg and "layers_per_block=[1, 1]" in msg
  assert ei.value.missing == [key]

  ldm = unet_diffusers_to_ldm(sd, cfg)
  lkey = "middle_block.1.proj_out.weight"
  del ldm[lkey]
  with pytest.raises(CheckpointKeyError, match=r"Missing keys \(1\):\n  middle_block\.1\.proj_out\.weight"):
    unet_ldm_to_diffusers(ldm, cfg)


def test_unexpected_key_raises():
  _, cfg, sd = _vae("lpb1")
  bad = dict(sd, **{"encoder.down_blocks.0.resnets.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointKeyError) as ei:
    vae_diffusers_to_ldm(bad, cfg)
  msg = str(ei.value)
  assert "Unexpected keys (1)" in msg and "encoder.down_blocks.0.resnets.0.extra.weight" in msg
  assert "Missing" not in msg
  assert "AutoencoderKL(" in msg and "layers_per_block=1" in msg
  assert ei.value.unexpected == ["encoder.down_blocks.0.resnets.0.extra.weight"]


def test_misshaped_key_raises():
  _, cfg, sd = _unet("lpb2_linear_proj_tl2")
  bad = dict(sd)
  bad["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  with pytest.raises(CheckpointKeyError) as ei:
    unet_diffusers_to_ldm(bad, cfg)
  msg = str(ei.value)
  assert "Mis-shaped keys (1)" in msg
  assert "conv_in.weight: expected (32, 4, 3, 3), found (32, 4, 1, 1)" in msg
  assert "Missing" not in msg and "Unexpected" not in msg


def test_vae_ldm_attention_must_be_conv_shaped():
  _, cfg, sd = _vae("lpb1")
  ldm = vae_diffusers_to_ldm(sd, cfg)
  ldm["decoder.mid.attn_1.q.weight"] = ldm["decoder.mid.attn_1.q.weight"][:, :, 0, 0]
  with pytest.raises(
    CheckpointKeyError,
    match=r"decoder\.mid\.attn_1\.q\.weight: expected \(64, 64, 1, 1\), "
    r"found \(64, 64\)",
  ):
    vae_ldm_to_diffusers(ldm, cfg)


def test_config_mismatch_raises():
  _, cfg1, sd1 = _unet("lpb1_conv_proj")
  cfg2 = dict(cfg1, layers_per_block=2)
  with pytest.raises(CheckpointKeyError) as ei:
    unet_diffusers_to_ldm(sd1, cfg2)
  msg = str(ei.value)
  assert "layers_per_block=[2, 2]" in msg
  assert "down_blocks.0.resnets.1.conv1.weight" in msg  # expected by cfg2, absent in the lpb=1 state
  assert "the config most likely does not describe this checkpoint" in msg

  # LDM side with the wrong config: the lpb=1 file numbers its blocks differently.
  ldm1 = unet_diffusers_to_ldm(sd1, cfg1)
  with pytest.raises(CheckpointKeyError) as ei:
    unet_ldm_to_diffusers(ldm1, cfg2)
  assert "input_blocks.5.0.in_layers.0.weight" in ei.value.missing

  # use_linear_projection flipped: same keys, proj_in/proj_out shapes differ.
  cfg3 = dict(cfg1, use_linear_projection=True)
  with pytest.raises(CheckpointKeyError) as ei:
    unet_diffusers_to_ldm(sd1, cfg3)
  assert not ei.value.missing and not ei.value.unexpected
  assert ("down_blocks.0.attentions.0.proj_in.weight", (32, 32), (32, 32, 1, 1)) in ei.value.mismatched

  _, vcfg1, vsd1 = _vae("lpb1")
  with pytest.raises(CheckpointKeyError, match=r"decoder\.up_blocks\.0\.resnets\.2\.conv1\.weight"):
    vae_diffusers_to_ldm(vsd1, dict(vcfg1, layers_per_block=2))


def test_load_single_file_errors(tmp_path):
  from safetensors.numpy import save_file

  _, cfg, sd = _unet("lpb1_conv_proj")
  _, vcfg, vsd = _vae("lpb1")
  ldm = {LDM_UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(sd, cfg).items()}

  # Unrelated namespaces are ignored ...
  ok = dict(ldm, **{"cond_stage_model.transformer.x": np.zeros(2, np.float32)})
  save_file(ok, str(tmp_path / "ok.safetensors"))
  unet, _ = load_single_file(tmp_path / "ok.safetensors", unet_config=cfg)
  _assert_states_equal(unet, sd)

  # ... but inside model.diffusion_model.* every key must map.
  extra = dict(ldm, **{LDM_UNET_PREFIX + "input_blocks.1.1.bogus.weight": np.zeros(2, np.float32)})
  save_file(extra, str(tmp_path / "extra.safetensors"))
  with pytest.raises(CheckpointKeyError, match=r"model\.diffusion_model\.input_blocks\.1\.1\.bogus\.weight"):
    load_single_file(tmp_path / "extra.safetensors", unet_config=cfg)

  # Asking for a VAE from a file that has none.
  with pytest.raises(CheckpointKeyError, match="has no keys starting with 'first_stage_model.'"):
    load_single_file(tmp_path / "ok.safetensors", unet_config=cfg, vae_config=vcfg)


def test_save_single_file_is_all_or_nothing(tmp_path):
  _, cfg, sd = _unet("lpb1_conv_proj")
  _, vcfg, vsd = _vae("lpb1")
  bad_vae = {k: v for k, v in vsd.items() if k != "quant_conv.bias"}
  path = tmp_path / "out.safetensors"
  with pytest.raises(CheckpointKeyError, match=r"quant_conv\.bias"):
    save_single_file(path, unet_state=sd, unet_config=cfg, vae_state=bad_vae, vae_config=vcfg)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match="together"):
    save_single_file(path, unet_state=sd)
  save_single_file(path, unet_state=sd, unet_config=cfg)
  assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_unsupported_config_is_rejected():
  with pytest.raises(ValueError, match="class_embed_type"):
    unet_key_map(dict(class_embed_type="timestep"))
  with pytest.raises(ValueError, match="UNetMidBlock2DSimpleCrossAttn"):
    unet_key_map(dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"))


def test_module_does_not_import_torch():
  code = (
    "import sys, mimajax.convert.sd_single_file as m; "
    "m.unet_key_map({}); m.vae_key_map({}); "
    "assert 'torch' not in sys.modules, 'torch imported'; "
    "assert 'diffusers' not in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
