"""AnimateDiff motion modules and the video U-Net against diffusers' UNetMotionModel / MotionAdapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_UNET, perturb_, rel_err
from mimajax.convert import animatediff_format as ad
from mimajax.errors import CheckpointKeyError
from mimajax.models.motion_module import MotionModule, sinusoidal_positions
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MOTION_PARAMS, MotionConfig, UNetMotionConfig, UNetMotionModel

B, F, SIDE, SEQ = 2, 5, 16, 7  # one shape everywhere: eager JAX compiles each op once per shape


def _config(**motion):
  return UNetMotionConfig.from_unet(UNetConfig(**TINY_UNET), MotionConfig(**motion))


def _inputs(seed=0, per_frame_context=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, F, SIDE, SIDE, 4), dtype=np.float32)
  t = np.array([17, 803])
  ctx_shape = (B, F, SEQ, 32) if per_frame_context else (B, SEQ, 32)
  return x, t, rng.standard_normal(ctx_shape, dtype=np.float32)


def _torch_forward(ref, x, t, ctx):
  """diffusers takes (B, C, F, H, W) latents and one context row per frame; returns ours' (B, F, H, W, C)."""
  import torch

  ctx = ctx.reshape(B * F, SEQ, -1) if ctx.ndim == 4 else np.repeat(ctx, F, axis=0)
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 4, 1)


def _flat(model, filt=nnx.Param):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


def _assert_same_state(got, want):
  """Weights bit for bit; positional tables (recomputed, not stored) to float32 rounding."""
  for k in want:
    if k.endswith(".pe"):
      np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
    else:
      assert np.array_equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """build(use_motion_mid_block) -> (perturbed diffusers UNetMotionModel, its saved folder, mimajax's load of it)."""
  import torch
  from diffusers import UNetMotionModel as TorchUNetMotion

  cache = {}

  def build(use_motion_mid_block):
    if use_motion_mid_block not in cache:
      torch.manual_seed(0)
      config = _config(use_motion_mid_block=use_motion_mid_block).to_diffusers()
      ref = perturb_(TorchUNetMotion(**config), seed=int(use_motion_mid_block)).eval()
      folder = tmp_path_factory.mktemp(f"unet_motion_{use_motion_mid_block}")
      ref.save_pretrained(folder)
      cache[use_motion_mid_block] = ref, folder, ad.load_unet_motion(folder)
    return cache[use_motion_mid_block]

  return build


@pytest.mark.parametrize("use_motion_mid_block,per_frame_context", [(True, True), (False, False)])
def test_unet_motion_matches_diffusers(reference, use_motion_mid_block, per_frame_context):
  ref, _, ours = reference(use_motion_mid_block)
  assert ours.config.motion.use_motion_mid_block == use_motion_mid_block
  assert (ours.mid_block.motion_modules is not None) == use_motion_mid_block
  x, t, ctx = _inputs(1, per_frame_context)
  want = _torch_forward(ref, x, t, ctx)
  got = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  assert rel_err(got, want) < 1e-5


def test_saved_unet_motion_loads_in_diffusers_unchanged(reference, tmp_path):
  from diffusers import UNetMotionModel as TorchUNetMotion

  ref, _, ours = reference(True)
  ad.save_unet_motion(ours, tmp_path / "out")
  back = TorchUNetMotion.from_pretrained(tmp_path / "out")
  want = ref.state_dict()
  got = back.state_dict()
  assert got.keys() == want.keys()
  _assert_same_state({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in want.items()})


def test_fresh_motion_modules_leave_the_image_unet_per_frame(reference):
  image = reference(True)[2].spatial_unet()
  assert isinstance(image, UNet2DConditionModel) and not isinstance(image, UNetMotionModel)
  video = UNetMotionModel.from_unet2d(image, MotionConfig(use_motion_mid_block=True), rngs=nnx.Rngs(3))
  motion = _flat(video, MOTION_PARAMS)
  zero = [p for p in motion if p[-2] == "proj_out" and p[-3] != "ff"]
  assert len(zero) == 2 * (4 + 6 + 1) and all(not motion[p].any() for p in zero)  # kernel + bias per module
  assert any(motion[p].any() for p in motion if p not in zero)
  x, t, ctx = _inputs(2, per_frame_context=True)
  got = video(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  frames = image(
    jnp.asarray(x.reshape(B * F, SIDE, SIDE, 4)), jnp.asarray(np.repeat(t, F)), jnp.asarray(ctx.reshape(B * F, SEQ, 32))
  )
  assert rel_err(got, np.asarray(frames).reshape(got.shape)) < 1e-6
  # A shared context means the same context on every frame.
  shared = video(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx[:, 0]))
  per_frame = video(jnp.asarray(x), jnp.asarray(t), jnp.asarray(np.repeat(ctx[:, :1], F, axis=1)))
  assert rel_err(shared, per_frame) < 1e-6


