"""`mimajax serve` without a browser: the page's controls -> edits and a checked request, the frame limit, a request's
files (removed when it ends, at once on an error), and MIMAFace's served model on the stand-in networks of
tests/test_animate.py (every driver kind, the render I_R, the sampler options, bad input as messages).
The page itself, in Chromium: tests/test_serve_browser.py."""

import sys
from pathlib import Path

import numpy as np
import pytest

from mimajax import serving, video_io
from mimajax.web import app

sys.path.insert(0, str(Path(__file__).parent))
import test_animate as stand_in  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
SLIDERS = (
  serving.Control("yaw", "Yaw", "slider", 0.0, -45.0, 45.0, 1.0),
  serving.Control("scale", "Scale", "slider", 1.0, 0.5, 1.5, 0.01),
  serving.Control("exp_from", "Expression from", "image"),
)


def test_only_moved_controls_become_edits():
  assert serving.edit_strings(SLIDERS, {"yaw": 0.0, "scale": 1.0, "exp_from": None}) == ()
  assert serving.edit_strings(SLIDERS, {"yaw": 12.5, "scale": 1.0, "exp_from": "/x/face.png"}) == (
    "yaw=12.5",
    "exp_from=/x/face.png",
  )
  assert serving.edit_strings(SLIDERS, {"scale": 1.2}) == ("scale=1.2",)
  with pytest.raises(ValueError, match="Yaw: nan is not a finite number"):
    serving.edit_strings(SLIDERS, {"yaw": float("nan")})


def test_frame_limit_names_the_limit_and_the_way_out():
  assert serving.check_frames(None, 10, driver_frames=10) is None
  assert serving.check_frames(4, 10, driver_frames=500) == 4  # the driver's first 4 frames
  with pytest.raises(ValueError, match="11 frames is too many: this server animates at most 10"):
    serving.check_frames(11, 10)
  with pytest.raises(ValueError, match="the driver has 12 frames, more than the 10 .* set Frames to 10 or fewer"):
    serving.check_frames(None, 10, driver_frames=12)


def _fake_model(animate=None) -> serving.ServedModel:
  def run(request, progress):
    progress(0.5, "half way")
    t = request.frames or 3
    frames = np.full((t, 16, 16, 3), 100, np.uint8)
    return serving.Result(frames, 10.0, frames[0], [frames[0], frames], frames[0], "input", f"{t} frames")

  return serving.ServedModel("fake", "fake", 16, ("video", "edits"), SLIDERS, (), animate or run)


def _values(**kw):
  return {"source": np.zeros((20, 20, 3), np.uint8), "driver": app.DRIVER_LABELS["edits"], "frames": 0, **kw}


def test_request_from_the_page_values(tmp_path):
  model = _fake_model()
  r = app.make_request(model, _values(yaw=10.0, scale=1.0, frames=5, seed=3.0), max_frames=8, workdir=tmp_path)
  assert (r.driver, r.edits, r.frames, r.seed, r.max_frames) == ("edits", ("yaw=10",), 5, 3, 8)
  for values, message in [
    (_values(source=None), "no portrait"),
    (_values(driver=app.DRIVER_LABELS["coefficients"]), "driven by a driving video, edits only"),
    (_values(driver=app.DRIVER_LABELS["video"]), "no driving video"),
    (_values(frames=9), "9 frames is too many"),
    (_values(frames=2.5), "Frames must be a whole number"),
  ]:
    with pytest.raises(ValueError, match=message):
      app.make_request(model, values, max_frames=8, workdir=tmp_path)


def test_an_over_long_driving_video_is_refused_from_its_header(tmp_path):
  clip = tmp_path / "long.mp4"
  video_io.write_mp4(clip, np.zeros((12, 16, 16, 3), np.uint8), 12)
  values = _values(driver=app.DRIVER_LABELS["video"], video=str(clip))
  with pytest.raises(ValueError, match="the driver has 12 frames, more than the 8"):
    app.make_request(_fake_model(), values, max_frames=8, workdir=tmp_path)
  assert app.make_request(_fake_model(), {**values, "frames": 8}, max_frames=8, workdir=tmp_path).frames == 8


def test_an_unreadable_driving_video_is_named(tmp_path):
  bad = tmp_path / "drv.mp4"
  bad.write_bytes(b"\x00garbage" * 50)
  with pytest.raises(ValueError, match="drv.mp4 is unreadable"):
    app.make_request(_fake_model(), _values(driver=app.DRIVER_LABELS["video"], video=str(bad)), max_frames=8,
                     workdir=tmp_path)  # fmt: skip


