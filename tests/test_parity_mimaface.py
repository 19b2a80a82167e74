"""`mimajax parity --component mimaface`: JAX vs the exported PyTorch model, stage by stage, and that it can fail."""

import functools

import pytest
from flax import nnx

from mimajax import cli, parity
from mimajax.face3d import synthetic_model
from mimajax.models.layers import Conv2D
from mimajax.parity.mimaface import build_random

STAGES = ("clip", "mia", "render", "unet_step", "sampling", "decoded")


@pytest.fixture(scope="module")
def models():
  model, vae = build_random("tiny", stage=2, seed=0)
  for part in (model, vae):
    for _, module in nnx.iter_modules(part):
      if isinstance(module, Conv2D):
        module.impl = "lax"  # XLA compiles these twice as fast as CPU's im2col path (tests/test_unet covers that)
  return model, vae, synthetic_model(0)


def test_parity_command_passes_and_prints_every_stage(models, monkeypatch, capsys):
  monkeypatch.setitem(parity.COMPONENTS, "mimaface", functools.partial(parity.COMPONENTS["mimaface"], models=models))
  assert cli.main(["parity", "--component", "mimaface", "--size", "tiny"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  errors = {name: float(line.split("rel_err=")[1]) for line in lines for name in STAGES if f"] {name} rel_err=" in line}
  assert sorted(errors) == sorted(STAGES) and max(errors.values()) < 1e-4
  assert lines[-1] == f"rel_err={errors['decoded']:.3e}"  # the end-to-end error is the one judged


def test_parity_fails_when_a_jax_weight_changes_after_export(models, monkeypatch, capsys):
  model, vae, face = models
  model = nnx.clone(model)  # leave the shared fixture alone

  def nudge_mia_motion_attention(m):
    # The paper initialises this projection to zero; a random 1% change must be seen by the check.
    kernel = m.mia.motion_attn.to_out.kernel
    kernel[...] = kernel[...] * 1.01

  fn = functools.partial(
    parity.COMPONENTS["mimaface"], models=(model, vae, face), after_export=nudge_mia_motion_attention, fail_fast=True
  )
  monkeypatch.setitem(parity.COMPONENTS, "mimaface", fn)
  assert cli.main(["parity", "--component", "mimaface", "--size", "tiny"]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert any("] clip rel_err=" in line for line in lines)  # CLIP was not touched: it still agrees
  assert any("] mia rel_err=" in line and "<- above 0.0001" in line for line in lines)
  assert not any("unet_step" in line for line in lines)  # fail_fast: it stopped there
  assert lines[-2].startswith("FAIL")
  assert float(lines[-1].split("=")[1]) > 1e-4


@pytest.mark.parametrize("variant", ["paper", "release"])
@pytest.mark.parametrize("frames", [None, 3])
def test_pytorch_mia_matches_jax(variant, frames):
  """mimajax.mimaface.pytorch's MIA loads our parameters by name and computes the same tokens, images and clips."""
  import jax
  import numpy as np
  import torch

  from mimajax.mimaface.export import mia_key_map
  from mimajax.mimaface.mia import MIAConfig, build_mia
  from mimajax.mimaface.pytorch import build_mia as torch_mia
  from mimajax.parity.common import rel_err
  from mimajax.parity.mimaface import random_weights

  cfg = MIAConfig(variant=variant, clip_dim=32, cross_attention_dim=24, num_heads=4, adapter_layers=2,
                  face_recognition_dim=50, clip_tokens=5, release_layers=2, release_heads=2)  # fmt: skip
  ours = random_weights(nnx.eval_shape(lambda: build_mia(cfg, implementation="xla", rngs=nnx.Rngs(0))), seed=3)
  ref = torch_mia(cfg)
  state = mia_key_map(ours).to_torch(nnx.state(ours, nnx.Param))
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  rng = np.random.default_rng(0)
  lead = (2,) if frames is None else (2, frames)
  hidden = rng.standard_normal((2, cfg.clip_tokens, cfg.clip_dim)).astype(np.float32)
  motion = rng.standard_normal(lead + (261 if variant == "release" else 257,)).astype(np.float32)
  if variant == "paper":
    e_id = rng.standard_normal((2, cfg.clip_dim)).astype(np.float32)
    args = (hidden[:, 1:], e_id, motion)
  else:
    args = (hidden, rng.standard_normal((2, cfg.face_recognition_dim)).astype(np.float32), motion)
  got = jax.jit(lambda *a: ours(*a))(*args)
  with torch.no_grad():
    want = ref(*(torch.from_numpy(a) for a in args)).numpy()
  assert got.shape == want.shape and rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_parity_sd15_full_size():
  """The full-size model with random weights (minutes on CPU; launch/gpu_check.sh runs it on a GPU)."""
  assert cli.main(["parity", "--component", "mimaface", "--size", "sd15"]) == 0
