"""Grain loaders: clips hold the exact video frames and coefficients, determinism, exact resumption, host sharding."""

from pathlib import Path

import cv2
import grain
import jax
import numpy as np
import pytest

from data_pipeline import clip_files, loader, prepare
from mimajax import cli, sharding

# imageio-ffmpeg and the resume test start subprocesses (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

SIZE = 32
LENGTHS = (40, 30, 26, 5, 50, 33)  # the 5-frame clip is too short for 12-frame clips (but fine for images)


def _write_clip(root, video_id, num_frames, seed):
  path = Path(root) / (video_id + ".mp4")
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (SIZE, SIZE))
  for i in range(num_frames):
    frame = np.full((SIZE, SIZE, 3), (30 * seed % 255, 200 - 3 * i, 60), np.uint8)
    frame[(i * 3) % SIZE : (i * 3) % SIZE + 5, : SIZE // 3] = 255  # asymmetric: a flip is visible
    writer.write(frame)
  writer.release()
  coeffs = np.random.default_rng(seed).normal(size=(num_frames, 261)).astype(np.float32)
  np.save(path.with_suffix(".npy"), coeffs)
  return path, coeffs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Six clips of four speakers, stored losslessly (PNG) so loader frames can be compared exactly."""
  root = tmp_path_factory.mktemp("loader")
  clips = {}
  for i, n in enumerate(LENGTHS):
    vid = f"id{i % 4:05d}/video{i}/00001"
    path, coeffs = _write_clip(root / "videos", vid, n, seed=i)
    clips[vid] = (clip_files.read_video(str(path)), coeffs)
  options = prepare.PrepareOptions(resolution=SIZE, frames_per_record=20, shard_size=2, image_format="png")
  manifest = prepare.prepare(root / "videos", root / "out", options=options, progress=False)
  source = grain.sources.ArrayRecordDataSource(loader.find_shards(root / "out")[0])
  from data_pipeline import records

  video_of = [records.decode_record(source[i]).video_id for i in range(len(source))]
  return dict(out=root / "out", clips=clips, manifest=manifest, video_of=video_of)


def batches(data, config, n, **kw):
  it = loader.make_iterator(data, config, process_index=kw.pop("process_index", 0),
                            process_count=kw.pop("process_count", 1), **kw)  # fmt: skip
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_clips_hold_the_exact_frames_and_coefficients_of_their_video(dataset):
  cfg = loader.LoaderConfig(num_frames=12, stride=2, batch_size=4, seed=3)
  for batch in batches(dataset["out"], cfg, 6):
    assert batch["frames"].shape == (4, 12, SIZE, SIZE, 3) and batch["frames"].dtype == np.uint8
    assert batch["motion"].shape == (4, 12, 261) and batch["source_frame"].shape == (4, SIZE, SIZE, 3)
    for b in range(4):
      video, coeffs = dataset["clips"][dataset["video_of"][batch["record_index"][b]]]
      idx, src = batch["frame_indices"][b], batch["source_index"][b]
      np.testing.assert_array_equal(batch["frames"][b], video[idx])
      np.testing.assert_array_equal(batch["motion"][b], coeffs[idx])
      np.testing.assert_array_equal(batch["source_frame"][b], video[src])
      np.testing.assert_array_equal(batch["source_motion"][b], coeffs[src])
      assert (np.diff(idx) <= 2).all() and (np.diff(idx) >= 1).all()  # stride 2, lowered for 20-frame records
      assert not idx[0] <= src <= idx[-1]  # the source frame lies outside the clip
      speaker = dataset["video_of"][batch["record_index"][b]].split("/")[0]
      assert batch["identity"][b] == dataset["manifest"]["identities"].index(speaker)


def test_short_records_are_left_out_of_clips_but_not_images(dataset):
  short = {i for i, v in enumerate(dataset["video_of"]) if v.endswith("video3/00001")}
  one_epoch = dict(batch_size=1, num_epochs=1, drop_remainder=False)
  it = loader.make_iterator(dataset["out"], loader.LoaderConfig(num_frames=12, **one_epoch), process_index=0,
                            process_count=1)  # fmt: skip
  seen = [int(b["record_index"][0]) for b in it]
  assert short and not set(seen) & short
  assert sorted(seen) == sorted(set(range(len(dataset["video_of"]))) - short)  # each other record once per epoch
  it = loader.make_iterator(dataset["out"], loader.LoaderConfig(num_frames=1, **{**one_epoch, "batch_size": 2}),
                            process_index=0, process_count=1)  # fmt: skip
  images = list(it)
  assert {int(i) for b in images for i in b["record_index"]} == set(range(len(dataset["video_of"])))
  b = images[0]
  assert b["frames"].shape == (2, SIZE, SIZE, 3) and b["motion"].shape == (2, 261) and b["frame_indices"].shape == (2,)
  assert (b["frame_indices"] != b["source_index"]).all()


def test_same_seed_same_batches_other_seed_other_batches(dataset):
  cfg = loader.LoaderConfig(num_frames=4, batch_size=3, flip=True, seed=7)
  a, b = batches(dataset["out"], cfg, 5), batches(dataset["out"], cfg, 5)
  assert_batches_equal(a, b)
  c = batches(dataset["out"], loader.LoaderConfig(num_frames=4, batch_size=3, flip=True, seed=8), 5)
  assert any(not np.array_equal(x["frame_indices"], y["frame_indices"]) for x, y in zip(a, c))


def test_saved_iterator_state_continues_exactly(dataset):
  cfg = loader.LoaderConfig(num_frames=4, batch_size=3, flip=True, seed=1)
  reference = batches(dataset["out"], cfg, 12)  # crosses epoch boundaries (13 records / 3 per batch)
  it = loader.make_iterator(dataset["out"], cfg, process_index=0, process_count=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  resumed = loader.make_iterator(dataset["out"], cfg, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_batches_equal([next(resumed) for _ in range(5)], reference[7:])


def test_worker_processes_give_the_same_batches_and_resume(dataset):
  cfg = loader.LoaderConfig(num_frames=4, batch_size=2, seed=5)
  reference = batches(dataset["out"], cfg, 6)
  it = loader.make_iterator(dataset["out"], cfg, process_index=0, process_count=1, workers=2)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  assert_batches_equal(first, reference[:3])
  resumed = loader.make_iterator(dataset["out"], cfg, process_index=0, process_count=1, workers=2)
  resumed.set_state(state)
  assert_batches_equal([next(resumed) for _ in range(3)], reference[3:])


def test_two_hosts_read_disjoint_records_that_cover_the_dataset(dataset):
  cfg = loader.LoaderConfig(num_frames=1, batch_size=1, num_epochs=1, drop_remainder=False)
  seen = []
  for host in range(2):
    it = loader.make_iterator(dataset["out"], cfg, process_index=host, process_count=2)
    seen.append([int(b["record_index"][0]) for b in it])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(len(dataset["video_of"])))
  assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_flip_mirrors_the_whole_clip_and_the_pose(dataset):
  plain = batches(dataset["out"], loader.LoaderConfig(num_frames=3, batch_size=8, seed=2), 2)
  flip = batches(dataset["out"], loader.LoaderConfig(num_frames=3, batch_size=8, seed=2, flip=True), 2)
  flipped = np.concatenate([b["flipped"] for b in flip])
  assert flipped.any() and not flipped.all()
  for p, f in zip(plain, flip):
    np.testing.assert_array_equal(p["frame_indices"], f["frame_indices"])
    for b in range(8):
      mirror = f["flipped"][b]
      np.testing.assert_array_equal(f["frames"][b], p["frames"][b][:, :, ::-1] if mirror else p["frames"][b])
      np.testing.assert_array_equal(
        f["source_frame"][b], p["source_frame"][b][:, ::-1] if mirror else p["source_frame"][b]
      )
      expected = loader.mirror_coefficients(p["motion"][b]) if mirror else p["motion"][b]
      np.testing.assert_array_equal(f["motion"][b], expected)


def test_mirror_coefficients_negates_yaw_roll_x_translation_x_odd_lighting_and_odd_gaze():
  c = np.arange(1, 262, dtype=np.float32)[None]
  m = loader.mirror_coefficients(c)
  changed = np.nonzero(m[0] != c[0])[0]
  assert changed.tolist() == [225, 226, 227 + 3, 227 + 4, 227 + 7, 236 + 3, 236 + 4, 236 + 7, 245 + 3, 245 + 4,
                              245 + 7, 254, 257, 260]  # fmt: skip
  np.testing.assert_array_equal(m[0, changed], -c[0, changed])
  np.testing.assert_array_equal(loader.mirror_coefficients(m), c)
  np.testing.assert_array_equal(loader.mirror_coefficients(c[:, :257]), m[:, :257])  # rows without gaze


def test_resolution_coefficient_dim_and_float_frames(dataset):
  cfg = loader.LoaderConfig(num_frames=2, batch_size=2, resolution=16, source_resolution=8, coefficient_dim=257,
                            float_frames=True)  # fmt: skip
  (b,) = batches(dataset["out"], cfg, 1)
  assert b["frames"].shape == (2, 2, 16, 16, 3) and b["source_frame"].shape == (2, 8, 8, 3)
  assert b["frames"].dtype == np.float32 and 0 <= b["frames"].min() and b["frames"].max() <= 1
  assert b["motion"].shape == (2, 2, 257)


def test_bad_host_arguments_are_clear_errors(dataset):
  with pytest.raises(ValueError, match="process_index=2"):
    loader.dataset(dataset["out"], loader.LoaderConfig(), process_index=2, process_count=2)
  with pytest.raises(ValueError, match="no .array_record shards"):
    loader.find_shards([])


def test_to_global_makes_sharded_arrays(dataset):
  (batch,) = batches(dataset["out"], loader.LoaderConfig(num_frames=2, batch_size=len(jax.devices())), 1)
  mesh = sharding.make_mesh({"data": -1})
  arrays = sharding.to_global(batch, mesh)
  for k, v in batch.items():
    assert arrays[k].shape == v.shape and arrays[k].sharding == sharding.batch_sharding(mesh, v.ndim)
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_bench_loader_prints_clips_per_s_last(capsys):
  argv = ["bench", "loader", "--resolution", "64", "--videos", "2", "--num-frames", "4", "--batch", "2",
          "--seconds", "0.5", "--read-threads", "2"]  # fmt: skip
  assert cli.main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("clips_per_s=") and float(out[-1].split("=")[1]) > 0
  assert any("clips/s per GPU" in line and "assumed" in line for line in out)


def test_demo_dataset_is_real_faces_with_extracted_coefficients(tmp_path):
  pytest.importorskip("skimage")
  pytest.importorskip("matplotlib")
  from data_pipeline import demo_data

  manifest = demo_data.build(tmp_path, resolution=64)
  extracted = demo_data.extractor_available()  # without mediapipe's models: placeholders (and a warning)
  assert manifest["coefficients_source"] == ("mediapipe" if extracted else "placeholder")
  assert (tmp_path / "face_model.npz").exists() == extracted
  assert {"carphone", "astronaut", "grace_hopper"} <= set(manifest["identities"])
  assert manifest["counts"]["videos"] == manifest["counts"]["videos_found"] == 3 + demo_data.NUM_LFW_FACES
  (b,) = batches(tmp_path, loader.LoaderConfig(num_frames=12, batch_size=2), 1)
  assert b["frames"].shape == (2, 12, 64, 64, 3) and b["frames"].std() > 10  # real image content
  assert b["motion"].shape == (2, 12, 261 if extracted else 257)
