"""The VAE stage (mimajax/mimaface/vae_stage.py): it learns, its VAE is what stage 1 freezes, LPIPS gradients are
finite, bad configs are refused naming the field.

The data is a few synthetic records (smooth colour patterns, three identities) written straight into ArrayRecord
shards at 32 px: the stage reads frames only, so no face or motion extraction is needed.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_pipeline import records
from mimajax import checkpointing, sharding, train, train_step
from mimajax.metrics import lpips
from mimajax.mimaface import family, vae_stage

pytestmark = pytest.mark.xdist_group("vae_stage")
RES = 32
IDENTITIES = ("alpha", "beta", "gamma")


def _frames(seed: int, n: int) -> np.ndarray:
  """n frames of one 'video': a colour gradient and a disc drifting across it."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:RES, 0:RES] / RES
  base = rng.uniform(0.2, 0.8, 3)
  tilt = rng.uniform(-0.3, 0.3, (2, 3))
  out = []
  for t in range(n):
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    cx, cy = 0.3 + 0.05 * t, 0.5 + 0.1 * np.sin(t + seed)
    img[(x - cx) ** 2 + (y - cy) ** 2 < 0.04] = 1 - base
    out.append(np.uint8(np.clip(img, 0, 1) * 255))
  return np.stack(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from array_record.python.array_record_module import ArrayRecordWriter

  root = tmp_path_factory.mktemp("vae_data")
  writer = ArrayRecordWriter(str(root / "records-00000-of-00001.array_record"), records.WRITER_OPTIONS)
  for i, name in enumerate(IDENTITIES):
    n = 8
    rec = records.Record(video_id=f"{name}/v/00001", speaker=name, identity=i, frame_indices=np.arange(n),
                         coefficients=np.zeros((n, 261), np.float32),
                         frames=[records.encode_frame(f) for f in _frames(i, n)], height=RES, width=RES)  # fmt: skip
    writer.write(records.encode_record(rec))
  writer.close()
  manifest = {"identities": list(IDENTITIES), "shards": [{"path": "records-00000-of-00001.array_record"}]}
  (root / "manifest.json").write_text(json.dumps(manifest))
  return root


def _vae_config(data, **overrides):
  config = tiny.get_config("vae")
  config.data.update(path=str(data), resolution=RES, batch_size=4, exclude_identities=("gamma",))
  config.model.attention_impl = "xla"
  config.log.progress_bar = False
  config.train.warmup_steps = 0
  config.checkpoint.update(every_steps=100, async_save=False)
  config.update(overrides)
  return config


def test_a_few_steps_reduce_the_loss_on_a_batch(data, cache_dir, tmp_path):
  config = _vae_config(data)
  run, ckpt = train.setup(config, tmp_path)
  host = {k: v for k, v in next(run.iterator).items() if k in run.task.batch_keys}
  assert host["frames"].shape == (4, RES, RES, 3)
  batch = sharding.to_global(host, run.mesh)
  step = train_step.jit_train_step(run.step_fn, run.state_shardings, {k: v.sharding for k, v in batch.items()},
                                   run.metrics_sharding, run.frozen_shardings)  # fmt: skip
  state, losses = run.state, []
  for _ in range(8):
    state, metrics = step(state, batch, run.frozen)
    assert bool(metrics["finite"])
    losses.append(float(metrics["loss"]))
  ckpt.close()
  assert losses[-1] < 0.8 * losses[0], losses
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["lpips"]) > 0


def test_held_out_identities_never_reach_the_loader(data):
  it = vae_stage.data_iterator(_vae_config(data))
  seen = {int(i) for _ in range(6) for i in np.atleast_1d(next(it)["identity"])}
  assert seen == {0, 1}  # "gamma" (2) is held out


def test_the_trained_vae_is_the_frozen_vae_of_stage_1_and_of_its_workdir(data, cache_dir, tmp_path):
  vae_dir = tmp_path / "vae_run"
  args = ["--config", "configs/tiny.py:vae", "--workdir", str(vae_dir), "--config.total_steps=2",
          f"--config.data.path={data}", f"--config.data.resolution={RES}", "--config.data.batch_size=4",
          "--config.data.exclude_identities=('gamma',)", "--config.model.attention_impl=xla",
          "--config.log.progress_bar=False", "--config.sample.every_steps=2",
          "--config.train.warmup_steps=0"]  # fmt: skip
  assert train.main(args) == 0
  assert (vae_dir / "samples" / "step_0000002.png").is_file()
  exported = json.loads((vae_dir / "vae" / "config.json").read_text())
  assert exported["scaling_factor"] > 0 and exported["scaling_factor"] != 0.18215  # 1 / std of its latents
  trained = checkpointing.checkpoint_params(vae_dir, vae_stage.GROUP)

  config = tiny.get_config("1")
  config.data.update(path=str(data), resolution=RES)
  config.model.vae_from = str(vae_dir)
  family.check_config(config)
  stage1 = tmp_path / "stage1"
  stage1.mkdir()
  task = family.build_task(config, stage1)
  frozen = {tuple(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(task.frozen["vae"])}
  assert frozen.keys() == trained.keys()
  for key, value in trained.items():
    np.testing.assert_array_equal(frozen[key], value, err_msg="/".join(key))
  # stage 1's workdir keeps it (inference, stage 2 and a resumed run read it there), scaling factor included
  kept = json.loads((stage1 / "vae" / "config.json").read_text())
  assert kept["scaling_factor"] == exported["scaling_factor"]

  result = vae_stage.evaluate(vae_dir)  # the held-out identity's frames
  assert result["frames"] == 8 and set(result) == {"gamma", "frames", "psnr"} and np.isfinite(result["psnr"])
  assert vae_stage.main(["--eval", str(vae_dir)]) == 0


def test_lpips_gradient_is_finite_even_for_identical_and_flat_images():
  params = jax.tree.map(jnp.asarray, lpips.LPIPS.load("alex").params)
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.uniform(0, 1, (2, RES, RES, 3)), jnp.float32)
  grad = jax.grad(lambda x, y: jnp.sum(lpips._distance("alex", params, x, y)))
  for x in (y + 0.1 * jnp.asarray(rng.normal(size=y.shape), jnp.float32), y, jnp.zeros_like(y)):
    g = np.asarray(grad(x, y))
    assert np.all(np.isfinite(g))
  assert np.abs(np.asarray(grad(y + 0.1, y))).max() > 0


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda c: c.data.update(path="/no/such/data"), "config.data.path=/no/such/data does not exist"),
    (lambda c: c.data.update(exclude_identities=("nobody",)), "exclude_identities names ['nobody']"),
    (lambda c: c.data.update(num_frames=4), "num_frames must be 1"),
    (lambda c: c.vae_stage.update(disc_loss="wgan"), "disc_loss must be 'hinge' or 'lsgan'"),
  ],
)
def test_bad_vae_stage_config_is_a_clear_value_error(data, change, message):
  config = _vae_config(data)
  change(config)
  with pytest.raises(ValueError, match=None) as e:
    family.check_config(config)
  assert message in str(e.value)


def test_vae_from_must_match_the_architecture(data, tmp_path):
  vae = vae_stage.build_vae(_vae_config(data))
  from mimajax.convert import diffusers_format

  diffusers_format.save_vae(vae, tmp_path / "vae")
  config = tiny.get_config("1")
  config.model.vae.block_out_channels = (32, 64)
  with pytest.raises(ValueError, match="block_out_channels"):
    vae_stage.load_vae(tmp_path, config.model)
  assert Path(vae_stage.vae_folder(tmp_path)) == tmp_path / "vae"
