"""The assembled MIMAFace model: both stages, both variants, the objective and its inputs' checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mimajax.diffusion import schedulers
from mimajax.mimaface import factory as mimaface_factory
from mimajax.mimaface.memory_bank import enqueue, init_memory_bank
from mimajax.mimaface.model import MIMAFaceConfig, training_loss


def _batch(model, frames=None, b=2, seed=0):
  cfg = model.config
  k = jax.random.split(jax.random.key(seed), 6)
  lead = (b,) if frames is None else (b, frames)
  side = cfg.clip.image_size
  batch = {
    "source": jax.random.uniform(k[0], (b, side, side, 3)),
    "motion": jax.random.normal(k[1], lead + (261,)) * 0.1,
    "latents": jax.random.normal(k[2], lead + (8, 8, 4)),
    "render_latents": jax.random.normal(k[3], lead + (8, 8, 4)),
    "identity": jnp.arange(b, dtype=jnp.int32),
  }
  if cfg.mia.variant == "release":
    batch["face_features"] = jax.random.normal(k[4], (b, cfg.mia.face_recognition_dim))
  return batch


def _model(stage=1, variant="paper", **overrides):
  model_cfg = tiny.get_config().model
  model_cfg.mia.variant = variant
  model_cfg.attention_impl = "xla"  # compiles faster than the blockwise loops; the math is the same
  return mimaface_factory.build_mimaface(model_cfg, stage=stage, rngs=nnx.Rngs(0), **overrides)


@pytest.mark.parametrize("stage,variant", [(1, "paper"), (2, "paper"), (1, "release"), (2, "release")])
def test_training_loss_and_gradients(stage, variant):
  model = _model(stage, variant, min_snr_gamma=5.0)
  batch = _batch(model, frames=4 if stage == 2 else None)
  schedule = schedulers.make_noise_schedule()
  bank = init_memory_bank(8, model.config.clip.hidden_size)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rng, bank):
    def loss_fn(params):
      return training_loss(nnx.merge(graphdef, params, rest), batch, rng, schedule, bank)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, aux), grads = step(params, jax.random.key(1), bank)
  assert np.isfinite(float(loss))
  assert ("identity_loss" in aux) == (variant == "paper")
  assert aux["e_id"].shape == (2, model.config.clip.hidden_size)
  flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
  assert all(np.isfinite(np.asarray(v[...])).all() for v in flat.values())
  # the appearance path is trained end to end: CLIP and MIA receive gradients
  assert any(k.startswith("clip/") and float(jnp.abs(v[...]).sum()) > 0 for k, v in flat.items())
  assert any(k.startswith("mia/") and float(jnp.abs(v[...]).sum()) > 0 for k, v in flat.items())
  # deterministic for a given rng; a bank holding the batch's identities changes the identity loss
  (loss2, _), _ = step(params, jax.random.key(1), bank)
  assert float(loss2) == float(loss)
  if variant == "paper":
    full = enqueue(bank, aux["e_id"], batch["identity"])
    (_, aux3), _ = step(params, jax.random.key(1), full)
    assert float(aux3["identity_loss"]) != float(aux["identity_loss"])


def test_classifier_free_guidance_dropout_zeroes_the_condition():
  model = _model(1, "paper", cfg_dropout=1.0, identity_loss_weight=0.0)
  batch = _batch(model)
  schedule = schedulers.make_noise_schedule()
  # with every condition dropped, the motion coefficients cannot affect the loss
  loss = jax.jit(lambda batch: training_loss(model, batch, jax.random.key(0), schedule)[0])
  loss_a, loss_b = loss(batch), loss({**batch, "motion": batch["motion"] + 1.0})
  assert float(loss_a) == float(loss_b)


def test_bad_inputs_are_named():
  model = _model(1, "paper")
  batch = _batch(model)
  schedule = schedulers.make_noise_schedule()
  with pytest.raises(ValueError, match="257"):
    training_loss(model, {**batch, "motion": batch["motion"][..., :250]}, jax.random.key(0), schedule)
  with pytest.raises(ValueError, match="stage-1 training got latents"):
    training_loss(model, {**batch, "latents": batch["latents"][:, None]}, jax.random.key(0), schedule)
  video = _model(2, "paper")
  long_clip = _batch(video, frames=40)
  with pytest.raises(ValueError, match="longer than the motion modules' positional table"):
    training_loss(video, long_clip, jax.random.key(0), schedule)
  release = _model(1, "release")
  no_face = _batch(release)
  del no_face["face_features"]
  with pytest.raises(ValueError, match="face_features"):
    training_loss(release, no_face, jax.random.key(0), schedule)
  with pytest.raises(ValueError, match="13 input channels"):
    MIMAFaceConfig(unet=model.config.unet.replace(in_channels=4), clip=model.config.clip, mia=model.config.mia)
