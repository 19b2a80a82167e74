"""The CLIP vision encoder against transformers' on random weights, its folder format, and preprocessing."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nhwc, perturb_, rel_err
from mimajax.convert.clip_format import clip_to_torch_state, load_clip_vision, save_clip_vision, vision_state
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.models.clip_vision import CLIP_TINY, CLIPVisionConfig, CLIPVisionEncoder, preprocess
from mimajax.parity.clip import clip_parity

# transformers' CLIPVisionConfig kwargs of the tiny tower (activation and eps left at their defaults)
TINY = {k: v for k, v in dataclasses.asdict(CLIP_TINY).items() if k not in ("hidden_act", "layer_norm_eps")}
TINY_TEXT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=49408)


def _torch_vision(kind: str, seed: int = 0, **overrides):
  """A transformers CLIP model with random (perturbed) weights: 'vision', 'projection' or 'full'."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
  from transformers import CLIPVisionConfig as TorchConfig

  torch.manual_seed(seed)
  vision = TorchConfig(**{**TINY, **overrides})
  if kind == "full":
    # The top-level projection_dim (24) sizes visual_projection, not vision_config's (16).
    model = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=TINY_TEXT, projection_dim=24))
  else:
    model = (CLIPVisionModelWithProjection if kind == "projection" else CLIPVisionModel)(vision)
  return perturb_(model, seed).eval()


def _reference_outputs(model, pixels):
  import torch

  tower = model if not hasattr(model, "vision_model") else model.vision_model
  with torch.no_grad():
    out = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    embeds = model.visual_projection(out.pooler_output).numpy() if hasattr(model, "visual_projection") else None
  return out, embeds


@pytest.mark.parametrize(
  "kind, overrides",
  [
    ("projection", {}),
    ("vision", dict(hidden_act="gelu", layer_norm_eps=1e-6, image_size=36)),  # 36 px: a 4-px remainder the conv drops
    ("full", dict(num_attention_heads=2)),
  ],
  ids=["quick_gelu_with_projection", "gelu_no_projection_v5_keys", "full_clip_model_folder"],
)
def test_clip_vision_matches_transformers(tmp_path, kind, overrides):
  ref = _torch_vision(kind, **overrides)
  ref.save_pretrained(tmp_path)
  ours = load_clip_vision(tmp_path)
  assert ours.with_projection == (kind != "vision")
  size = ours.config.image_size
  pixels = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
  want, want_embeds = _reference_outputs(ref, pixels)
  got = ours(jnp.asarray(nhwc(pixels)))
  assert len(got.hidden_states) == len(want.hidden_states) == ours.config.num_hidden_layers + 1
  for a, b in zip(got.hidden_states, want.hidden_states):
    assert rel_err(a, b.numpy()) < 1e-5
  assert rel_err(got.last_hidden_state, want.last_hidden_state.numpy()) < 1e-5
  assert rel_err(got.e_id, want.pooler_output.numpy()) < 1e-5
  np.testing.assert_array_equal(got.e_tex, got.last_hidden_state[:, 1:])
  if kind == "vision":
    assert got.image_embeds is None
  else:
    assert got.image_embeds.shape == (2, 24 if kind == "full" else 16)
    assert rel_err(got.image_embeds, want_embeds) < 1e-5


