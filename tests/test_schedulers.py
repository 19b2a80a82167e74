"""Tests for mimajax.diffusion.schedulers: parity with diffusers, jit-ability, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax.diffusion import schedulers as S
from mimajax.parity.scheduler import scheduler_parity

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-5

# diffusers' Euler scheduler trips a numpy-2 deprecation inside its own set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def torch():
  """torch is an optional dependency; parity tests skip without it."""
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def diffusers(torch):
  """diffusers is an optional dependency; parity tests skip without it."""
  return pytest.importorskip("diffusers")


def rel_l2(a, b):
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def to_torch(torch, x):
  """Channels-last numpy -> channels-first torch."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def from_torch(x):
  """Channels-first torch -> channels-last numpy."""
  return np.moveaxis(x.numpy(), 1, -1)


def fake_model(xp, x, t):
  """Deterministic nonlinear stand-in for the UNet (works for numpy, torch and jax)."""
  return 0.8 * xp.tanh(x) + 0.1 * xp.cos(0.01 * t) * x + 0.05 * xp.sin(0.003 * t)


def latents(shape=(2, 8, 8, 4), seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize(
  "cfg",
  [
    SD15,
    dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=37, beta_start=0.001, beta_end=0.03, beta_schedule="scaled_linear"),
  ],
)
def test_schedule_matches_diffusers(diffusers, cfg):
  ours = S.make_noise_schedule(**cfg)
  ref = diffusers.DDPMScheduler(**cfg)
  assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.dtype == jnp.float32
  assert ours.num_train_timesteps == cfg["num_train_timesteps"]
  # Elementwise, not just in norm: the tail of alphas_cumprod is tiny and would hide in an L2 norm.
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=0)


def test_schedule_is_a_pytree_with_static_prediction_type():
  sched = S.make_noise_schedule(prediction_type="v_prediction")
  leaves, treedef = jax.tree_util.tree_flatten(sched)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(treedef, leaves).prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("pred", S.PREDICTION_TYPES)
@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 3, 4, 4, 4)])  # (B,H,W,C) and video (B,F,H,W,C)
def test_add_noise_velocity_target_parity(diffusers, torch, pred, shape):
  sched = S.make_noise_schedule(**SD15, prediction_type=pred)
  ref = diffusers.DDPMScheduler(**SD15, prediction_type=pred)
  x0, noise = latents(shape, seed=1)
  t = np.array([0, 999, 517][: shape[0]])
  tt = torch.from_numpy(t)
  noisy_ref = from_torch(ref.add_noise(to_torch(torch, x0), to_torch(torch, noise), tt))
  v_ref = from_torch(ref.get_velocity(to_torch(torch, x0), to_torch(torch, noise), tt))
  noisy = S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  v = S.velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  assert noisy.shape == shape and v.shape == shape
  assert rel_l2(noisy, noisy_ref) < TOL
  assert rel_l2(v, v_ref) < TOL
  target = S.training_target(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_array_equal(target, noise if pred == "epsilon" else v)


def test_add_noise_keeps_bf16():
  sched = S.make_noise_schedule()
  x0, noise = latents()
  out = S.add_noise(sched, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), jnp.array([3, 900]))
  assert out.dtype == jnp.bfloat16
  ref = S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.array([3, 900]))
  assert rel_l2(out, ref) < 1e-2


