"""One loader of a trained MIMAFace for inference: a workdir in today's layout (parameter groups) and one
written before parameter groups existed both load, strictly; a workdir of another family is refused."""

import json
import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import tiny
from mimajax import checkpointing
from mimajax.convert import diffusers_format
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.mimaface import factory as mimaface_factory
from mimajax.mimaface.inference import GROUP, load_inference
from mimajax.models import factory


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _workdir(tmp_path, *, legacy: bool, stage: int = 2):
  """A tiny trained-looking workdir: config.json, vae/, checkpoints/3/state in either layout."""
  config = tiny.get_config(str(stage))
  model = mimaface_factory.build_mimaface(config.model, stage=stage, rngs=nnx.Rngs(3),
                                          **config.model.objective.to_dict())  # fmt: skip
  raw = json.loads(config.to_json_best_effort())
  params = nnx.state(model, nnx.Param).to_pure_dict()
  if legacy:  # mimajax's first layout: no model.family; TrainState(step, params, opt_state, rng, bank, ema_params)
    del raw["model"]["family"]
    state = {"step": np.int32(3), "params": params, "rng": np.zeros(2, np.uint32)}
  else:
    state = {"step": np.int32(3), "params": {GROUP: params}, "rng": np.zeros(2, np.uint32)}
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "config.json").write_text(json.dumps(raw))
  diffusers_format.save_vae(factory.build_vae(config.model, rngs=nnx.Rngs(1)), tmp_path / "vae")
  with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the (async) save
    checkpointer.save((tmp_path / "checkpoints" / "3" / "state").absolute(), state)
  return model


@pytest.mark.parametrize("legacy", [False, True], ids=["groups", "before_groups"])
def test_a_workdir_loads_every_parameter(tmp_path, legacy):
  model = _workdir(tmp_path / "run", legacy=legacy)
  assert checkpointing.recorded_family(tmp_path / "run") == "mimaface"
  inf = load_inference(tmp_path / "run")
  want, got = _params(model), _params(inf.model)
  assert want.keys() == got.keys() and len(want) > 100
  assert all(np.array_equal(want[k], got[k]) for k in want)
  assert (inf.num_frames, inf.ica_frames) == (4, 1)  # the one ICA rule: F // 4


def test_a_checkpoint_of_another_config_names_the_keys(tmp_path):
  _workdir(tmp_path / "run", legacy=False, stage=1)
  raw = json.loads((tmp_path / "run" / "config.json").read_text())
  raw["stage"] = 2  # the config now asks for motion modules the checkpoint does not have
  (tmp_path / "run" / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointKeyError, match="missing keys") as e:
    load_inference(tmp_path / "run")
  assert any("motion_modules" in k for k in e.value.missing)


def test_a_group_the_checkpoint_lacks_is_named(tmp_path):
  _workdir(tmp_path / "run", legacy=False, stage=1)
  with pytest.raises(CheckpointReadError, match="no parameter group 'generator'"):
    checkpointing.checkpoint_params(tmp_path / "run", "generator")


def test_reading_a_state_needs_no_matching_mesh(tmp_path):
  _workdir(tmp_path / "run", legacy=False, stage=1)
  state = checkpointing.read_state(tmp_path / "run" / "checkpoints" / "3" / "state")
  leaf = jax.tree.leaves(state["params"])[0]
  assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _two_step_workdir(path):
  """Steps 3 and 4 of a stage-1 run, saved by the loop's Checkpointer (with checksums). In step 4 the U-Net's
  conv_in kernel holds random bits (incompressible, so stored raw: a test can find it on disk and damage it)."""
  model = _workdir(path, legacy=False, stage=1)
  shutil.rmtree(path / "checkpoints")
  params = nnx.state(model, nnx.Param).to_pure_dict()
  kernel = params["unet"]["conv_in"]["kernel"]
  bits = np.random.default_rng(0).integers(0, 2**32, kernel.shape, dtype=np.uint32)
  bits[(bits & 0x7F800000) == 0x7F800000] ^= 0x40000000  # finite floats with random bits
  newer = jax.tree.map(lambda x: x + 1.0, params)
  newer["unet"]["conv_in"]["kernel"] = bits.view(np.float32)
  ckpt = checkpointing.Checkpointer(path, every_steps=1, keep=5)
  for step, p in ((3, params), (4, newer)):
    opt = {GROUP: {"mu": jax.tree.map(np.zeros_like, p)}}
    ckpt.save(step, {"step": np.int32(step), "params": {GROUP: p}, "opt_state": opt, "rng": np.zeros(2, np.uint32)},
              force=True)  # fmt: skip
  ckpt.close()
  return model, newer["unet"]["conv_in"]["kernel"]


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_a_damaged_newest_step_loads_the_intact_older_one_with_a_warning(tmp_path, caplog, damage):
  model, kernel = _two_step_workdir(tmp_path / "run")
  raw = kernel.tobytes()
  stored = [(f, f.read_bytes().find(raw)) for f in (tmp_path / "run/checkpoints/4/state").rglob("*") if f.is_file()]
  f, at = next((f, at) for f, at in stored if at >= 0)
  data = bytearray(f.read_bytes())
  if damage == "truncated":
    data = data[:at]
  else:
    data[at + len(raw) // 2] ^= 0x01  # one low mantissa bit: the same size, a finite value, silently different
  f.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="mimajax"):
    inf = load_inference(tmp_path / "run")
  want, got = _params(model), _params(inf.model)  # step 3's parameters, every one
  assert all(np.array_equal(want[k], got[k]) for k in want)
  said = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("mimajax"))
  assert "checkpoints/4" in said and "using the newest intact one" in said and "checkpoints/3" in said
