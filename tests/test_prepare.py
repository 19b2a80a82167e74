"""`mimajax prepare`: exact round trip into shards, resumption after a kill, bad input skipped and counted."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline import clip_files, prepare, records
from mimajax import cli
from mimajax.face3d import coefficient_files
from mimajax.faces import detection

# the resume test starts a subprocess (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

SIZE = 32


def write_video(path, num_frames, seed=0, size=(SIZE, SIZE)):
  """A small mp4 whose frames all differ (a moving bar on a per-video colour)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = size
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
  for i in range(num_frames):
    frame = np.full((h, w, 3), (40 * seed % 255, 90, 20 + 5 * i % 200), np.uint8)
    frame[:, (2 * i) % w : (2 * i) % w + 4] = 255
    writer.write(frame)
  writer.release()
  return path


def add_clip(root, video_id, num_frames, seed=0, dim=257, ext=".npy", size=(SIZE, SIZE)):
  """<root>/<video_id>.mp4 and its coefficients; returns the coefficients."""
  path = write_video(Path(root) / (video_id + ".mp4"), num_frames, seed, size)
  coeffs = np.random.default_rng(seed).normal(size=(num_frames, dim)).astype(np.float32)
  if ext == ".npy":
    np.save(path.with_suffix(".npy"), coeffs)
  else:
    scipy.io.savemat(path.with_suffix(".mat"), {"coeff": coeffs})
  return coeffs


def read_records(folder):
  out = []
  for shard in json.loads((Path(folder) / "manifest.json").read_text())["shards"]:
    reader = ArrayRecordReader(str(Path(folder) / shard["path"]))
    out += [records.decode_record(b) for b in reader.read_all()]
    reader.close()
  return out


def shard_bytes(folder):
  return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.array_record"))}


def test_round_trip_frames_and_coefficients_exact(tmp_path):
  """PNG storage at the video's own size: every stored frame equals the decoded video frame bit for bit."""
  src = tmp_path / "in"
  coeffs = {"id00001/vidA/00001": add_clip(src, "id00001/vidA/00001", 40, seed=1),
            "id00001/vidB/00001": add_clip(src, "id00001/vidB/00001", 70, seed=2, dim=261, ext=".mat"),
            "id00002/vidC/00001": add_clip(src, "id00002/vidC/00001", 9, seed=3)}  # fmt: skip
  options = prepare.PrepareOptions(resolution=SIZE, frames_per_record=32, shard_size=2, image_format="png")
  manifest = prepare.prepare(src, tmp_path / "out", options=options, progress=False)
  assert manifest["identities"] == ["id00001", "id00002"]
  assert manifest["counts"]["videos"] == 3 and manifest["counts"]["frames"] == 119
  assert manifest["coefficient_dims"] == {"257": 2, "261": 1}
  recs = read_records(tmp_path / "out")
  assert [(r.video_id, r.num_frames) for r in recs] == [
    ("id00001/vidA/00001", 20), ("id00001/vidA/00001", 20),  # 40 frames: two balanced segments
    ("id00001/vidB/00001", 23), ("id00001/vidB/00001", 24), ("id00001/vidB/00001", 23),
    ("id00002/vidC/00001", 9),
  ]  # fmt: skip
  assert manifest["counts"]["records"] == len(recs)
  videos = {vid: clip_files.read_video(str(src / (vid + ".mp4"))) for vid in coeffs}
  for r in recs:
    assert r.identity == (0 if r.speaker == "id00001" else 1)
    np.testing.assert_array_equal(r.coefficients, coeffs[r.video_id][r.frame_indices])
    decoded = np.stack([records.decode_frame(f) for f in r.frames])
    np.testing.assert_array_equal(decoded, videos[r.video_id][r.frame_indices])
  covered = np.concatenate([r.frame_indices for r in recs if r.video_id == "id00001/vidB/00001"])
  np.testing.assert_array_equal(covered, np.arange(70))


