"""One loader of a trained MIMAFace for inference: a workdir in today's layout (parameter groups) and one
written before parameter groups existed both load, strictly; a workdir of another family is refused."""

import json

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