def test_min_snr_weight_hand_computed():
  # betas (0.5, 0.75) -> alphas (0.5, 0.25) -> alphas_cumprod (0.5, 0.125) -> SNR (1, 1/7).
  eps = S.make_noise_schedule(2, 0.5, 0.75, "linear", "epsilon")
  v = S.make_noise_schedule(2, 0.5, 0.75, "linear", "v_prediction")
  t = jnp.array([0, 1])
  np.testing.assert_allclose(S.snr(eps, t), [1.0, 1 / 7], rtol=1e-6)
  # epsilon: min(snr, g) / snr ; v: min(snr, g) / (snr + 1)
  np.testing.assert_allclose(S.min_snr_weight(eps, t, gamma=0.5), [0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(S.min_snr_weight(v, t, gamma=0.5), [0.25, 1 / 8], rtol=1e-6)
  # SD1.5 at t=0: alpha_bar = 1 - 0.00085, SNR ~ 1175.5, far above gamma=5.
  sd = S.make_noise_schedule()
  expected = 5.0 / (0.99915 / 0.00085)
  # 1 - alpha_bar cancels in float32 (as in diffusers), hence 1e-4 rather than 1e-6.
  np.testing.assert_allclose(S.min_snr_weight(sd, jnp.array([0]))[0], expected, rtol=1e-4)
  # At large t SNR < gamma, so the epsilon weight is exactly 1.
  assert float(S.min_snr_weight(sd, jnp.array([999]))[0]) == 1.0


# ------------------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 25, 50, 333, 1000])
def test_ddim_timesteps_match(diffusers, spacing, steps):
  ref = diffusers.DDIMScheduler(**SD15, steps_offset=1, timestep_spacing=spacing)
  ref.set_timesteps(steps)
  ts = S.ddim_timesteps(S.make_noise_schedule(), steps, spacing, steps_offset=1)
  assert ts.dtype == jnp.int32
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def run_ddim_reference(diffusers, torch, pred, spacing, steps, noise, eta=0.0, step_noise=None, clip_sample=False):
  """Full diffusers DDIM loop with the fake model (SD1.5 config; diffusers' own default clips x0)."""
  ref = diffusers.DDIMScheduler(
    **SD15,
    prediction_type=pred,
    steps_offset=1,
    timestep_spacing=spacing,
    set_alpha_to_one=False,
    clip_sample=clip_sample,
  )
  ref.set_timesteps(steps)
  x = to_torch(torch, noise)
  for i, t in enumerate(ref.timesteps):
    vn = None if step_noise is None else to_torch(torch, step_noise[i])
    x = ref.step(fake_model(torch, x, t.float()), t, x, eta=eta, variance_noise=vn).prev_sample
  return from_torch(x)


def run_ddim_ours(sched, spacing, steps, noise, eta=0.0, step_noise=None, **kw):
  """Eager Python DDIM loop over our tables."""
  ts = S.ddim_timesteps(sched, steps, spacing)
  prev = S.ddim_prev_timesteps(sched, ts, steps)
  x = jnp.asarray(noise)
  for i in range(ts.shape[0]):
    vn = None if step_noise is None else jnp.asarray(step_noise[i])
    out = fake_model(jnp, x, ts[i].astype(jnp.float32))
    x = S.ddim_step(sched, out, ts[i], prev[i], x, eta=eta, noise=vn, **kw)
  return x


@pytest.mark.parametrize("pred", S.PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [7, 25])
def test_ddim_loop_parity(diffusers, torch, pred, spacing, steps):
  sched = S.make_noise_schedule(**SD15, prediction_type=pred)
  _, noise = latents(seed=steps)
  ref = run_ddim_reference(diffusers, torch, pred, spacing, steps, noise)
  ours = run_ddim_ours(sched, spacing, steps, noise)
  assert rel_l2(ours, ref) < TOL


@pytest.mark.parametrize("pred", S.PREDICTION_TYPES)
def test_ddim_eta_and_clip_parity(diffusers, torch, pred):
  sched = S.make_noise_schedule(**SD15, prediction_type=pred)
  _, noise = latents(seed=3)
  step_noise = np.random.default_rng(4).standard_normal((10,) + noise.shape).astype(np.float32)
  ref = run_ddim_reference(diffusers, torch, pred, "leading", 10, noise, eta=1.0, step_noise=step_noise)
  ours = run_ddim_ours(sched, "leading", 10, noise, eta=1.0, step_noise=step_noise)
  assert rel_l2(ours, ref) < TOL
  # eta actually matters, so the comparison above exercises the noise path.
  assert rel_l2(run_ddim_ours(sched, "leading", 10, noise), ref) > 1e-2
  ref = run_ddim_reference(diffusers, torch, pred, "trailing", 10, 3 * noise, clip_sample=True)
  ours = run_ddim_ours(sched, "trailing", 10, 3 * noise, clip_sample=True)
  assert rel_l2(ours, ref) < TOL
  assert rel_l2(run_ddim_ours(sched, "trailing", 10, 3 * noise), ref) > 1e-3  # clipping was active


def test_ddim_set_alpha_to_one_parity(diffusers, torch):
  sched = S.make_noise_schedule()
  _, noise = latents(seed=5)
  ref = diffusers.DDIMScheduler(**SD15, steps_offset=1, set_alpha_to_one=True, clip_sample=False)
  ref.set_timesteps(10)
  ts = S.ddim_timesteps(sched, 10)
  prev = S.ddim_prev_timesteps(sched, ts, 10)
  assert int(prev[-1]) < 0  # the final step uses the "final alpha"
  x_t = to_torch(torch, noise)
  out = fake_model(np, noise, 1.0)
  ref_x = from_torch(ref.step(to_torch(torch, out), ref.timesteps[-1], x_t).prev_sample)
  ours = S.ddim_step(sched, jnp.asarray(out), ts[-1], prev[-1], jnp.asarray(noise), set_alpha_to_one=True)
  assert rel_l2(ours, ref_x) < TOL
  default = S.ddim_step(sched, jnp.asarray(out), ts[-1], prev[-1], jnp.asarray(noise))
  assert rel_l2(default, ref_x) > 1e-3


def test_ddim_loop_under_jit_fori_loop(diffusers, torch):
  sched = S.make_noise_schedule(**SD15, prediction_type="v_prediction")
  _, noise = latents(seed=6)
  ts = S.ddim_timesteps(sched, 25)
  prev = S.ddim_prev_timesteps(sched, ts, 25)

  @jax.jit
  def sample(sched, x, ts, prev):
    def body(i, x):  # i is traced: the tables are indexed dynamically
      out = fake_model(jnp, x, ts[i].astype(jnp.float32))
      return S.ddim_step(sched, out, ts[i], prev[i], x)

    return jax.lax.fori_loop(0, ts.shape[0], body, x)

  ours = sample(sched, jnp.asarray(noise), ts, prev)
  ref = run_ddim_reference(diffusers, torch, "v_prediction", "leading", 25, noise)
  assert rel_l2(ours, ref) < TOL
  # The convenience loop, jitted with a PRNG key for eta > 0, runs and differs from eta = 0.
  fn = lambda x, t: fake_model(jnp, x, t.astype(jnp.float32))
  run = jax.jit(S.ddim_sample, static_argnums=1)
  det = run(sched, fn, jnp.asarray(noise), ts, prev)
  assert rel_l2(det, ref) < TOL
  sto = run(sched, fn, jnp.asarray(noise), ts, prev, 1.0, jax.random.key(0))
  assert np.isfinite(np.asarray(sto)).all() and rel_l2(sto, det) > 1e-2


def test_ddim_step_per_sample_timesteps():
  sched = S.make_noise_schedule()
  _, x = latents(seed=7)
  out = fake_model(jnp, jnp.asarray(x), 0.0)
  t, prev = jnp.array([901, 41]), jnp.array([861, 1])
  batched = S.ddim_step(sched, out, t, prev, jnp.asarray(x))
  for b in range(2):
    single = S.ddim_step(sched, out[b : b + 1], t[b], prev[b], jnp.asarray(x[b : b + 1]))
    np.testing.assert_allclose(batched[b : b + 1], single, rtol=1e-6)


# ------------------------------------------------------------------------------------------ Euler


@pytest.mark.parametrize("pred", S.PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_euler_parity(diffusers, torch, pred, spacing, steps):
  sched = S.make_noise_schedule(**SD15, prediction_type=pred)
  ref = diffusers.EulerDiscreteScheduler(**SD15, prediction_type=pred, steps_offset=1, timestep_spacing=spacing)
  ref.set_timesteps(steps)
  sigmas, ts = S.euler_sigmas_and_timesteps(sched, steps, spacing, steps_offset=1)
  assert sigmas.shape == (ts.shape[0] + 1,) and float(sigmas[-1]) == 0.0
  np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())
  init = S.euler_init_noise_sigma(sigmas, spacing)
  np.testing.assert_allclose(init, float(ref.init_noise_sigma), rtol=1e-6)

  _, noise = latents(seed=steps)
  x = to_torch(torch, noise) * ref.init_noise_sigma
  for t in ref.timesteps:
    x = ref.step(fake_model(torch, ref.scale_model_input(x, t), t), t, x).prev_sample
  fn = lambda x, t: fake_model(jnp, x, t)
  ours = jax.jit(S.euler_sample, static_argnums=1)(sched, fn, jnp.asarray(noise), sigmas, ts, init)
  assert rel_l2(ours, from_torch(x)) < TOL


def test_euler_single_step_and_scaling_parity(diffusers, torch):
  ref = diffusers.EulerDiscreteScheduler(
    **SD15, prediction_type="v_prediction", steps_offset=1, timestep_spacing="leading"
  )
  ref.set_timesteps(20)
  sigmas, ts = S.euler_sigmas_and_timesteps(S.make_noise_schedule(), 20)
  x, out = latents(seed=8)
  t = ref.timesteps[5]
  ref._step_index = 5  # as if we were mid-loop
  scaled_ref = from_torch(ref.scale_model_input(to_torch(torch, x), t))
  step_ref = from_torch(ref.step(to_torch(torch, out), t, to_torch(torch, x)).prev_sample)
  assert rel_l2(S.euler_scale_model_input(jnp.asarray(x), sigmas[5]), scaled_ref) < TOL
  step = S.euler_step(jnp.asarray(out), jnp.asarray(x), sigmas[5], sigmas[6], "v_prediction")
  assert rel_l2(step, step_ref) < TOL


# ------------------------------------------------------------------------------------------ parity fn


def test_scheduler_parity_function(diffusers):
  err = scheduler_parity("tiny", seed=1)
  assert 0.0 <= err < TOL


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise():
  sched = S.make_noise_schedule()
  with pytest.raises(ValueError, match="cosine.*scaled_linear"):
    S.make_noise_schedule(beta_schedule="cosine")
  with pytest.raises(ValueError, match="sample.*v_prediction"):
    S.make_noise_schedule(prediction_type="sample")
  with pytest.raises(ValueError, match="sample.*v_prediction"):
    S.NoiseSchedule(sched.betas, sched.alphas_cumprod, "sample")
  with pytest.raises(ValueError, match="num_train_timesteps"):
    S.make_noise_schedule(num_train_timesteps=0)
  with pytest.raises(ValueError, match="middle.*leading"):
    S.ddim_timesteps(sched, 10, timestep_spacing="middle")
  with pytest.raises(ValueError, match="middle.*leading"):
    S.euler_sigmas_and_timesteps(sched, 10, timestep_spacing="middle")
  with pytest.raises(ValueError, match="middle.*leading"):
    S.euler_init_noise_sigma(jnp.ones(3), "middle")
  for steps in (0, 1001):
    with pytest.raises(ValueError, match=f"num_inference_steps={steps}"):
      S.ddim_timesteps(sched, steps)
    with pytest.raises(ValueError, match=f"num_inference_steps={steps}"):
      S.euler_sigmas_and_timesteps(sched, steps)
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="eps.*epsilon"):
    S.euler_step(x, x, 1.0, 0.5, "eps")
  with pytest.raises(ValueError, match="noise"):
    S.ddim_step(sched, x, 10, -10, x, eta=0.5)
  with pytest.raises(ValueError, match="key"):
    S.ddim_sample(sched, lambda x, t: x, x, jnp.array([1]), jnp.array([-1]), eta=1.0)
  with pytest.raises(ValueError, match="huge.*tiny"):
    scheduler_parity("huge")