def test_jpeg_frames_within_jpeg_tolerance(tmp_path):
  add_clip(tmp_path / "in", "id1/v/00001", 12)
  options = prepare.PrepareOptions(resolution=SIZE, shard_size=1, quality=95)
  prepare.prepare(tmp_path / "in", tmp_path / "out", options=options, progress=False)
  (rec,) = read_records(tmp_path / "out")
  video = clip_files.read_video(str(tmp_path / "in/id1/v/00001.mp4"))
  err = np.abs(np.stack([records.decode_frame(f) for f in rec.frames]).astype(int) - video.astype(int))
  assert err.mean() < 2.0, err.mean()


def test_record_bytes_round_trip_and_scaled_jpeg_decoding():
  rng = np.random.default_rng(0)
  image = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
  jpeg = records.encode_frame(image, quality=95)
  rec = records.Record("id1/v/00001", "id1", 3, [7, 8], np.ones((2, 261)), [jpeg, jpeg], 64, 64)
  for copy_frames in (True, False):
    back = records.decode_record(records.encode_record(rec), copy_frames=copy_frames)
    assert (back.video_id, back.speaker, back.identity, back.height, back.image_format) == ("id1/v/00001", "id1", 3,
                                                                                          64, "jpeg")  # fmt: skip
    np.testing.assert_array_equal(back.frame_indices, [7, 8])
    np.testing.assert_array_equal(back.coefficients, np.ones((2, 261), np.float32))
    assert [bytes(f) for f in back.frames] == [jpeg, jpeg]
  assert records.jpeg_size(jpeg) == (64, 64)
  half = records.decode_frame(jpeg, 32)  # decoded at half size in the DCT domain
  reference = cv2.resize(records.decode_frame(jpeg), (32, 32), interpolation=cv2.INTER_AREA)
  assert half.shape == (32, 32, 3) and np.abs(half.astype(int) - reference).mean() < 3
  reduced = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
  np.testing.assert_array_equal(half, reduced[..., ::-1])
  with pytest.raises(ValueError, match="not a mimajax record"):
    records.decode_record(b"garbage" * 4)


def test_center_crop_and_resize():
  frame = np.zeros((32, 48, 3), np.uint8)
  frame[:, :8] = (255, 0, 0)  # left margin, outside the centre square
  frame[:, 8:40] = (0, 200, 0)
  out = detection.crop_and_resize(frame, None, 16)
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 200, 0], np.uint8), (16, 16, 3)))
  padded = detection.crop_and_resize(frame, (-8, 0, 32), 32)  # a face box leaving the frame is edge-padded
  np.testing.assert_array_equal(padded[:, :8], np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 8, 3)))


def test_segments_are_balanced():
  assert prepare.segment_bounds(64, 64) == [(0, 64)]
  assert prepare.segment_bounds(65, 64) == [(0, 32), (32, 65)]
  assert prepare.segment_bounds(130, 64) == [(0, 43), (43, 87), (87, 130)]


def test_bad_inputs_are_skipped_and_counted_in_parallel_workers(tmp_path):
  src = tmp_path / "in"
  add_clip(src, "id1/good/00001", 10)
  (src / "id1/unreadable").mkdir(parents=True)
  (src / "id1/unreadable/00001.mp4").write_bytes(b"not a video at all" * 10)
  np.save(src / "id1/unreadable/00001.npy", np.zeros((10, 257), np.float32))
  write_video(src / "id2/nocoeff/00001.mp4", 10)
  add_clip(src, "id2/mismatch/00001", 10)
  np.save(src / "id2/mismatch/00001.npy", np.zeros((11, 257), np.float32))
  add_clip(src, "id3/nan/00001", 10)
  bad = np.zeros((10, 257), np.float32)
  bad[4, 100] = np.nan
  np.save(src / "id3/nan/00001.npy", bad)
  add_clip(src, "id3/shape/00001", 10, dim=100)
  write_video(src / "id3/garbage/00001.mp4", 10)
  (src / "id3/garbage/00001.npy").write_bytes(b"garbage")
  add_clip(src, "id4/matnokey/00001", 10, ext=".mat")
  scipy.io.savemat(src / "id4/matnokey/00001.mat", {"other": np.zeros((10, 257))})
  add_clip(src, "id4/short/00001", 1)
  options = prepare.PrepareOptions(resolution=16, shard_size=3)
  manifest = prepare.prepare(src, tmp_path / "out", options=options, workers=2, progress=False)
  expected = {
    "id1/unreadable/00001": "unreadable_video",
    "id2/nocoeff/00001": "missing_coefficients",
    "id2/mismatch/00001": "coefficient_frames_mismatch",
    "id3/nan/00001": "nan_coefficients",
    "id3/shape/00001": "bad_coefficient_shape",
    "id3/garbage/00001": "unreadable_coefficients",
    "id4/matnokey/00001": "unreadable_coefficients",
    "id4/short/00001": "too_short",
  }
  assert {s["video_id"]: s["reason"] for s in manifest["skipped"]} == expected
  counts = manifest["counts"]
  assert counts["videos_found"] == 9 and counts["videos"] == 1 and counts["records"] == 1
  assert counts["skipped"]["unreadable_coefficients"] == 2
  assert sum(counts["skipped"].values()) == 8
  assert [r.video_id for r in read_records(tmp_path / "out")] == ["id1/good/00001"]
  assert json.loads((tmp_path / "out/manifest.json").read_text())["counts"] == counts


