"""MIA appearance adapter: shapes of both variants, zero-init identity, coefficient layout, release parity."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import perturb_, rel_err
from mimajax.mimaface.mia import (
  RELEASE_TOKEN_ORDER,
  MIAConfig,
  MotionIdentityAdapter,
  ReleaseMIA,
  build_mia,
  drop_condition,
  split_clip_tokens,
  split_coefficients,
)

TINY = MIAConfig(
  clip_dim=32, cross_attention_dim=24, num_heads=4, face_recognition_dim=50, clip_tokens=5, release_heads=2
)


def _inputs(b=2, seed=0, cfg=TINY, frames=None):
  k = jax.random.split(jax.random.key(seed), 3)
  lead = (b,) if frames is None else (b, frames)
  hidden = jax.random.normal(k[0], (b, cfg.clip_tokens, cfg.clip_dim))
  face = jax.random.normal(k[1], (b, cfg.face_recognition_dim))
  coeffs = jax.random.normal(k[2], lead + (261,))
  return hidden, face, coeffs


def test_split_coefficients_follows_deep3dfacerecon_layout():
  coeffs = jnp.arange(2 * 261, dtype=jnp.float32).reshape(2, 261)
  groups = split_coefficients(coeffs)
  widths = {k: v.shape[-1] for k, v in groups.items()}
  assert widths == dict(identity=80, expression=64, texture=80, angle=3, gamma=27, translation=3, gaze=4)
  assert groups["angle"][0].tolist() == [224, 225, 226]
  assert groups["translation"][0].tolist() == [254, 255, 256]
  assert groups["gaze"][1].tolist() == [261 + 257, 261 + 258, 261 + 259, 261 + 260]
  assert "gaze" not in split_coefficients(coeffs[:, :257])


@pytest.mark.parametrize("width", [256, 258, 262])
def test_coefficient_width_error_names_got_and_accepted(width):
  with pytest.raises(ValueError, match=rf"{width} columns.*257.*261"):
    split_coefficients(jnp.zeros((1, width)))


def test_paper_output_shape_image_and_video():
  model = MotionIdentityAdapter(TINY, rngs=nnx.Rngs(0))
  hidden, _, coeffs = _inputs()
  e_tex, e_id = split_clip_tokens(hidden)
  assert model(e_tex, e_id, coeffs).shape == (2, TINY.clip_tokens, TINY.cross_attention_dim)  # P + 1 tokens
  _, _, clip_coeffs = _inputs(frames=3)
  assert model(e_tex, e_id, clip_coeffs).shape == (2, 3, TINY.clip_tokens, TINY.cross_attention_dim)


def test_paper_video_mode_is_image_mode_per_frame():
  model = MotionIdentityAdapter(TINY, rngs=nnx.Rngs(0))
  model.motion_attn.to_out.kernel[...] = 0.3 * jax.random.normal(
    jax.random.key(5), model.motion_attn.to_out.kernel.shape
  )
  hidden, _, coeffs = _inputs(frames=3)
  e_tex, e_id = split_clip_tokens(hidden)
  video = model(e_tex, e_id, coeffs)
  for f in range(3):
    np.testing.assert_allclose(video[:, f], model(e_tex, e_id, coeffs[:, f]), atol=1e-5)


def test_paper_at_init_output_depends_only_on_clip_tokens():
  model = MotionIdentityAdapter(TINY, rngs=nnx.Rngs(0))
  hidden, _, coeffs = _inputs()
  e_tex, e_id = split_clip_tokens(hidden)
  a = model(e_tex, e_id, coeffs)
  b = model(e_tex, e_id, 10.0 * coeffs[::-1] + 3.0)
  np.testing.assert_array_equal(a, b)
  # The motion path is live once its zero-initialised output projection moves.
  model.motion_attn.to_out.kernel[...] = jax.random.normal(jax.random.key(1), model.motion_attn.to_out.kernel.shape)
  assert float(jnp.abs(model(e_tex, e_id, coeffs) - model(e_tex, e_id, 10.0 * coeffs[::-1] + 3.0)).max()) > 1e-3


def test_paper_dict_motion_equals_coefficients_and_missing_gaze_is_zero():
  model = MotionIdentityAdapter(TINY, rngs=nnx.Rngs(0))
  model.motion_attn.to_out.kernel[...] = jax.random.normal(jax.random.key(1), model.motion_attn.to_out.kernel.shape)
  hidden, _, coeffs = _inputs()
  e_tex, e_id = split_clip_tokens(hidden)
  ref = model(e_tex, e_id, coeffs)
  g = split_coefficients(coeffs)
  pose = jnp.concatenate([g["angle"], g["translation"]], -1)
  np.testing.assert_allclose(model(e_tex, e_id, g), ref, atol=1e-6)
  np.testing.assert_allclose(
    model(e_tex, e_id[:, None], dict(pose=pose, expression=g["expression"], gaze=g["gaze"])), ref, atol=1e-6
  )
  no_gaze = model(e_tex, e_id, coeffs[:, :257])
  np.testing.assert_allclose(no_gaze, model(e_tex, e_id, coeffs.at[:, 257:].set(0.0)), atol=1e-6)
  assert float(jnp.abs(no_gaze - ref).max()) > 1e-4


def test_paper_bad_inputs_raise():
  model = MotionIdentityAdapter(TINY, rngs=nnx.Rngs(0))
  hidden, _, coeffs = _inputs()
  e_tex, e_id = split_clip_tokens(hidden)
  with pytest.raises(ValueError, match="e_tex"):
    model(e_tex[..., :8], e_id, coeffs)
  with pytest.raises(ValueError, match="e_id"):
    model(e_tex, e_id[:1], coeffs)
  with pytest.raises(ValueError, match="expression"):
    model(e_tex, e_id, dict(pose=jnp.zeros((2, 6))))
  with pytest.raises(ValueError, match="'gaze'.*expected last dimension 4"):
    model(e_tex, e_id, dict(pose=jnp.zeros((2, 6)), expression=jnp.zeros((2, 64)), gaze=jnp.zeros((2, 2))))
  with pytest.raises(ValueError, match="variant"):
    MIAConfig(variant="v2")


def test_release_output_shape_and_token_count():
  model = build_mia(dataclasses.replace(TINY, variant="release"), rngs=nnx.Rngs(0))
  assert isinstance(model, ReleaseMIA)
  hidden, face, coeffs = _inputs()
  out = model(hidden, face, coeffs)
  assert out.shape == (2, TINY.release_tokens, TINY.cross_attention_dim)
  assert TINY.release_tokens == len(RELEASE_TOKEN_ORDER) - 1 + TINY.clip_tokens
  with pytest.raises(ValueError, match="missing.*gaze"):
    model(hidden, face, coeffs[:, :257])
  with pytest.raises(ValueError, match="face_features"):
    model(hidden, face[:, :10], coeffs)


def test_release_video_mode_averages_frames():
  model = ReleaseMIA(TINY, rngs=nnx.Rngs(0))
  hidden, face, coeffs = _inputs(frames=3)
  video = model(hidden, face, coeffs)
  assert video.shape == (2, TINY.release_tokens, TINY.cross_attention_dim)
  frames = jnp.stack([model(hidden, face, coeffs[:, f]) for f in range(3)], 1)
  np.testing.assert_allclose(video, frames.mean(1), atol=1e-5)
  # Per-frame source inputs equal to broadcast ones give the same result.
  per_frame = model(jnp.repeat(hidden[:, None], 3, 1), jnp.repeat(face[:, None], 3, 1), coeffs)
  np.testing.assert_allclose(per_frame, video, atol=1e-5)


# The official post-fuse module's parameter shapes (PyTorch, `mim.pth`), for the default sizes.
OFFICIAL_SHAPES = {
  "transform_dim_clip.weight": (768, 1024),
  "transform_dim_arcface.weight": (768, 25088),
  "transform_dim_gaze.weight": (768, 4),
  "transform_dim_exp.weight": (768, 64),
  "transform_dim_tex.weight": (768, 80),
  "transform_dim_gamma.weight": (768, 27),
  "transform_dim_angles.weight": (768, 3),
  "transform_dim_translation.weight": (768, 3),
  "layer_norm.weight": (768,),
  **{f"mapper.resblocks.{i}.attn.c_qkv.weight": (2304, 768) for i in range(3)},
  **{f"mapper.resblocks.{i}.attn.c_proj.weight": (768, 768) for i in range(3)},
  **{f"mapper.resblocks.{i}.mlp.c_fc.weight": (3072, 768) for i in range(3)},
  **{f"mapper.resblocks.{i}.mlp.c_proj.weight": (768, 3072) for i in range(3)},
  **{f"mapper.resblocks.{i}.ln_{j}.weight": (768,) for i in range(3) for j in (1, 2)},
}


def _torch_key(path):
  *mods, leaf = (str(p) for p in path)
  return ".".join(mods) + "." + ("weight" if leaf in ("kernel", "scale") else "bias")


def test_release_default_parameters_match_official_shapes():
  abstract = nnx.eval_shape(lambda: ReleaseMIA(MIAConfig(variant="release"), rngs=nnx.Rngs(0)))
  ours = {_torch_key(p): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  weights = {k: (s[::-1] if len(s) == 2 else s) for k, s in ours.items() if k.endswith(".weight")}
  assert weights == OFFICIAL_SHAPES
  assert len(ours) == 2 * len(OFFICIAL_SHAPES)  # one bias per weight


def _torch_release(cfg, seed):
  """A PyTorch reference with the release's structure: Linear per input, fused per-head qkv blocks, LayerNorm."""
  import torch
  from torch import nn

  d, heads = cfg.cross_attention_dim, cfg.release_heads

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.attn, self.mlp = nn.Module(), nn.Module()
      self.attn.c_qkv, self.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.attn.c_qkv(self.ln_1(x)).view(b, t, heads, -1).split(d // heads, dim=-1)
      w = torch.softmax(torch.einsum("bthc,bshc->bhts", q, k) / math.sqrt(d // heads), dim=-1)
      x = x + self.attn.c_proj(torch.einsum("bhts,bshc->bthc", w, v).reshape(b, t, d))
      return x + self.mlp.c_proj(nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))

  class Release(nn.Module):
    def __init__(self):
      super().__init__()
      self.transform_dim_clip = nn.Linear(cfg.clip_dim, d)
      self.transform_dim_arcface = nn.Linear(cfg.face_recognition_dim, d)
      for name, w in [("gaze", 4), ("exp", 64), ("tex", 80), ("gamma", 27), ("angles", 3), ("translation", 3)]:
        setattr(self, f"transform_dim_{name}", nn.Linear(w, d))
      self.mapper = nn.Module()
      self.mapper.resblocks = nn.ModuleList([Block() for _ in range(cfg.release_layers)])
      self.layer_norm = nn.LayerNorm(d)

    def forward(self, clip, face, coeffs):
      parts = [coeffs[:, a:b] for a, b in [(257, 261), (80, 144), (144, 224), (227, 254), (224, 227), (254, 257)]]
      names = ["gaze", "exp", "tex", "gamma", "angles", "translation"]
      tokens = [self.transform_dim_arcface(face)[:, None]]
      tokens += [getattr(self, f"transform_dim_{n}")(p)[:, None] for n, p in zip(names, parts)]
      x = torch.cat(tokens + [self.transform_dim_clip(clip)], dim=1)
      for block in self.mapper.resblocks:
        x = block(x)
      return self.layer_norm(x)

  torch.manual_seed(seed)
  return perturb_(Release(), seed).eval()


def _load_torch(model, torch_model):
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  assert {_torch_key(p) for p, _ in flat} == set(state)
  for path, var in flat:
    value = state[_torch_key(path)]
    var[...] = jnp.asarray(value.T if path[-1] == "kernel" else value)
  nnx.update(model, params)


def test_release_matches_torch_reference():
  import torch

  model = ReleaseMIA(TINY, rngs=nnx.Rngs(0))
  ref = _torch_release(TINY, seed=3)
  _load_torch(model, ref)
  hidden, face, coeffs = _inputs(b=2, seed=4)
  with torch.no_grad():
    expected = ref(*(torch.from_numpy(np.array(x)) for x in (hidden, face, coeffs))).numpy()
  assert rel_err(model(hidden, face, coeffs), expected) < 1e-5
  # Video mode: the release runs (b f) frames and averages over f.
  hidden, face, coeffs = _inputs(b=1, seed=5, frames=3)
  with torch.no_grad():
    per_frame = [ref(*(torch.from_numpy(np.array(x)) for x in (hidden, face, coeffs[:, f]))) for f in range(3)]
  expected = torch.stack(per_frame, 1).mean(1).numpy()
  assert rel_err(model(hidden, face, coeffs), expected) < 1e-5


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_bf16_compute_close_to_fp32(variant):
  cfg = dataclasses.replace(TINY, variant=variant)
  f32, bf16 = (build_mia(cfg, dtype=d, rngs=nnx.Rngs(0)) for d in (jnp.float32, jnp.bfloat16))
  hidden, face, coeffs = _inputs()
  args = split_clip_tokens(hidden) if variant == "paper" else (hidden, face)
  out = bf16(*args, coeffs)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out.astype(jnp.float32), f32(*args, coeffs)) < 3e-2


def test_drop_condition_fraction_and_kept_samples():
  cond = jnp.ones((20000, 3, 2))
  dropped = jax.jit(drop_condition)(jax.random.key(0), cond, 0.1)
  zero = np.asarray((dropped == 0).all(axis=(1, 2)))
  assert abs(zero.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(dropped)[~zero], 1.0)
  assert not (drop_condition(jax.random.key(0), cond, 0.0) == 0).any()
  assert (drop_condition(jax.random.key(0), cond, 1.0) == 0).all()
  other = np.asarray((drop_condition(jax.random.key(1), cond, 0.1) == 0).all(axis=(1, 2)))
  assert (other != zero).any()
