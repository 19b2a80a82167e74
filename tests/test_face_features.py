"""The release MIA's face feature (mimajax.mimaface.face_features): parity with the release's code, and `mimajax
animate` of a release folder computing it from the source portrait, with no feature file."""

import shutil

import numpy as np
import pytest
import torch

from mimajax.errors import CheckpointReadError
from mimajax.metrics import ir101
from mimajax.mimaface import face_features
from mimajax.mimaface.mia import MIAConfig

# ffmpeg runs as a subprocess (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def _mediapipe_or_skip():
  from mimajax.faces import landmarks

  try:
    landmarks.check_available()
  except landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))


def test_parity_with_the_release_code_on_a_real_portrait():
  _mediapipe_or_skip()
  from mimajax.parity.face_features import face_features_parity, portrait_frame

  lines = []
  err = face_features_parity(size="tiny", log=lines.append)
  assert err < 1e-4, "\n".join(lines)
  # The release's quirk is kept: the 256-px alignment warped into the 512 frame leaves the face in the top-left
  # quarter of the network's input, the rest the warp's zero (mid-grey) fill.
  frame, points = portrait_frame()
  x = np.asarray(face_features.network_input(frame, points))[0]
  assert np.abs(x[100:, 100:]).max() == 0 and x[10:50, 10:50].std() > 0.1


def test_alignment_is_the_similarity_onto_the_release_template():
  angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  points = (face_features.TEMPLATE_256 - shift) @ np.linalg.inv(rot).T  # template = rot @ points + shift
  m = face_features.similarity_transform(points)
  np.testing.assert_allclose(m, np.hstack([rot, shift[:, None]]), atol=1e-9)
  # mean_face_lm5p_256 of the release's dataset/face_util.py (first row: the left eye)
  np.testing.assert_allclose(face_features.TEMPLATE_256[0], [92.5892, 103.3926])


def _ir_file(path, units=(1, 1, 1, 1)):
  from mimajax.parity.identity import randomise_, torch_ir

  torch.save(randomise_(torch_ir(units), 1).state_dict(), path)
  return path


def test_weights_are_found_where_the_release_keeps_them_or_named_when_missing(tmp_path):
  model = tmp_path / "MIMAFace" / "checkpoints" / "video"
  model.mkdir(parents=True)
  with pytest.raises(CheckpointReadError) as e:
    face_features.find_weights(model)
  message = str(e.value)
  assert "CurricularFace_Backbone.pth" in message and str(model) in message and "\n" not in message
  project = tmp_path / "MIMAFace" / "models" / "ArcFace"
  project.mkdir(parents=True)
  _ir_file(project / ir101.WEIGHTS_FILE, (1, 2, 1, 1))
  assert face_features.find_weights(model) == project / ir101.WEIGHTS_FILE  # the release's own project layout
  assert face_features.load_backbone(project / ir101.WEIGHTS_FILE).units == (1, 2, 1, 1)
  _ir_file(model / ir101.WEIGHTS_FILE)
  assert face_features.find_weights(model) == model / ir101.WEIGHTS_FILE  # next to mim.pth comes first


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny release folder whose MIA takes CurricularFace's 25088 values, a one-unit-per-stage IR file next to mim.pth,
  a VAE with the 8x downsampling of SD's (so 512-px frames are 64-px latents) and the landmark face model."""
  from diffusers import AutoencoderKL
  from test_release_import import write_release

  from conftest import perturb_
  from mimajax.face3d.landmark_model import landmark_face_model, save_face_model

  root = tmp_path_factory.mktemp("release")
  mia = MIAConfig(variant="release", clip_dim=32, cross_attention_dim=32, clip_tokens=17, release_layers=1,
                  face_recognition_dim=face_features.FEATURE_DIM)  # fmt: skip
  write_release(root, mia)
  _ir_file(root / ir101.WEIGHTS_FILE)
  extra = tmp_path_factory.mktemp("extra")
  vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4,
                      layers_per_block=1)  # fmt: skip
  perturb_(vae).save_pretrained(extra / "vae")
  save_face_model(landmark_face_model(), extra / "face_model.npz")
  return root, extra


def _animate(checkpoint, extra, out):
  from data_pipeline import demo_data
  from mimajax import cli

  # 2 frames, one clip, one step, no guidance: a release folder animates at 512 px, the costly part on a CPU
  return cli.main(["animate", "--checkpoint", str(checkpoint), "--source", str(demo_data.portrait_path("astronaut")),
                   "--driving", str(demo_data.carphone_clip()), "--frames", "2", "--clip-frames", "2",
                   "--ica-frames", "0", "--steps", "1", "--guidance", "1",
                   "--vae", str(extra / "vae"), "--face-model", str(extra / "face_model.npz"), "--out", str(out),
                   "--no-progress"])  # fmt: skip


def test_animate_a_release_folder_computes_the_face_features(release, tmp_path, monkeypatch, capsys):
  _mediapipe_or_skip()
  from mimajax import video_io

  root, extra = release
  seen = []
  deep = face_features.FaceFeatures.deep_features
  record = lambda self, x: seen.append(deep(self, x)) or seen[-1]
  monkeypatch.setattr(face_features.FaceFeatures, "deep_features", record)
  out = tmp_path / "out.mp4"
  assert _animate(root, extra, out) == 0, capsys.readouterr().err
  frames = video_io.read_video(out)[0]
  assert frames.shape == (2, 512, 512, 3)
  assert len(seen) == 1 and seen[0].shape == (1, face_features.FEATURE_DIM) and np.isfinite(seen[0]).all()
  assert np.abs(seen[0]).max() > 0

  # without the IR weights: one line naming the file and where it was looked for, and no output
  bad = tmp_path / "no_ir"
  bad.mkdir()
  for entry in root.iterdir():
    if entry.name != ir101.WEIGHTS_FILE:
      (bad / entry.name).symlink_to(entry)
  capsys.readouterr()
  assert _animate(bad, extra, tmp_path / "none.mp4") == 2
  err = capsys.readouterr().err.strip()
  assert "CurricularFace_Backbone.pth" in err and str(bad) in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "none.mp4").exists()
  shutil.rmtree(bad)