def test_no_face_is_skipped_and_logged_with_detect_crop(tmp_path, caplog):
  src = tmp_path / "in"
  add_clip(src, "id1/blank/00001", 6, size=(64, 64))
  with caplog.at_level("WARNING", logger="data_pipeline.prepare"):
    manifest = prepare.prepare(src, tmp_path / "out", options=prepare.PrepareOptions(resolution=32, crop="detect"),
                               progress=False)  # fmt: skip
  assert manifest["counts"]["skipped"]["no_face"] == 1 and manifest["counts"]["videos"] == 0
  assert "skipped id1/blank/00001: no_face" in caplog.text


def test_detect_crop_finds_the_real_face():
  pytest.importorskip("skimage")
  from data_pipeline import demo_data

  image = demo_data.portraits()["astronaut"]
  path = Path(os.environ.get("TMPDIR", "/tmp")) / f"astronaut_{os.getpid()}.mp4"
  try:
    demo_data.write_mp4(path, np.stack([image] * 3))
    x0, y0, side = clip_files.clip_face_box(str(path), margin=1.0)
    # animate's box of the same frames (every decoded frame handed over) is the same box
    assert detection.video_face_box(iter(clip_files.read_video(str(path))), margin=1.0) == (x0, y0, side)
  finally:
    path.unlink(missing_ok=True)
  # the astronaut's face lies around x 180-270, y 70-160 in the 512x512 photograph
  assert 150 < x0 + side / 2 < 260 and 80 < y0 + side / 2 < 170 and 60 < side < 160, (x0, y0, side)


def test_dataset_coefficients_are_full_rows_only(tmp_path):
  """The shared reader in prepare's mode: Deep3DFaceRecon rows only, no single rows or SadTalker's partial rows."""
  scipy.io.savemat(tmp_path / "sad.mat", {"coeff_3dmm": np.zeros((3, 70))})
  np.save(tmp_path / "sad.npy", np.zeros((3, 70), np.float32))
  np.save(tmp_path / "row.npy", np.zeros(257, np.float32))
  scipy.io.savemat(tmp_path / "ok.mat", {"coeff": np.ones((3, 261))})
  for name, reason in (("sad.mat", "unreadable"), ("sad.npy", "shape"), ("row.npy", "shape")):
    with pytest.raises(coefficient_files.CoefficientError) as e:
      coefficient_files.read_coefficients(tmp_path / name, training_rows=True)
    assert e.value.reason == reason, (name, e.value)
    assert coefficient_files.read_coefficients(tmp_path / name)[0].shape[1] == 257  # as a driver it is read
  rows, kind = coefficient_files.read_coefficients(tmp_path / "ok.mat", training_rows=True)
  assert rows.shape == (3, 261) and kind == "coefficients"
  with pytest.raises(coefficient_files.CoefficientError, match=r"expected \(frames, 257\)"):
    coefficient_files.read_coefficients(tmp_path / "ok.mat", width=257, training_rows=True)


