"""The latent cache (data_pipeline/latent_cache.py, `mimajax cache-latents`): records carry the frozen VAE's latents
of every frame and render, the loader hands them over, the step uses them only when they are its own, and the loss
from the cache equals the loss with the same latents encoded in the step."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import loader, records

ROOT = Path(__file__).parents[1]


def _record(n=3, latents=None):
  frames = [records.encode_frame(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(n)]
  return records.Record("a/b/c", "a", 0, np.arange(n), np.zeros((n, 257), np.float32), frames, 8, 8,
                        latents=latents, render_latents=None if latents is None else latents + 1)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_record_keeps_its_latents_bit_for_bit(dtype):
  lat = np.random.default_rng(0).normal(size=(3, 2, 2, 4)).astype(dtype)
  back = records.decode_record(records.encode_record(_record(latents=lat)))
  assert back.latents.dtype == dtype and np.array_equal(back.latents, lat)
  assert np.array_equal(back.render_latents, lat + 1) and len(back.frames) == 3
  assert records.encode_record(_record(latents=lat))[:8] == b"MIMAREC2"  # older readers refuse, never misread
  assert records.encode_record(_record())[:8] == b"MIMAREC1"
  plain = records.decode_record(records.encode_record(_record()))
  assert plain.latents is None and plain.render_latents is None  # a prepare record is unchanged
  with pytest.raises(ValueError, match="ends inside its latents"):
    data = records.encode_record(_record(latents=lat))
    records.decode_record(data[: len(data) - sum(len(f) for f in _record().frames) - 40])
  with pytest.raises(ValueError, match=r"expected \(3, h, w, c\)"):
    _record(latents=lat[:2])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The demo data at 32 px, a random tiny VAE saved as a diffusers folder, and the cache of the data."""
  from configs import tiny
  from data_pipeline import demo_data
  from mimajax.convert import diffusers_format
  from mimajax.models import factory

  root = tmp_path_factory.mktemp("latents")
  demo_data.build(root / "data", resolution=32)
  config = tiny.get_config("1")
  vae = factory.build_vae(config.model, rngs=nnx.Rngs(3))
  diffusers_format.save_vae(vae, root / "vae")
  cmd = [sys.executable, "-m", "mimajax.cli", "cache-latents", "--data", str(root / "data"), "--vae",
         str(root / "vae"), "--out", str(root / "cache"), "--batch", "8", "--no-progress"]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return root, cmd, out.stdout


def _records(folder):
  from array_record.python.array_record_module import ArrayRecordReader

  paths, _ = loader.find_shards(folder)
  out = []
  for p in paths:
    reader = ArrayRecordReader(p)
    out += [records.decode_record(b) for b in reader.read(list(range(reader.num_records())))]
    reader.close()
  return out


def test_the_cache_holds_what_the_step_would_encode(cache):
  from mimajax.convert import diffusers_format
  from mimajax.face3d.landmark_model import load_face_model
  from mimajax.mimaface import conditioning

  root, _, stdout = cache
  assert stdout.strip().splitlines()[-1].startswith("shards=")
  plain, cached = _records(root / "data"), _records(root / "cache")
  assert [r.video_id for r in plain] == [r.video_id for r in cached] and len(cached) >= 9
  vae = diffusers_format.load_vae(root / "vae")
  face_model = load_face_model(root / "data" / "face_model.npz")
  section = json.loads((root / "cache" / "manifest.json").read_text())["latents"]
  assert section["resolution"] == 32 and section["dtype"] == "float32"
  for p, c in zip(plain[:3], cached[:3]):
    assert p.frames == c.frames and np.array_equal(p.coefficients, c.coefficients)
    frames = np.stack([records.decode_frame(f) for f in p.frames])
    want = conditioning.encode_frames(vae, jnp.asarray(frames))  # one call, not the cache's batches of 8
    renders = conditioning.render_latents(vae, face_model, jnp.asarray(p.coefficients), 32, "sh")
    assert c.latents.shape == (p.num_frames, 8, 8, 4)
    np.testing.assert_allclose(c.latents, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c.render_latents, renders, rtol=1e-5, atol=1e-5)


