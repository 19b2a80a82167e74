"""The Flax SD U-Net against diffusers' UNet2DConditionModel on random weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import nchw, nhwc, rel_err
from mimajax.convert.diffusers_format import load_unet
from mimajax.models.attention import blockwise_attention
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig

VARIANTS = {
  "sd1_tiny": {},
  "sd2_linear_proj_per_block_heads": dict(
    use_linear_projection=True,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=2,
    upcast_attention=True,
  ),
  "three_blocks_layers1_scale_shift": dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    resnet_time_scale_shift="scale_shift",
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
  ),
  "inpaint_9ch_upscaler_knobs": dict(
    in_channels=9,
    num_class_embeds=10,
    only_cross_attention=(True, False),
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.5,
  ),
}


def _run_both(torch_model, ours, x, t, ctx, class_labels=None):
  import torch

  with torch.no_grad():
    kw = {"class_labels": torch.from_numpy(class_labels)} if class_labels is not None else {}
    want = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample.numpy()
  kw = {"class_labels": jnp.asarray(class_labels)} if class_labels is not None else {}
  got = nchw(ours(jnp.asarray(nhwc(x)), jnp.asarray(t), jnp.asarray(ctx), **kw))
  return got, want


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attention_impl", ["xla", "blockwise"])
def test_unet_matches_diffusers(torch_unet_factory, variant, attention_impl):
  overrides = VARIANTS[variant]
  ref, folder = torch_unet_factory(**overrides)
  ours = load_unet(folder, attention_impl=attention_impl)
  rng = np.random.default_rng(1)
  cin = overrides.get("in_channels", 4)
  x = rng.standard_normal((2, cin, 16, 16), dtype=np.float32)
  t = np.array([3, 871])
  ctx = rng.standard_normal((2, 5, 32), dtype=np.float32)
  labels = np.array([1, 7]) if "num_class_embeds" in overrides else None
  got, want = _run_both(ref, ours, x, t, ctx, labels)
  assert rel_err(got, want) < 1e-5


def test_unet_odd_latent_size_and_scalar_timestep(torch_unet_factory):
  """Latents not divisible by 2**depth upsample to the skip's size, as diffusers does."""
  ref, folder = torch_unet_factory()
  ours = load_unet(folder)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 4, 15, 9), dtype=np.float32)
  ctx = rng.standard_normal((1, 3, 32), dtype=np.float32)
  got, want = _run_both(ref, ours, x, np.array(500), ctx)
  assert rel_err(got, want) < 1e-5


def test_unet_jit_grad_and_bf16():
  cfg = UNetConfig(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=4,
    layers_per_block=1,
  )
  x = jnp.ones((2, 8, 8, 4))
  ctx = jnp.ones((2, 3, 32))
  for dtype in (jnp.float32, jnp.bfloat16):
    model = UNet2DConditionModel(cfg, dtype=dtype, attention_impl="blockwise", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss(params):
      out = nnx.merge(graphdef, params)(x, jnp.array([10, 20]), ctx)
      return jnp.mean(out**2), out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert out.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert sum(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads)) > 0.9 * len(jax.tree.leaves(grads))


@pytest.mark.parametrize("t,s", [(1024, 1024), (96, 7), (1536, 77)])
def test_blockwise_attention_matches_xla(t, s):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, t, 4, 8))
  k = jax.random.normal(k2, (2, s, 4, 8))
  v = jax.random.normal(k3, (2, s, 4, 8))
  ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  got = blockwise_attention(q, k, v)
  assert rel_err(got, ref) < 1e-5
  f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)
  for g_ref, g_got in zip(f(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")), f(blockwise_attention)):
    assert rel_err(g_got, g_ref) < 1e-5


def test_unet_rejects_bad_inputs_and_configs():
  cfg = UNetConfig(
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  )
  model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"channels-last latents \(B, H, W, 4\)"):
    model(jnp.ones((1, 4, 8, 8)), jnp.array(1), jnp.ones((1, 3, 32)))
  with pytest.raises(ValueError, match="cross_attention_dim 32"):
    model(jnp.ones((1, 8, 8, 4)), jnp.array(1), jnp.ones((1, 3, 16)))
  with pytest.raises(ValueError, match="unsupported UNet2DConditionModel config"):
    UNetConfig.from_diffusers({"addition_embed_type": "text_time"})
  with pytest.raises(ValueError, match="down block type 'SimpleCrossAttnDownBlock2D'"):
    UNetConfig(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4)
  with pytest.raises(ValueError, match="divisible by norm_num_groups"):
    UNetConfig(block_out_channels=(30, 60, 60, 60))
  with pytest.raises(ValueError, match="attention implementation 'flash'"):
    UNet2DConditionModel(cfg, attention_impl="flash", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "shape,kernel,stride,padding",
  [
    ((2, 8, 8, 16), 3, 1, ((1, 1), (1, 1))),
    ((1, 9, 7, 8), 3, 2, ((1, 1), (1, 1))),
    ((1, 8, 8, 8), 3, 2, ((0, 1), (0, 1))),  # the VAE's asymmetric downsampling
    ((1, 6, 6, 8), 1, 1, ((0, 0), (0, 0))),
  ],
)
def test_conv_implementations_agree(shape, kernel, stride, padding):
  from mimajax.models.layers import Conv2D

  x = jax.random.normal(jax.random.key(0), shape)
  outs, grads = [], []
  for impl in ("lax", "im2col"):
    layer = Conv2D(shape[-1], 12, kernel, stride=stride, padding=padding, impl=impl, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    f = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))
    outs.append(layer(x))
    grads.append(jax.grad(f, argnums=(0, 1))(params, x))
  assert rel_err(outs[1], outs[0]) < 1e-6
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    assert rel_err(a, b) < 1e-5