def _dataset_for_resume(root, fifo_last=False):
  for i in range(4):
    add_clip(root, f"id{i % 2}/v{i}/00001", 8 + i, seed=i)
  add_clip(root, "id9/last/00001", 12, seed=9)
  if fifo_last:  # the last clip's coefficients block prepare until killed: a kill mid-job, deterministically
    last = Path(root) / "id9/last/00001.npy"
    last.unlink()
    os.mkfifo(last)


def test_resume_after_sigkill_equals_a_clean_run(tmp_path):
  _dataset_for_resume(tmp_path / "clean")
  args = ["--resolution", "16", "--shard-size", "1", "--workers", "1", "--no-progress"]
  prepare.main(["--input", str(tmp_path / "clean"), "--output", str(tmp_path / "out_clean"), *args])

  _dataset_for_resume(tmp_path / "in", fifo_last=True)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_pipeline.prepare", "--input", str(tmp_path / "in"), "--output", str(out), *args]
  proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while len(list(out.glob("*.array_record"))) < 4 and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, "prepare ended before the kill"
    assert list(out.glob("records-00004-of-00005.array_record.*.tmp"))  # the shard it was writing
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert len(list(out.glob("*.array_record"))) == 4 and not (out / "manifest.json").exists()
  finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}

  fifo = tmp_path / "in/id9/last/00001.npy"
  fifo.unlink()
  fifo.write_bytes((tmp_path / "clean/id9/last/00001.npy").read_bytes())
  manifest = prepare.prepare(tmp_path / "in", out, options=prepare.PrepareOptions(resolution=16, shard_size=1),
                             progress=False)  # fmt: skip
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record") if p.name in finished} == finished
  assert not list(out.glob("*.tmp"))
  assert shard_bytes(out) == shard_bytes(tmp_path / "out_clean")
  clean = json.loads((tmp_path / "out_clean/manifest.json").read_text())
  assert manifest["counts"] == clean["counts"] and manifest["shards"] == clean["shards"]


def test_rerun_with_other_options_is_refused(tmp_path):
  add_clip(tmp_path / "in", "id1/v/00001", 4)
  prepare.prepare(tmp_path / "in", tmp_path / "out", options=prepare.PrepareOptions(resolution=16), progress=False)
  with pytest.raises(ValueError, match="other videos or options"):
    prepare.prepare(tmp_path / "in", tmp_path / "out", options=prepare.PrepareOptions(resolution=24), progress=False)


def test_empty_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no videos"):
    prepare.prepare(tmp_path, tmp_path / "out", progress=False)


def test_prepare_command_and_coefficients_folder(tmp_path, capsys):
  add_clip(tmp_path / "in", "id1/v/00001", 6)
  (tmp_path / "coeffs/id1/v").mkdir(parents=True)
  os.replace(tmp_path / "in/id1/v/00001.npy", tmp_path / "coeffs/id1/v/00001.npy")
  argv = ["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--coefficients",
          str(tmp_path / "coeffs"), "--resolution", "16", "--workers", "1", "--no-progress"]  # fmt: skip
  assert cli.main(argv) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == "videos=1/1 records=1 frames=6 skipped={}"