def test_motion_module_positions_gradients_and_clip_length():
  module = MotionModule(16, heads=8, norm_num_groups=8, max_seq_length=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2 * 3, 2, 2, 16))
  assert np.array_equal(module(x, 3), x)  # zero proj_out: identity
  graphdef, params = nnx.split(module, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x, 3)))))(params)
  assert float(jnp.abs(grads["proj_out"]["kernel"][...]).sum()) > 0  # training can leave the zero init
  # Temporal attention ignores "blockwise" (F x F scores are tiny; see temporal_implementation).
  module.proj_out.kernel[...] = jax.random.normal(jax.random.key(1), (16, 16))
  blockwise = MotionModule(16, heads=8, norm_num_groups=8, implementation="blockwise", rngs=nnx.Rngs(0))
  nnx.update(blockwise, nnx.state(module, nnx.Param))
  assert rel_err(blockwise(x, 3), module(x, 3)) < 1e-6 and rel_err(module(x, 3), x) > 1e-2
  with pytest.raises(ValueError, match=r"5 frames.*max_seq_length=4"):
    module(jnp.zeros((5, 2, 2, 16)), 5)
  with pytest.raises(ValueError, match="whole number of 4-frame clips"):
    module(jnp.zeros((6, 2, 2, 16)), 4)
  from diffusers.models.embeddings import SinusoidalPositionalEmbedding

  pe = SinusoidalPositionalEmbedding(40, max_seq_length=32).pe[0].numpy()
  np.testing.assert_allclose(sinusoidal_positions(32, 40), pe, atol=1e-6)


def test_unet_motion_rejects_long_clips_and_bad_context(reference):
  model = reference(False)[2]
  with pytest.raises(ValueError, match=r"33 frames.*max_seq_length=32"):
    model(jnp.zeros((1, 33, 8, 8, 4)), jnp.array(1), jnp.zeros((1, 3, 32)))
  with pytest.raises(ValueError, match=r"video latents \(B, F, H, W, 4\)"):
    model(jnp.zeros((1, 8, 8, 4)), jnp.array(1), jnp.zeros((1, 3, 32)))
  with pytest.raises(ValueError, match="per-frame encoder_hidden_states have 2 frames; the latents have 3"):
    model(jnp.zeros((1, 3, 8, 8, 4)), jnp.array(1), jnp.zeros((1, 2, 3, 32)))
  with pytest.raises(ValueError, match="encoder_hidden_states must be"):
    model(jnp.zeros((1, 3, 8, 8, 4)), jnp.array(1), jnp.zeros((2, 3, 32)))