def test_a_rerun_skips_complete_shards_and_redoes_a_partial_one(cache):
  root, cmd, _ = cache
  shard = sorted((root / "cache").glob("*.array_record"))[0]
  before = shard.read_bytes()
  Path(str(shard) + ".123-dead.tmp").write_bytes(b"partial")  # a killed attempt's leftover
  shard.with_suffix(".json").unlink()  # its stats file lost: the shard counts as not done
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert " written=1 " in out.stdout and shard.read_bytes() == before
  assert not list((root / "cache").glob("*.tmp"))
  over = list(cmd)
  over[over.index("--out") + 1] = str(root / "data")
  bad = subprocess.run(over, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "never over it" in bad.stderr, bad.stderr
  # A cache in progress (no manifest yet) is resumed only with the settings it was started with.
  manifest = (root / "cache" / "manifest.json").read_text()
  (root / "cache" / "manifest.json").unlink()
  other = cmd + ["--dtype", "float16"]
  bad = subprocess.run(other, cwd=ROOT, capture_output=True, text=True, timeout=600)
  (root / "cache" / "manifest.json").write_text(manifest)
  assert bad.returncode == 2 and "latents made otherwise" in bad.stderr, bad.stderr


def test_the_loader_hands_over_the_clip_latents(cache):
  root, _, _ = cache
  cfg = loader.LoaderConfig(num_frames=2, batch_size=2, shuffle=False, latents=True)
  batch = next(loader.make_iterator(root / "cache", cfg, read_threads=1))
  by_id = {r.video_id: r for r in _records(root / "cache")}
  rec = next(r for r in by_id.values() if r.identity == batch["identity"][0])
  clip = [int(np.nonzero(rec.frame_indices == i)[0][0]) for i in batch["frame_indices"][0]]
  assert batch["latents"].shape == (2, 2, 8, 8, 4) and batch["latents"].dtype == np.float32
  np.testing.assert_array_equal(batch["latents"][0], rec.latents[clip])
  np.testing.assert_array_equal(batch["render_latents"][0], rec.render_latents[clip])
  with pytest.raises(ValueError, match="latents with flip"):
    loader.LoaderConfig(latents=True, flip=True)
  with pytest.raises(ValueError, match="has none"):
    next(loader.make_iterator(root / "data", cfg, read_threads=1))


def _task(root, workdir, *overrides):
  from configs import tiny
  from mimajax import families

  config = tiny.get_config("1")
  config.data.update(path=str(root / "cache"), resolution=32, flip=False, batch_size=2, read_threads=1)
  config.model.vae_from = str(root / "vae")
  for key, value in overrides:
    config.data[key] = value
  Path(workdir).mkdir(parents=True)
  return families.get("mimaface").build_task(config, Path(workdir))


def test_the_step_reads_the_cache_and_its_loss_is_the_in_step_one(cache, tmp_path, caplog):
  root, _, _ = cache
  with caplog.at_level(logging.INFO):
    task = _task(root, tmp_path / "a")
  assert "latents" in task.batch_keys and "render_latents" in task.batch_keys
  assert "no VAE encoding in the step" in caplog.text
  host = next(task.iterator)
  batch = {k: jnp.asarray(host[k]) for k in task.batch_keys}
  encoded = {k: v for k, v in batch.items() if k not in ("latents", "render_latents")}
  frozen = task.frozen
  a, b = task.prepare(frozen, batch), task.prepare(frozen, encoded)
  np.testing.assert_allclose(a["latents"], b["latents"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["render_latents"], b["render_latents"], rtol=1e-5, atol=1e-5)
  (group,) = task.modules
  loss = lambda prepared: task.losses[group](task.modules, prepared, jax.random.key(0), task.extra)[0]  # noqa: E731
  np.testing.assert_allclose(float(loss(a)), float(loss(b)), rtol=1e-5)


def test_a_cache_that_is_not_the_runs_is_refused_or_named(cache, tmp_path, caplog):
  root, _, _ = cache
  with caplog.at_level(logging.WARNING):
    task = _task(root, tmp_path / "a", ("flip", True))
  assert "latents" not in task.batch_keys and "config.data.flip is on" in caplog.text
  with pytest.raises(ValueError, match="config.data.resolution is 64"):
    _task(root, tmp_path / "b", ("resolution", 64), ("latents", "always"))
  task = _task(root, tmp_path / "c", ("blend_source", True))
  assert "latents" in task.batch_keys and "render_latents" not in task.batch_keys


@pytest.mark.slow  # two compilations of the tiny stage-1 step: ~5 minutes on 2 cores
def test_bench_train_prints_equal_losses_and_the_ratio_last(cache):
  root, _, _ = cache
  cmd = [sys.executable, "-m", "mimajax.cli", "bench", "train", "--cached-latents", "--config", "configs/tiny.py:1",
         "--data", str(root / "cache"), "--repeats", "2"]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  loss = [float(x) for x in re.findall(r"(?:cached|encoding) ([0-9]+\.[0-9]+)", lines[0])]
  assert len(loss) == 2 and loss[0] == pytest.approx(loss[1], rel=1e-5)
  assert lines[-1].startswith("ratio=") and float(lines[-1][6:]) > 0
  bad = subprocess.run(cmd[:-4] + ["--data", str(root / "data")], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "not a latent cache" in bad.stderr, bad.stderr


def test_beam_direct_runner_writes_the_local_caches_bytes(cache, tmp_path):
  pytest.importorskip("apache_beam")
  root, cmd, _ = cache
  beam = list(cmd)
  beam[beam.index("--out") + 1] = str(tmp_path / "beam")
  out = subprocess.run(beam + ["--runner", "direct"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  local = sorted(p.name for p in (root / "cache").iterdir())
  assert sorted(p.name for p in (tmp_path / "beam").iterdir()) == local
  assert any(name.endswith(".array_record") for name in local)
  for name in local:  # shards, stats, latents.json and the manifest
    assert (tmp_path / "beam" / name).read_bytes() == (root / "cache" / name).read_bytes(), name