def test_a_request_writes_both_videos_in_its_own_folder_removed_when_it_ends(tmp_path):
  seen = []
  out, side, crop, model_input, summary, folder = app.run_request(
    _fake_model(), _values(frames=4), max_frames=8, temp_root=str(tmp_path), progress=lambda f, w: seen.append(w)
  )
  assert video_io.mp4_frame_count(out) == 4 and video_io.read_video(side)[0].shape == (4, 16, 32, 3)
  assert Path(out).parent == Path(folder) and Path(folder).parent == tmp_path and seen[0] == "half way"
  assert summary.startswith("4 frames") and crop.shape == (16, 16, 3)
  app.finish(folder)
  assert not any(tmp_path.iterdir())


def test_a_failed_request_leaves_nothing(tmp_path):
  def refuse(request, progress):
    (request.workdir / "half.npy").write_bytes(b"x")  # what a family wrote on the way
    raise ValueError("no face found in the source image")

  with pytest.raises(ValueError, match="no face found"):
    app.run_request(_fake_model(refuse), _values(), max_frames=8, temp_root=str(tmp_path))
  assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- MIMAFace's served model


@pytest.fixture
def mimaface(monkeypatch):
  from mimajax.face3d.landmark_model import landmark_face_model
  from mimajax.mimaface import animate
  from mimajax.mimaface import serving as mimaface_serving

  stand_in._mediapipe_or_skip()  # the source's own coefficients come from its FaceMesh landmarks
  inference = stand_in._inference()
  inference.face_model = landmark_face_model()
  samplers = []
  monkeypatch.setattr(mimaface_serving, "load_inference", lambda path, **kw: inference)
  monkeypatch.setattr(animate, "ClipSampler", lambda *a, **kw: samplers.append((a, kw)) or stand_in.SpySampler())
  model = mimaface_serving.load_served(Path("ckpt"), {})
  return model, samplers


def _ask(model, **kw):
  request = serving.Request(source=stand_in._source(), **{"driver": "edits", **kw})
  return model.animate(request, lambda fraction, what: None)


def test_mimaface_is_served_with_every_driver_and_shows_its_render(mimaface, tmp_path):
  mimaface, samplers = mimaface
  assert mimaface.drivers == serving.DRIVERS and {c.key for c in mimaface.option_controls} == {
    "steps",
    "guidance",
    "scheduler",
  }
  np.save(tmp_path / "d.npy", stand_in._indexed_rows(9))
  result = _ask(mimaface, driver="coefficients", driving=str(tmp_path / "d.npy"), frames=7)
  assert result.frames.shape == (7, stand_in.RES, stand_in.RES, 3)
  assert result.model_input.shape == result.frames[0].shape
  assert len(result.columns) == 3  # source | render I_R | output (a coefficient file has no preview)
  clip = stand_in._talking_head(tmp_path / "talk.mp4", 5)
  result = _ask(mimaface, driver="video", driving=str(clip), relative=True, edits=("yaw=10",))
  assert result.frames.shape[0] == 5 and len(result.columns) == 4 and result.fps == pytest.approx(12)
  result = _ask(mimaface, edits=("roll=20",), frames=6, options={"steps": 3, "guidance": 2.0, "scheduler": "euler"})
  assert result.frames.shape[0] == 6 and "euler, 3 steps, guidance 2" in result.summary
  config = samplers[-1][0][2]
  assert (config.num_inference_steps, config.guidance_scale, config.scheduler) == (3, 2.0, "euler")


def test_mimaface_expression_from_a_second_image(mimaface, tmp_path):
  mimaface, _ = mimaface
  from data_pipeline.demo_data import portrait_path

  result = _ask(mimaface, edits=(f"exp_from={portrait_path('astronaut')}",), frames=3)
  assert result.frames.shape[0] == 3
  with pytest.raises(ValueError, match="no face found in that image"):
    gray = video_io.write_image(tmp_path / "gray.png", np.full((64, 64, 3), 128, np.uint8))
    _ask(mimaface, edits=(f"exp_from={gray}",), frames=3)


def test_mimaface_bad_input_is_a_message(mimaface, tmp_path):
  mimaface, _ = mimaface
  gray = np.full((240, 320, 3), 128, np.uint8)
  with pytest.raises(ValueError, match="no face found in the source"):
    mimaface.animate(serving.Request(source=gray, driver="edits", edits=("yaw=5",)), lambda f, w: None)
  (tmp_path / "bad.npy").write_bytes(b"\x00garbage" * 20)
  with pytest.raises(ValueError, match="not a readable .npy"):
    _ask(mimaface, driver="coefficients", driving=str(tmp_path / "bad.npy"))
  np.save(tmp_path / "long.npy", stand_in._indexed_rows(30))
  with pytest.raises(ValueError, match="the driver has 30 frames, more than the 20"):
    _ask(mimaface, driver="coefficients", driving=str(tmp_path / "long.npy"), max_frames=20)
  with pytest.raises(ValueError, match="nothing to animate"):
    _ask(mimaface)
  with pytest.raises(ValueError, match="is a video; a coefficient file is a .npy or .mat"):
    _ask(mimaface, driver="coefficients", driving=str(stand_in._talking_head(tmp_path / "t.mp4", 2)))