def test_tfds_builder_writes_array_record_readable_by_data_source(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from data_pipeline import voxceleb2_mima

  manual = tmp_path / "manual"
  coeffs = add_clip(manual / "dev/mp4", "id00001/vid/00001", 20, seed=4)
  add_clip(manual / "test/mp4", "id00002/vid/00001", 14, seed=5)
  add_clip(manual / "test/mp4", "id00003/short/00001", 5, seed=6)  # shorter than min_frames=13: skipped
  source = voxceleb2_mima.data_source(tmp_path / "tfds", split="train", config="256", manual_dir=manual)
  assert len(source) == 1
  ex = source[0]
  rec = records.from_tfds_example(ex)
  assert rec.video_id == "id00001/vid/00001" and rec.identity == 0 and rec.num_frames == 20
  np.testing.assert_array_equal(rec.coefficients, coeffs)
  assert records.decode_frame(rec.frames[3]).shape == (256, 256, 3)
  assert list(tmp_path.glob("tfds/voxceleb2_mima/256/1.0.0/*.array_record-*"))
  test = voxceleb2_mima.data_source(tmp_path / "tfds", split="test", config="256")
  assert len(test) == 1 and records.from_tfds_example(test[0]).identity == 1
  # the Grain loader streams the TFDS source like prepared shards
  from data_pipeline import loader

  it = loader.make_iterator(source, loader.LoaderConfig(num_frames=12, batch_size=1), process_index=0, process_count=1)
  batch = next(it)
  idx = batch["frame_indices"][0]
  frames = np.stack([records.decode_frame(rec.frames[i]) for i in idx])
  np.testing.assert_array_equal(batch["frames"][0], frames)
  np.testing.assert_array_equal(batch["motion"][0], coeffs[idx])


def _cut_video(path, num_frames=30):
  """A faststart mp4 (its index first) of noise frames, cut in half: the container declares num_frames, fewer
  decode (a truncated download). Noise: no face, and too many bytes for the cut to miss the frames."""
  import imageio_ffmpeg

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  frames = np.random.default_rng(0).integers(0, 255, (num_frames, 64, 64, 3), dtype=np.uint8)
  writer = imageio_ffmpeg.write_frames(str(path), (64, 64), fps=25, macro_block_size=1, ffmpeg_log_level="error",
                                       output_params=["-movflags", "+faststart"])  # fmt: skip
  writer.send(None)
  for frame in frames:
    writer.send(frame)
  writer.close()
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  return path


@pytest.mark.parametrize("crop", ["detect", "center"])
def test_a_video_that_decodes_only_partly_is_unreadable_not_faceless_or_mismatched(tmp_path, crop):
  src = tmp_path / "in"
  _cut_video(src / "id1/cut/00001.mp4", 30)
  np.save(src / "id1/cut/00001.npy", np.zeros((30, 257), np.float32))
  options = prepare.PrepareOptions(resolution=16, crop=crop)
  manifest = prepare.prepare(src, tmp_path / "out", options=options, progress=False)
  (skipped,) = manifest["skipped"]
  assert skipped["reason"] == "unreadable_video", skipped
  assert re.search(r"decodes only \d+ of the 30 frames", skipped["message"]), skipped


def _prepare_cli(tmp_path, src):
  return ["prepare", "--input", str(src), "--output", str(tmp_path / "out"), "--resolution", "16", "--workers", "1",
          "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_a_missing_or_empty_input_is_one_line_and_exit_2(tmp_path, capsys, kind):
  src = tmp_path / "in"
  if kind == "empty":
    src.mkdir()
  elif kind == "file":
    src.write_text("not a folder")
  assert cli.main(_prepare_cli(tmp_path, src)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mimajax prepare: error:") and str(src) in err and "expected <speaker>/<video>/<clip>" in err
  assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_prepare_exits_1_naming_the_skips_when_every_video_is_skipped(tmp_path, capsys):
  src = tmp_path / "in"
  (src / "id1/unreadable").mkdir(parents=True)
  (src / "id1/unreadable/00001.mp4").write_bytes(b"not a video at all" * 10)
  np.save(src / "id1/unreadable/00001.npy", np.zeros((10, 257), np.float32))
  write_video(src / "id2/nocoeff/00001.mp4", 10)
  assert cli.main(_prepare_cli(tmp_path, src)) == 1
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1].startswith("videos=0/2 ")
  last = captured.err.strip().splitlines()[-1]
  assert last.startswith("mimajax prepare: error: all 2 videos were skipped")
  assert "unreadable_video: 1" in last and "missing_coefficients: 1" in last and "manifest.json" in last


def _demo_and_bad_inputs(root):
  """The demo's clips (placeholder coefficients) plus the bad inputs of the must-show: an unreadable video, NaN
  coefficients, a frame-count mismatch."""
  from data_pipeline import demo_data

  demo_data.write_demo_videos(root)
  (root / "bad/unreadable").mkdir(parents=True)
  (root / "bad/unreadable/00001.mp4").write_bytes(b"not a video at all" * 10)
  np.save(root / "bad/unreadable/00001.npy", np.zeros((10, 257), np.float32))
  add_clip(root, "bad/nan/00001", 10)
  nan = np.zeros((10, 257), np.float32)
  nan[3, 7] = np.nan
  np.save(root / "bad/nan/00001.npy", nan)
  add_clip(root, "bad/mismatch/00001", 10)
  np.save(root / "bad/mismatch/00001.npy", np.zeros((12, 257), np.float32))


def test_beam_direct_runner_writes_the_local_runners_bytes_and_skip_counts(tmp_path):
  pytest.importorskip("apache_beam")
  src = tmp_path / "in"
  _demo_and_bad_inputs(src)
  options = prepare.PrepareOptions(resolution=32, frames_per_record=16, shard_size=2)
  local = prepare.prepare(src, tmp_path / "local", options=options, progress=False)
  direct = prepare.prepare(src, tmp_path / "direct", options=options, progress=False, runner="direct")
  assert local["counts"]["videos"] >= 3 and local["counts"]["records"] > 3
  assert {s["video_id"]: s["reason"] for s in local["skipped"]} == {
    "bad/unreadable/00001": "unreadable_video",
    "bad/nan/00001": "nan_coefficients",
    "bad/mismatch/00001": "coefficient_frames_mismatch",
  }
  assert direct == local  # counts, skip reasons and messages, shard list
  assert len(shard_bytes(tmp_path / "local")) > 1
  assert shard_bytes(tmp_path / "direct") == shard_bytes(tmp_path / "local")
  for name in ("manifest.json", "plan.json", *(p.name for p in (tmp_path / "local").glob("records-*.json"))):
    assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
  assert not list((tmp_path / "direct").glob("*.tmp"))

  # A re-run resumes: a deleted shard (and only it) is written again, to the same bytes.
  victim = sorted((tmp_path / "direct").glob("*.array_record"))[1]
  kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "direct").glob("*.array_record") if p != victim}
  victim.unlink()
  (tmp_path / "direct" / (victim.name + ".123-dead.tmp")).write_bytes(b"half a shard of a killed attempt")
  # (in two worker processes: --workers 2 is DirectRunner's multi_processing mode)
  again = prepare.prepare(src, tmp_path / "direct", options=options, progress=False, runner="direct", workers=2)
  assert again == local and shard_bytes(tmp_path / "direct") == shard_bytes(tmp_path / "local")
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "direct").glob("*.array_record") if p != victim} == kept
  assert not list((tmp_path / "direct").glob("*.tmp"))