def test_legacy_bin_with_position_ids_loads(tmp_path):
  """transformers 4.x .bin checkpoints: `vision_model.` keys and a persistent position_ids buffer."""
  import torch

  ref = _torch_vision("projection", seed=3)
  state = dict(ref.state_dict())
  state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
  torch.save(state, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
  ours = load_clip_vision(tmp_path)
  pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
  want, embeds = _reference_outputs(ref, pixels)
  got = ours(jnp.asarray(nhwc(pixels)))
  assert rel_err(got.e_id, want.pooler_output.numpy()) < 1e-5
  assert rel_err(got.image_embeds, embeds) < 1e-5


@pytest.mark.parametrize("with_projection", [True, False], ids=["with_projection", "no_projection"])
def test_round_trip_is_exact_through_transformers(tmp_path, with_projection):
  import torch
  from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

  cfg = CLIPVisionConfig(**{**TINY, "hidden_act": "gelu"})
  ours = CLIPVisionEncoder(cfg, with_projection=with_projection, rngs=nnx.Rngs(5))
  saved = save_clip_vision(ours, tmp_path / "ours")
  torch_cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
  ref, info = torch_cls.from_pretrained(saved, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ours_state = clip_to_torch_state(ours)
  theirs = vision_state({k: v.numpy() for k, v in ref.state_dict().items()})
  assert sorted(theirs) == sorted(ours_state)
  for k, v in ours_state.items():
    np.testing.assert_array_equal(theirs[k], v, err_msg=k)
  ref.save_pretrained(tmp_path / "theirs")
  back = load_clip_vision(tmp_path / "theirs")
  assert back.config == cfg and back.with_projection == with_projection
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(back))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
  pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
  assert rel_err(ours(jnp.asarray(nhwc(pixels))).last_hidden_state, want) < 1e-5


def test_clip_parity_function_reports_small_error():
  lines = []
  assert clip_parity("tiny", log=lines.append) < 1e-5
  assert any("image_embeds" in line for line in lines) and any("hidden_states[2]" in line for line in lines)


def test_config_round_trips_and_reads_full_clip_configs():
  cfg = CLIPVisionConfig(**TINY, hidden_act="gelu")
  assert CLIPVisionConfig.from_transformers(cfg.to_transformers()) == cfg
  full = {"model_type": "clip", "projection_dim": 768, "vision_config": {**TINY, "projection_dim": 512}}
  assert CLIPVisionConfig.from_transformers(full).projection_dim == 768
  with pytest.raises(ValueError, match="not a CLIP vision model"):
    CLIPVisionConfig.from_transformers({"model_type": "siglip_vision_model"})
  with pytest.raises(ValueError, match="hidden_act 'relu' not supported"):
    CLIPVisionConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
    CLIPVisionConfig(hidden_size=30, num_attention_heads=4)


def test_jit_and_bf16_compute():
  model = CLIPVisionEncoder(CLIPVisionConfig(**TINY), with_projection=True, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  eager = model(images)
  jitted = nnx.jit(lambda m, x: m(x))(model, images)
  np.testing.assert_allclose(jitted.e_id, eager.e_id, rtol=1e-5, atol=1e-6)
  assert jitted.e_tex.shape == (2, 16, 32)
  bf16 = CLIPVisionEncoder(CLIPVisionConfig(**TINY), with_projection=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  out = bf16(images)
  assert out.last_hidden_state.dtype == jnp.float32
  assert rel_err(out.last_hidden_state, eager.last_hidden_state) < 3e-2


@pytest.mark.parametrize("shape", [(300, 260), (180, 240)], ids=["portrait_downscale", "landscape_upscale"])
def test_preprocess_matches_clip_image_processor(shape):
  """Pixel noise (the worst case for resampling) within one uint8 level (0.015 after /std) of PIL's."""
  from transformers import CLIPImageProcessorPil  # CLIPImageProcessor without torchvision

  images = np.random.default_rng(0).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
  want = nhwc(processor(images=list(images), return_tensors="np")["pixel_values"])
  got = np.asarray(preprocess(images, 224))
  assert got.shape == want.shape == (2, 224, 224, 3)
  diff = np.abs(got - want)
  assert diff.max() < 0.016 and (diff > 1e-5).mean() < 2e-3, (diff.max(), (diff > 1e-5).mean())
  from_float = np.asarray(preprocess(images.astype(np.float32) / 255, 224))
  assert np.abs(from_float - got).max() < 0.016 and (np.abs(from_float - got) > 1e-5).mean() < 1e-3  # ties
  smooth = np.asarray(preprocess(images, 224, round_to_uint8=False))  # no rounding: off by under a level everywhere
  assert np.abs(smooth - want).max() < 0.02
  grad = jax.grad(lambda x: preprocess(x, 224, round_to_uint8=False).sum())(jnp.asarray(images[:1] / 255.0))
  assert (np.asarray(grad) != 0).mean() > 0.5  # rounding would zero every gradient


def test_load_rejects_mismatched_config_and_missing_or_extra_keys(tmp_path):
  from safetensors.numpy import load_file, save_file

  ref = _torch_vision("projection")
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  weights = load_file(tmp_path / "model.safetensors")

  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(CheckpointKeyError, match="mis-shaped keys") as info:
    load_clip_vision(tmp_path)
  assert ("vision_model.encoder.layers.0.mlp.fc1.weight", (40, 32), (37, 32)) in info.value.mismatched
  assert not info.value.missing and not info.value.unexpected
  (tmp_path / "config.json").write_text(json.dumps(config))

  broken = {k: v for k, v in weights.items() if k != "vision_model.encoder.layers.1.self_attn.q_proj.bias"}
  broken["text_model.embeddings.token_embedding.weight"] = np.zeros((4, 4), np.float32)
  save_file(broken, tmp_path / "model.safetensors")
  with pytest.raises(CheckpointKeyError) as info:
    load_clip_vision(tmp_path)
  assert info.value.missing == ["vision_model.encoder.layers.1.self_attn.q_proj.bias"]
  assert info.value.unexpected == ["text_model.embeddings.token_embedding.weight"]  # only a CLIPModel has a text tower

  save_file({k: v for k, v in weights.items() if k != "visual_projection.weight"}, tmp_path / "model.safetensors")
  with pytest.raises(CheckpointKeyError, match="visual_projection.weight"):
    load_clip_vision(tmp_path)  # the config says CLIPVisionModelWithProjection
  assert load_clip_vision(tmp_path, with_projection=False).visual_projection is None

  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(CheckpointReadError, match="no weights"):
    load_clip_vision(tmp_path)


def test_encoder_and_preprocess_reject_bad_images():
  model = CLIPVisionEncoder(CLIPVisionConfig(**TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\).*17-entry position table"):
    model(jnp.ones((1, 3, 32, 32)))  # channels-first
  with pytest.raises(ValueError, match="position table"):
    model(jnp.ones((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    preprocess(jnp.ones((64, 64, 3)), 32)
  with pytest.raises(ValueError, match="uint8 images"):
    preprocess(jnp.ones((1, 64, 64, 3), jnp.int32), 32)