def test_motion_adapter_and_original_checkpoint_load_identically(torch_unet_factory, tmp_path):
  import torch
  from diffusers import MotionAdapter
  from diffusers import UNetMotionModel as TorchUNetMotion
  from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

  unet, unet_folder = torch_unet_factory()
  torch.manual_seed(1)
  adapter = MotionAdapter(
    block_out_channels=(32, 64),
    motion_layers_per_block=2,
    motion_transformer_layers_per_block=(1, 2),
    motion_transformer_layers_per_mid_block=2,
    motion_norm_num_groups=8,
    motion_max_seq_length=24,  # as AnimateDiff v1
    use_motion_mid_block=True,
  )
  perturb_(adapter, seed=5).eval()
  adapter.save_pretrained(tmp_path / "adapter")
  adapter_state = {k: v.numpy() for k, v in adapter.state_dict().items()}

  # The inverse map, checked against diffusers' own original -> diffusers conversion.
  original = ad.motion_state_to_original(adapter_state)
  assert (
    "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight"
    in original
  )
  assert "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.ff_norm.bias" in original
  assert (
    "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.1.attention_blocks.0.pos_encoder.pe" in original
  )
  back = convert_animatediff_checkpoint_to_diffusers(original)
  assert back.keys() == {k for k in adapter_state if not k.endswith(".pe")}
  assert all(np.array_equal(back[k], adapter_state[k]) for k in back)
  torch.save({k: torch.from_numpy(v) for k, v in original.items()}, tmp_path / "mm.ckpt")

  from_adapter = ad.load_motion_adapter(unet_folder, tmp_path / "adapter")
  from_ckpt = ad.load_animatediff_checkpoint(unet_folder, tmp_path / "mm.ckpt")
  assert from_adapter.config == from_ckpt.config
  assert from_ckpt.config.motion == MotionConfig(8, (1, 2), 2, 24, True).per_block(2)
  a, c = _flat(from_adapter), _flat(from_ckpt)
  assert a.keys() == c.keys() and all(np.array_equal(a[k], c[k]) for k in a)

  ref = TorchUNetMotion.from_unet2d(unet, adapter).eval()
  x, t, ctx = _inputs(3)
  got = from_adapter(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  assert rel_err(got, _torch_forward(ref, x, t, ctx)) < 1e-5

  # Export: MotionAdapter folder and original layout reproduce the inputs exactly.
  ad.save_motion_adapter(from_ckpt, tmp_path / "exported")
  exported = MotionAdapter.from_pretrained(tmp_path / "exported").state_dict()
  assert exported.keys() == adapter_state.keys()
  _assert_same_state({k: v.numpy() for k, v in exported.items()}, adapter_state)
  ad.save_animatediff_checkpoint(from_adapter, tmp_path / "mm.safetensors")
  again = ad.read_animatediff_checkpoint(tmp_path / "mm.safetensors")
  assert again.keys() == original.keys()
  _assert_same_state(again, original)


def test_checkpoint_key_mismatches_are_reported(reference, tmp_path):
  from safetensors.numpy import save_file

  model = reference(False)[2]
  config, state = model.config, ad.unet_motion_to_torch_state(model)
  pe = "down_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe"
  gone = "up_blocks.0.motion_modules.2.transformer_blocks.0.attn2.to_k.weight"
  bad = {k: v for k, v in state.items() if k != gone}
  bad["up_blocks.0.motion_modules.2.transformer_blocks.0.attn3.to_k.weight"] = state[gone]
  bad[pe] = state[pe][:, :16]
  with pytest.raises(CheckpointKeyError) as err:
    ad.unet_motion_from_torch_state(config, bad)
  assert err.value.missing == [gone]
  assert err.value.unexpected == ["up_blocks.0.motion_modules.2.transformer_blocks.0.attn3.to_k.weight"]
  assert err.value.mismatched == [(pe, (1, 32, 64), (1, 16, 64))]
  with pytest.raises(CheckpointKeyError, match="not the sinusoidal table"):
    ad.unet_motion_from_torch_state(config, {**state, pe: state[pe] + 0.1})
  # A motion-module file must not carry spatial weights (they would silently replace the U-Net's).
  motion = ad.motion_state_to_original({k: v for k, v in state.items() if ".motion_modules." in k})
  save_file({**motion, "conv_in.weight": state["conv_in.weight"]}, str(tmp_path / "mm.safetensors"))
  with pytest.raises(CheckpointKeyError, match=r"outside the motion modules.*conv_in\.weight"):
    ad.load_animatediff_checkpoint(model.spatial_unet(), tmp_path / "mm.safetensors")
  with pytest.raises(ValueError, match="motion_layers_per_block 1 != the U-Net's layers_per_block"):
    ad.motion_config_from_adapter(
      {"block_out_channels": [32, 64], "motion_layers_per_block": 1}, UNetConfig(**TINY_UNET)
    )


def test_motion_config_round_trip_and_refusals():
  from diffusers import UNetMotionModel as TorchUNetMotion

  cfg = _config(num_attention_heads=(4, 8), transformer_layers_per_block=(1, 2), max_seq_length=16)
  assert UNetMotionConfig.from_diffusers(cfg.to_diffusers()) == cfg
  assert cfg.spatial() == UNetConfig(**TINY_UNET)
  # MOTION_PARAMS (stage 2's trainable set) is exactly diffusers' motion-module tensors, tables aside.
  abstract = nnx.eval_shape(lambda: UNetMotionModel(cfg, rngs=nnx.Rngs(0)))
  key_map = ad.UNET_MOTION.key_map(abstract)
  selected = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, MOTION_PARAMS))}
  want = {
    k for k in TorchUNetMotion(**cfg.to_diffusers()).state_dict() if "motion_modules" in k and not k.endswith(".pe")
  }
  assert {k for k in key_map.entries if "motion_modules" in k} == want
  assert len(selected) == len(want)
  with pytest.raises(ValueError, match="UNetMotionModel cannot express"):
    UNetMotionConfig(**TINY_UNET, num_class_embeds=4)
  with pytest.raises(ValueError, match="unsupported UNetMotionModel config values"):
    UNetMotionConfig.from_diffusers({**cfg.to_diffusers(), "addition_embed_type": "text_time"})
  with pytest.raises(ValueError, match="per-layer"):
    UNetMotionConfig.from_diffusers({**cfg.to_diffusers(), "temporal_transformer_layers_per_block": [[1, 2], [1, 2]]})
  with pytest.raises(ValueError, match="needs a UNetMotionConfig"):
    UNetMotionModel(UNetConfig(**TINY_UNET), rngs=nnx.Rngs(0))