def test_beam_runner_options_are_checked_before_any_work(tmp_path, capsys):
  src = tmp_path / "in"
  add_clip(src, "id1/v/00001", 4)
  cases = [
    (["--runner", "local", "--", "--project=p"], "apply only to --runner direct"),
    (["--runner", "direct", "--", "project=p"], "expected the form --name=value"),
    (["--runner", "direct", "--", "--runner=DataflowRunner"], "mimajax's own --runner"),
  ]
  for extra, message in cases:
    code = cli.main(["prepare", "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, (extra, err)
  code = cli.main(["prepare", "--input", str(src), "--output", "gs://bucket/out", "--runner", "dataflow"])
  assert code == 2 and "a URL; every Beam worker must see" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_tfds_builder_on_beam_gives_the_examples_it_gives_without(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("apache_beam")
  from data_pipeline import voxceleb2_mima

  manual = tmp_path / "manual"
  for i in range(3):
    add_clip(manual / "dev/mp4", f"id0000{i}/vid/00001", 14 + i, seed=i)
  add_clip(manual / "dev/mp4", "id00009/short/00001", 5, seed=9)  # skipped on both paths (min_frames=13)

  def examples(source):
    recs = sorted((records.from_tfds_example(source[i]) for i in range(len(source))), key=lambda r: r.video_id)
    return [records.encode_record(r) for r in recs]

  plain = voxceleb2_mima.data_source(tmp_path / "plain", split="train", config="256", manual_dir=manual)
  beam = voxceleb2_mima.data_source(tmp_path / "beam", split="train", config="256", manual_dir=manual,
                                    beam_options=["--runner=DirectRunner"])  # fmt: skip
  assert len(plain) == 3 and examples(beam) == examples(plain)
