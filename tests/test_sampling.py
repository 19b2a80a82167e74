"""ClipSampler: DDIM / Euler with and without CFG against hand-written loops, no retrace, ICA reaching the U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimajax.diffusion import schedulers
from mimajax.mimaface import ica
from mimajax.mimaface.mia import MIAConfig
from mimajax.mimaface.model import MIMAFace, MIMAFaceConfig
from mimajax.mimaface.sampling import ClipSampler, SamplerConfig
from mimajax.models.clip_vision import CLIP_TINY
from mimajax.models.layers import Conv2D
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig
from mimajax.parity.mimaface import random_weights

# Smaller than configs/tiny.py so that each jitted loop compiles in seconds; every structural part is there.
MICRO_UNET = UNetConfig(
  sample_size=8,
  in_channels=ica.INPUT_CHANNELS,
  block_out_channels=(16,),
  layers_per_block=1,
  norm_num_groups=4,
  cross_attention_dim=16,
  attention_head_dim=4,
  down_block_types=("CrossAttnDownBlock2D",),
  up_block_types=("CrossAttnUpBlock2D",),
)
MICRO_MIA = MIAConfig(clip_dim=32, cross_attention_dim=16, num_heads=4, adapter_layers=1, clip_tokens=17)
SCHEDULE = schedulers.make_noise_schedule()
FRAMES, SIDE, TOKENS = 3, 8, 5


def _model(stage: int) -> MIMAFace:
  motion = MotionConfig(num_attention_heads=2) if stage == 2 else None
  config = MIMAFaceConfig(unet=MICRO_UNET, clip=CLIP_TINY, mia=MICRO_MIA, motion=motion)
  model = random_weights(nnx.eval_shape(lambda: MIMAFace(config, attention_impl="xla", rngs=nnx.Rngs(0))), stage)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Conv2D):
      module.impl = "lax"  # XLA compiles lax convs twice as fast as CPU's im2col path; the math is the same
  return model


@pytest.fixture(scope="module")
def image_model():
  return _model(1)


@pytest.fixture(scope="module")
def video_model():
  return _model(2)


@pytest.fixture(scope="module")
def image_predict(image_model):
  return _predict_fn(image_model)


@pytest.fixture(scope="module")
def video_predict(video_model):
  return _predict_fn(video_model)


def _inputs(stage: int, seed: int = 0, per_frame_context: bool = True):
  k = jax.random.split(jax.random.key(seed), 4)
  lead = (1, FRAMES) if stage == 2 else (1,)
  ctx_lead = lead if per_frame_context else (1,)
  return dict(
    context=jax.random.normal(k[0], ctx_lead + (TOKENS, MICRO_UNET.cross_attention_dim)),
    render_latents=jax.random.normal(k[1], lead + (SIDE, SIDE, 4)),
    noise=jax.random.normal(k[2], lead + (SIDE, SIDE, 4)),
  )


def _predict_fn(model):
  """model.predict jitted once, the state as an argument (for the hand-written loops)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state).predict(*args))
  return lambda *args: fn(state, *args)


def _ica(stage, seed=1):
  shape = (1, FRAMES, SIDE, SIDE, 4) if stage == 2 else (1, SIDE, SIDE, 4)
  return ica.ica_inference_condition(jax.random.normal(jax.random.key(seed), shape), shape, k=1)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_guidance_one_is_plain_conditional_sampling(image_model, image_predict, scheduler):
  config = SamplerConfig(scheduler=scheduler, num_inference_steps=3, guidance_scale=1.0)
  x = _inputs(1)
  got = ClipSampler(image_model, SCHEDULE, config)(**x)

  predict = image_predict
  zeros_cond, zeros_mask = jnp.zeros_like(x["noise"]), jnp.zeros(x["noise"].shape[:-1] + (1,))
  eps = lambda z, t: predict(z, t, x["context"], x["render_latents"], zeros_cond, zeros_mask)  # noqa: E731
  if scheduler == "ddim":
    ts = schedulers.ddim_timesteps(SCHEDULE, 3)
    prev = schedulers.ddim_prev_timesteps(SCHEDULE, ts, 3)
    z = x["noise"]
    for t, p in zip(ts, prev):
      z = schedulers.ddim_step(SCHEDULE, eps(z, t), t, p, z)
  else:
    sigmas, ts = schedulers.euler_sigmas_and_timesteps(SCHEDULE, 3)
    z = x["noise"] * schedulers.euler_init_noise_sigma(sigmas)
    for i, t in enumerate(ts):
      z = schedulers.euler_step(eps(schedulers.euler_scale_model_input(z, sigmas[i]), t), z, sigmas[i], sigmas[i + 1])
  np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(got - x["noise"]).max()) > 1e-2  # the loop did denoise


