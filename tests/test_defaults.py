"""Every default with a source: the paper's training configs, the release's training and sampling, our choices named.

The paper (sec. 4.1): stage 1 batch 32 for 30k steps at 1e-5, stage 2 12-frame clips at batch 8, motion = pose,
expression and gaze. The release (MIMAFace2024/MIMAFace): train_video.py / train_image.py for its training,
infer_video.py for sampling (Euler, 25 steps, guidance 5.0, linspace, 12-frame clips, prev_frame_num 3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import release, sd15_stage1, sd15_stage2, tiny
from mimajax.mimaface import conditioning, driving, ica
from mimajax.mimaface.mia import drop_condition


def test_paper_stage_configs():
  s1, s2 = sd15_stage1.get_config(), sd15_stage2.get_config()
  assert (s1.data.batch_size, s1.total_steps, s1.train.learning_rate, s1.data.num_frames) == (32, 30_000, 1e-5, 1)
  assert (s2.data.batch_size, s2.data.num_frames) == (8, 12)
  for c in (s1, s2, tiny.get_config("1")):
    assert c.data.coefficient_dim == 261  # MIA's motion is [rho; beta; g]: gaze included
    assert not c.data.blend_source and c.model.objective.ica_schedule == "paper"
    assert c.model.objective.cfg_dropout == 0.1 and c.model.objective.cfg_dropout_scope == "sample"
    assert (c.sample.scheduler, c.sample.timestep_spacing) == ("ddim", "leading")  # ours: the paper states none


def test_release_configs_train_and_sample_as_the_release():
  r1, r2 = release.get_config("1"), release.get_config("2")
  for c in (r1, r2):
    o = c.model.objective
    assert (o.min_snr_gamma, o.cfg_dropout, o.cfg_dropout_scope, o.ica_schedule) == (5.0, 0.1, "batch", "release")
    assert c.data.blend_source and c.data.coefficient_dim == 261
    s = c.sample
    assert (s.scheduler, s.num_inference_steps, s.guidance_scale, s.timestep_spacing) == ("euler", 25, 5.0, "linspace")
  assert (r1.model.objective.clean_condition_prob, r2.model.objective.clean_condition_prob) == (0.01, 0.0)
  assert r2.data.num_frames == 12 and ica.inference_overlap(12, release=True) == 3


def test_a_release_folder_samples_with_the_release_settings(tmp_path, torch_vae_factory):
  from test_release_import import MIA, write_release

  from mimajax.face3d import save_face_model, synthetic_model
  from mimajax.mimaface.inference import RELEASE_SAMPLER, load_inference

  root = tmp_path / "release"
  root.mkdir()
  write_release(root, MIA)
  _, vae_dir = torch_vae_factory()
  save_face_model(synthetic_model(), tmp_path / "face_model.npz")
  inference = load_inference(root, vae_dir=vae_dir, face_model_path=tmp_path / "face_model.npz")
  assert inference.sampler == RELEASE_SAMPLER
  assert (RELEASE_SAMPLER.scheduler, RELEASE_SAMPLER.num_inference_steps, RELEASE_SAMPLER.guidance_scale,
          RELEASE_SAMPLER.timestep_spacing) == ("euler", 25, 5.0, "linspace")  # fmt: skip
  assert (inference.num_frames, inference.ica_frames) == (12, 3)


def test_animate_flags_default_to_the_checkpoint_sampler():
  import argparse

  from mimajax.mimaface import animate
  from mimajax.mimaface.inference import RELEASE_SAMPLER

  p = argparse.ArgumentParser()
  animate.add_arguments(p)
  args = p.parse_args(["--checkpoint", "x", "--source", "s.png", "--out", "o.mp4", "--steps", "10"])
  got = animate.sampler_from_args(RELEASE_SAMPLER, args)
  assert (got.scheduler, got.num_inference_steps, got.guidance_scale, got.timestep_spacing) == (
    "euler", 10, 5.0, "linspace")  # fmt: skip
  args = p.parse_args(["--checkpoint", "x", "--source", "s.png", "--out", "o.mp4", "--timestep-spacing", "trailing"])
  assert animate.sampler_from_args(RELEASE_SAMPLER, args).timestep_spacing == "trailing"


def test_release_ica_k_is_zero_half_the_time_else_one_to_four():
  latents = jnp.ones((2, 12, 2, 2, 4))
  ks = np.array([ica.ica_training_condition(jax.random.key(i), latents, schedule="release")[2] for i in range(400)])
  assert (ks[:, 0] == ks[:, 1]).all()  # one k for the whole batch, as the release draws it
  k = ks[:, 0]
  assert set(np.unique(k)) == {0, 1, 2, 3, 4}
  assert 0.42 < np.mean(k == 0) < 0.58
  paper = np.array([ica.ica_training_condition(jax.random.key(i), latents)[2] for i in range(200)])
  assert set(np.unique(paper)) == {0, 1, 2, 3} and not (paper[:, 0] == paper[:, 1]).all()  # U{0..F/4} per sample


def test_batch_level_cfg_dropout_drops_the_whole_batch_or_nothing():
  cond = jnp.ones((8, 3, 2))
  drop = lambda i, **kw: np.asarray(drop_condition(jax.random.key(i), cond, 0.5, **kw)[:, 0, 0])
  kept = np.array([drop(i, per_batch=True) for i in range(50)])
  assert ((kept == 0).all(1) | (kept == 1).all(1)).all() and 10 < kept[:, 0].sum() < 40
  per_sample = np.array([drop(i) for i in range(50)])
  assert not ((per_sample == 0).all(1) | (per_sample == 1).all(1)).all()


def test_stage1_clean_conditioning_is_the_target_with_mask_one():
  latents = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
  outs = [ica.clean_condition(jax.random.key(i), latents, 0.3) for i in range(60)]
  on = [bool(m.all()) for _, m in outs]
  assert 5 < sum(on) < 35
  for (c, m), o in zip(outs, on):
    np.testing.assert_array_equal(c, latents if o else jnp.zeros_like(latents))
    assert bool((m == 1).all()) == o and bool((m == 0).all()) == (not o)


def test_source_blending_matches_animate_blend():
  rng = np.random.default_rng(0)
  source, rows = rng.normal(size=(2, 261)).astype(np.float32), rng.normal(size=(2, 5, 261)).astype(np.float32)
  got = np.asarray(conditioning.blend_with_source(jnp.asarray(source), jnp.asarray(rows)))
  for b in range(2):
    np.testing.assert_array_equal(got[b], driving.blend(source[b][None], rows[b], "absolute"))
  images = np.asarray(conditioning.blend_with_source(jnp.asarray(source), jnp.asarray(rows[:, 0])))
  np.testing.assert_array_equal(images, got[:, 0])


@pytest.mark.parametrize("stage, trains", [("1", True), ("2", False)])
def test_the_identity_loss_runs_only_when_clip_or_mia_train(stage, trains):
  from mimajax.mimaface import family, pretrained

  config = tiny.get_config(stage)
  model, _ = pretrained.build_models(config)
  assert family.identity_loss_trains(model, tuple(config.train.trainable)) is trains
  r2 = release.get_config("2")  # the release's stage 2 also tunes MIA (it has no identity loss: no memory bank)
  assert any(p.startswith("^mia") for p in r2.train.trainable)