@pytest.fixture(scope="module")
def guided(video_model):
  """One guided DDIM sampler on the video model, shared by the tests below (one compilation)."""
  return ClipSampler(video_model, SCHEDULE, SamplerConfig(num_inference_steps=2, guidance_scale=3.0))


def test_cfg_is_the_two_pass_formula_with_a_zero_unconditional_context(video_predict, guided):
  x = _inputs(2)
  cond, mask = _ica(2)
  got = guided(**x, cond_latents=cond, mask=mask)

  ts = schedulers.ddim_timesteps(SCHEDULE, 2)
  prev = schedulers.ddim_prev_timesteps(SCHEDULE, ts, 2)
  z = x["noise"]
  for t, p in zip(ts, prev):
    uncond = video_predict(z, t, jnp.zeros_like(x["context"]), x["render_latents"], cond, mask)
    conditional = video_predict(z, t, x["context"], x["render_latents"], cond, mask)
    assert float(jnp.abs(conditional - uncond).max()) > 1e-3  # the appearance context matters: guidance does work
    z = schedulers.ddim_step(SCHEDULE, uncond + 3.0 * (conditional - uncond), t, p, z)
  np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-5)


def test_a_second_clip_does_not_retrace(guided):
  first = guided(**_inputs(2, seed=0))
  cond, mask = ica.ica_inference_condition(first, first.shape, k=1)  # the next clip starts from this one
  second = guided(**_inputs(2, seed=1), cond_latents=cond, mask=mask)
  third = guided(**_inputs(2, seed=2), cond_latents=cond, mask=mask)
  assert guided.compilations == 1
  assert first.shape == second.shape == (1, FRAMES, SIDE, SIDE, 4)
  assert float(jnp.abs(second - third).max()) > 1e-3


def test_ica_inputs_reach_the_unet_through_conv_in(video_model, guided):
  x = _inputs(2, seed=3)
  cond, mask = _ica(2, seed=4)
  without, with_ica = guided(**x), guided(**x, cond_latents=cond, mask=mask)
  assert float(jnp.abs(with_ica - without).max()) > 1e-3
  # With conv_in's ICA channels (8:13, W_cond) zeroed, the conditioning has no effect: that is its only path.
  no_ica = nnx.clone(video_model)
  no_ica.unet.conv_in.kernel[...] = no_ica.unet.conv_in.kernel[...].at[:, :, 8:].set(0.0)
  state = nnx.split(no_ica)[1]
  original, guided.state = guided.state, state
  try:
    np.testing.assert_array_equal(guided(**x), guided(**x, cond_latents=cond, mask=mask))
  finally:
    guided.state = original
  assert guided.compilations == 1  # new weights of the same structure reuse the compiled loop


def test_stage_and_argument_errors_are_named(image_model, video_model):
  x = _inputs(2)
  with pytest.raises(ValueError, match=r"stage-1 \(image\) model takes \(B, h, w, 4\)"):
    ClipSampler(image_model, SCHEDULE)(**x)
  with pytest.raises(ValueError, match="render has shape"):
    ClipSampler(video_model, SCHEDULE)(**{**x, "render_latents": x["render_latents"][:, :2]})
  with pytest.raises(ValueError, match="context must be"):
    ClipSampler(video_model, SCHEDULE)(**{**x, "context": x["context"][0]})
  with pytest.raises(ValueError, match="needs a PRNG `key`"):
    ClipSampler(video_model, SCHEDULE, SamplerConfig(eta=0.5))(**x)
  with pytest.raises(ValueError, match="scheduler='pndm' unknown"):
    SamplerConfig(scheduler="pndm")
  with pytest.raises(ValueError, match="only used by the 'ddim'"):
    SamplerConfig(scheduler="euler", eta=0.5)
