"""`mimajax animate`: clip plan and ICA stitching, one compilation across clips, mp4 output, and bad input.

Most tests run the whole pipeline with stand-ins for the networks (a VAE that pools pixels, an appearance that
echoes the driving rows, a sampler that records its inputs); one runs the real (micro) model and ClipSampler.
"""

import argparse
import dataclasses
import errno
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io
from flax import nnx

from mimajax import video_io
from mimajax.face3d import synthetic_model
from mimajax.face3d.coefficients import COEFFICIENT_SLICES
from mimajax.mimaface import animate, driving
from mimajax.mimaface.model import Appearance
from mimajax.mimaface.sampling import SamplerConfig

# ffmpeg runs as a subprocess (fork + exec), which JAX's fork hook warns about.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
EXP = COEFFICIENT_SLICES["expression"][0]
RES = 32


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """The parts of MIMAFaceConfig that animate reads."""

  video: bool = True
  clip: types.SimpleNamespace = None
  mia: types.SimpleNamespace = None
  motion: types.SimpleNamespace = None


@dataclasses.dataclass(frozen=True)
class _Field:
  image_size: int = 16
  variant: str = "paper"
  max_seq_length: int = 32
  face_recognition_dim: int = 8


class EchoModel(nnx.Module):
  """Appearance = the driving rows themselves, one token per frame, so a sampler can see which rows it got."""

  def __init__(self, video: bool = True):
    self.config = _Cfg(video, _Field(), _Field(), _Field())

  def encode_appearance(self, source, motion, face_features=None):
    return Appearance(motion[..., None, :] + 0.0 * source.mean(), source[:, 0, 0])


class PoolVAE(nnx.Module):
  """Latents = 2x2 average-pooled pixels (+ a zero channel); decoding repeats them."""

  def encode_latents(self, images):
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // 2, 2, w // 2, 2, 3).mean((2, 4))
    return jnp.concatenate([pooled, jnp.zeros_like(pooled[..., :1])], -1)

  def decode_latents(self, latents):
    return jnp.repeat(jnp.repeat(latents[..., :3], 2, axis=1), 2, axis=2)


class SpySampler:
  """Records every clip's inputs; each output frame is filled with its driving row's expression[0] (its index)."""

  def __init__(self):
    self.calls, self.outputs, self.compilations = [], [], 1

  def __call__(self, *, context, render_latents, noise, cond_latents, mask):
    self.calls.append(dict(context=np.asarray(context), cond=np.asarray(cond_latents), mask=np.asarray(mask)))
    frame_id = context[..., 0, EXP]  # (B, [F])
    out = jnp.broadcast_to(frame_id[..., None, None, None], noise.shape) + 0.0 * render_latents
    out = jnp.where(mask > 0, cond_latents, out)  # ICA: the conditioned frames are reproduced
    self.outputs.append(np.asarray(out))
    return out


def _inference(video=True, num_frames=4, ica_frames=1):
  import ml_collections

  return types.SimpleNamespace(
    model=EchoModel(video),
    vae=PoolVAE(),
    face_model=synthetic_model(0, 6),
    schedule=None,
    config=ml_collections.ConfigDict(dict(data=dict(coefficient_dim=257, render_shading="sh"))),
    resolution=RES,
    num_frames=num_frames,
    ica_frames=ica_frames,
    sampler=SamplerConfig(),  # as Inference: the sampler the checkpoint was saved with
  )


def _indexed_rows(t, width=257):
  """Driving rows whose expression[0] is the frame index (what SpySampler writes into the latents)."""
  rows = np.zeros((t, width), np.float32)
  rows[:, EXP] = np.arange(t)
  return rows


def _source():
  from data_pipeline.demo_data import portraits

  return portraits()["astronaut"][::2, ::2]  # 256 x 256: the Haar detector finds the face


SOURCE_COEFFS = np.zeros((1, 257), np.float32)


# ----------------------------------------------------------------------------- clip plan and stitching


@pytest.mark.parametrize(
  "t,f,k,starts",
  [(4, 4, 1, [0]), (1, 4, 1, [0]), (5, 4, 1, [0, 3]), (7, 4, 1, [0, 3]), (10, 4, 1, [0, 3, 6]), (12, 4, 0, [0, 4, 8])],
)
def test_clip_starts(t, f, k, starts):
  assert animate.clip_starts(t, f, k) == starts


def test_clip_starts_refuses_overlap_of_a_whole_clip():
  with pytest.raises(ValueError, match=r"k=4 must be in \[0, 3\]"):
    animate.clip_starts(10, 4, 4)


@pytest.mark.parametrize("t", [4, 5, 7, 8, 10])  # one clip, short last clips (5, 8), exact fits (7, 10)
def test_every_driving_frame_is_generated_once_in_order(t):
  sampler = SpySampler()
  frames = animate.animate(_inference(), _source(), _indexed_rows(t), source_coeffs=SOURCE_COEFFS, sampler=sampler,
                           progress=False)  # fmt: skip
  assert frames.shape == (t, RES, RES, 3) and frames.dtype == np.uint8
  latents, starts = animate.sample_latents(_inference(), np.zeros((RES, RES, 3), np.uint8),
                                           driving.blend(SOURCE_COEFFS, _indexed_rows(t)), sampler=SpySampler(),
                                           clip_frames=4, ica_frames=1, progress=False)  # fmt: skip
  assert len(sampler.calls) == len(starts) == len(animate.clip_starts(t, 4, 1))
  np.testing.assert_array_equal(latents[:, 0, 0, 0], np.arange(t))  # no frame lost, repeated or shifted


def test_later_clips_condition_on_the_previous_clips_last_k_latents():
  sampler, k = SpySampler(), 2
  animate.animate(_inference(), _source(), _indexed_rows(9), source_coeffs=SOURCE_COEFFS, ica_frames=k,
                  sampler=sampler, progress=False)  # fmt: skip
  assert len(sampler.calls) == 4  # clips of 4 start at 0, 2, 4, 6
  first = sampler.calls[0]
  assert not first["cond"].any() and not first["mask"].any()
  for prev, call in zip(sampler.outputs, sampler.calls[1:]):
    np.testing.assert_array_equal(call["cond"][:, :k], prev[:, -k:])
    assert not call["cond"][:, k:].any()
    assert (call["mask"][:, :k] == 1).all() and not call["mask"][:, k:].any()
  # The last clip (rows 6..8) is padded by repeating the last row.
  np.testing.assert_array_equal(sampler.calls[-1]["context"][0, :, 0, EXP], [6, 7, 8, 8])


def test_image_model_samples_independent_batches_without_ica():
  sampler = SpySampler()
  frames = animate.animate(_inference(video=False), _source(), _indexed_rows(11), source_coeffs=SOURCE_COEFFS,
                           clip_frames=4, sampler=sampler, progress=False)  # fmt: skip
  assert frames.shape[0] == 11 and len(sampler.calls) == 3
  assert all(c["context"].shape[0] == 4 and not c["mask"].any() for c in sampler.calls)


def test_release_variant_without_face_features_is_refused():
  inference = _inference()
  inference.model.config = _Cfg(True, _Field(), _Field(variant="release"), _Field())
  with pytest.raises(ValueError, match="face-recognition features"):
    animate.animate(inference, _source(), _indexed_rows(3), source_coeffs=SOURCE_COEFFS, sampler=SpySampler())


def test_no_face_in_the_source():
  with pytest.raises(ValueError, match="no face found in the source image"):
    animate.animate(_inference(), np.full((128, 128, 3), 90, np.uint8), _indexed_rows(3), sampler=SpySampler())


# ----------------------------------------------------------------------------- the real model compiles once


def test_real_model_samples_three_clips_with_one_compilation():
  from configs import tiny
  from mimajax.diffusion import schedulers
  from mimajax.mimaface import factory as mimaface_factory
  from mimajax.mimaface.sampling import ClipSampler, SamplerConfig

  cfg = tiny.get_config("2")
  m = cfg.model
  m.attention_impl = "xla"
  m.unet.update(block_out_channels=(16, 16), layers_per_block=(1, 1))  # micro: compiles in seconds on CPU
  m.clip.update(num_hidden_layers=1)
  m.mia.update(adapter_layers=1)
  # Shapes only, then random values: eager initialisation would compile hundreds of small ops (tens of seconds).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: mimaface_factory.build_mimaface(m, stage=2, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), state))
  inference = _inference()  # the stand-in VAE and renderer: what is checked here is the U-Net's sampling loop
  inference.model, inference.config, inference.schedule = model, cfg, schedulers.make_noise_schedule()
  sampler = ClipSampler(model, inference.schedule, SamplerConfig(num_inference_steps=2))
  frames = animate.animate(inference, _source(), _indexed_rows(9), source_coeffs=SOURCE_COEFFS, sampler=sampler,
                           progress=False)  # fmt: skip
  assert frames.shape == (9, RES, RES, 3)  # clips start at 0, 3, 6
  assert sampler.compilations == 1
  assert frames.std() > 0


# ----------------------------------------------------------------------------- video files


def test_mp4_decodes_back_with_its_frames_and_even_size(tmp_path):
  rng = np.random.default_rng(0)
  frames = np.repeat(np.repeat(rng.integers(0, 255, (7, 9, 12, 3), dtype=np.uint8), 4, 1), 4, 2)[:, :35, :47]
  video_io.write_mp4(tmp_path / "a.mp4", frames, fps=10)
  back, fps = video_io.read_video(tmp_path / "a.mp4")
  assert back.shape == (7, 36, 48, 3) and fps == pytest.approx(10)
  assert np.abs(back[:, :35, :47].astype(float) - frames).mean() < 12  # lossy, but the same pictures
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_failed_write_leaves_no_file(tmp_path):
  with pytest.raises(ValueError, match="must be uint8"):
    video_io.write_mp4(tmp_path / "a.mp4", np.zeros((3, 8, 8, 3), np.float32))
  with pytest.raises(RuntimeError):
    with video_io.Mp4Writer(tmp_path / "b.mp4", 10) as writer:
      writer.write(np.zeros((3, 8, 8, 3), np.uint8))
      writer.close()  # a whole video on disk, under a temporary name
      assert writer.tmp.exists() and not (tmp_path / "b.mp4").exists()
      raise RuntimeError("killed")
  assert list(tmp_path.iterdir()) == []


def test_mp4_is_written_batch_by_batch(tmp_path):
  with video_io.Mp4Writer(tmp_path / "a.mp4", 10) as writer:
    for _ in range(3):
      writer.write(np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="after frames of"):
      writer.write(np.zeros((1, 8, 8, 3), np.uint8))
  assert video_io.read_video(tmp_path / "a.mp4")[0].shape == (12, 16, 16, 3)


# A stand-in for ffmpeg (through IMAGEIO_FFMPEG_EXE, which imageio-ffmpeg reads on every call): reading goes to the
# real one; writing fails as a full disk makes it fail ("enospc": the frames consumed, a 4 KB header written, the
# trailer not, status 228 = -28 & 0xff) or reports success on a cut file ("truncated").
FAKE_FFMPEG = """#!{python}
import os, subprocess, sys
REAL, MODE = {real!r}, {mode!r}
args = sys.argv[1:]
if "rawvideo" not in args:
  os.execv(REAL, [REAL] + args)
out = args[-1]
if MODE == "enospc":
  while sys.stdin.buffer.read(1 << 16):
    pass
  with open(out, "wb") as f:
    f.write(bytes(4096))
  sys.stderr.write("[out#0/mp4] Error writing trailer: No space left on device\\n")
  sys.exit(228)
rc = subprocess.call([REAL] + args)
with open(out, "r+b") as f:
  f.truncate(os.path.getsize(out) // 2)
sys.exit(rc)
"""


@pytest.fixture
def fake_ffmpeg(tmp_path, monkeypatch):
  """use(mode): every ffmpeg started from now on is FAKE_FFMPEG in that mode."""
  import imageio_ffmpeg

  real = imageio_ffmpeg.get_ffmpeg_exe()

  def use(mode):
    script = tmp_path / f"ffmpeg_{mode}"
    script.write_text(FAKE_FFMPEG.format(python=sys.executable, real=real, mode=mode))
    script.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(script))

  return use


def _noise(t=8, side=256):
  return np.random.default_rng(0).integers(0, 255, (t, side, side, 3), dtype=np.uint8)


def _good_video(path):
  video_io.write_mp4(path, np.full((8, 64, 64, 3), 100, np.uint8))
  return path.read_bytes()


@pytest.mark.parametrize("mode", ["enospc", "truncated"])
def test_failed_ffmpeg_keeps_the_previous_video_and_leaves_no_file(tmp_path, fake_ffmpeg, mode):
  (tmp_path / "out").mkdir()
  out = tmp_path / "out" / "a.mp4"
  before = _good_video(out)
  fake_ffmpeg(mode)
  message = "No space left on device" if mode == "enospc" else "read back"
  with pytest.raises(OSError, match=message):
    video_io.write_mp4(out, np.zeros((8, 64, 64, 3), np.uint8) + np.arange(8, dtype=np.uint8)[:, None, None, None])
  assert out.read_bytes() == before
  assert [p.name for p in out.parent.iterdir()] == ["a.mp4"]


def test_enospc_on_flush_keeps_the_previous_files(tmp_path, monkeypatch):
  """The kernel may report a full disk only when the data is flushed (NFS, delayed allocation): at fsync."""
  out, image = tmp_path / "a.mp4", tmp_path / "a.png"
  before = _good_video(out)
  video_io.write_image(image, np.zeros((16, 16, 3), np.uint8))
  before_image = image.read_bytes()

  def fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(OSError, match="No space left on device"):
    video_io.write_mp4(out, _noise(4, 32))
  with pytest.raises(OSError, match="No space left on device"):
    video_io.write_image(image, np.full((16, 16, 3), 255, np.uint8))
  assert out.read_bytes() == before and image.read_bytes() == before_image
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.png"]


@pytest.fixture
def small_fs(tmp_path):
  """A real 3 MB file system (tmpfs), filled by the test; skipped where this process may not mount one."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
  except OSError as e:
    pytest.skip(f"no mount command: {e}")
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder, leave: int):
  """A file taking all but `leave` bytes of the folder's file system."""
  st = os.statvfs(folder)
  with open(folder / "filler", "wb") as f:
    f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))


def test_full_disk_fails_naming_it_and_keeps_the_previous_files(small_fs):
  out, image = small_fs / "out.mp4", small_fs / "a.png"
  before = _good_video(out)
  video_io.write_image(image, np.zeros((16, 16, 3), np.uint8))
  before_image = image.read_bytes()
  _fill(small_fs, leave=64 * 1024)
  with pytest.raises(OSError, match="No space left on device"):
    video_io.write_mp4(out, _noise())  # 1.5 MB of noise frames: H.264 cannot make that fit in 64 KB
  with pytest.raises(OSError, match="No space left on device"):
    video_io.write_image(image, _noise(1, 512)[0])
  assert out.read_bytes() == before and image.read_bytes() == before_image
  assert sorted(p.name for p in small_fs.iterdir()) == ["a.png", "filler", "out.mp4"]


def test_side_by_side_stacks_columns_at_one_height():
  video = np.zeros((5, 32, 32, 3), np.uint8)
  still = np.zeros((64, 48, 3), np.uint8)
  assert video_io.side_by_side([still, video, video]).shape == (5, 64, 48 + 64 + 64, 3)
  with pytest.raises(ValueError, match="every column needs 5 frames"):
    video_io.side_by_side([video, video[:3]])


# ----------------------------------------------------------------------------- the command


def _args(tmp_path, **kw):
  parser = argparse.ArgumentParser()
  animate.add_arguments(parser)
  kw.setdefault("out", str(tmp_path / "out" / "result.mp4"))
  argv = [a for k, v in kw.items() for a in ([f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]))]
  return parser.parse_args(argv + ["--no-progress"])


def _mediapipe_or_skip():
  from mimajax.faces import landmarks as face_landmarks

  try:
    face_landmarks.check_available()
  except face_landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture
def cli(tmp_path, monkeypatch):
  """run(argv) with the stand-in model (and the landmark face model) behind --checkpoint, and a source portrait."""
  from mimajax.face3d.landmark_model import landmark_face_model

  (tmp_path / "out").mkdir()
  (tmp_path / "ckpt").mkdir()
  import imageio.v3 as iio

  iio.imwrite(tmp_path / "face.png", _source())
  inference = _inference()
  inference.face_model = landmark_face_model()
  samplers = []
  monkeypatch.setattr(animate, "load_inference", lambda path, **kw: inference)
  monkeypatch.setattr(animate, "ClipSampler", lambda *a, **kw: samplers.append(SpySampler()) or samplers[-1])

  def run(**kw):
    kw = {"checkpoint": tmp_path / "ckpt", "source": tmp_path / "face.png", **kw}
    return animate.run(_args(tmp_path, **kw))

  run.samplers = samplers
  return run


def _talking_head(path, frames=8):
  from data_pipeline import demo_data

  video_io.write_mp4(path, video_io.read_video(demo_data.carphone_clip(), max_frames=frames)[0], fps=12)
  return path


def _frames_written(path):
  return video_io.read_video(path)[0]


def test_command_with_each_kind_of_driver_writes_the_requested_length(cli, tmp_path, capsys):
  _mediapipe_or_skip()  # the source's own coefficients come from its FaceMesh landmarks
  np.save(tmp_path / "d.npy", _indexed_rows(9))
  scipy.io.savemat(tmp_path / "audio.mat", {"coeff_3dmm": np.zeros((6, 70), np.float32)})
  _talking_head(tmp_path / "talk.mp4")
  out = tmp_path / "out" / "result.mp4"
  for driver, frames, expected in (("d.npy", None, 9), ("d.npy", 5, 5), ("audio.mat", None, 6), ("talk.mp4", 7, 7)):
    kw = {"driving": tmp_path / driver} | ({"frames": frames} if frames else {})
    assert cli(**kw) == 0, capsys.readouterr().err
    assert _frames_written(out).shape == (expected, RES, RES, 3)
  assert cli(edit="yaw=+15", frames=6) == 0
  assert _frames_written(out).shape[0] == 6
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.mp4"]
  # The video's rows (FaceMesh, in the landmark model) reached the sampler: the head moves, the rows are finite.
  rows = np.concatenate([c["context"][0, :, 0] for c in cli.samplers[3].calls])
  angles = rows[:, COEFFICIENT_SLICES["angle"][0] : COEFFICIENT_SLICES["angle"][1]]
  assert rows.shape[1] == 257 and np.isfinite(rows).all() and np.ptp(angles, axis=0).max() > 0.01


def test_command_side_by_side_has_source_driver_render_output(cli, tmp_path):
  _mediapipe_or_skip()
  side = tmp_path / "out" / "side.mp4"
  assert cli(driving=_talking_head(tmp_path / "talk.mp4", 5), side_by_side=side, relative=True) == 0
  frames, fps = video_io.read_video(side)
  assert frames.shape == (5, RES, 4 * RES, 3) and fps == pytest.approx(12)
  output, _ = video_io.read_video(tmp_path / "out" / "result.mp4")
  assert np.abs(frames[..., 3 * RES :, :].astype(float) - output).mean() < 3  # the last column is the output


def _garbage(path):
  path.write_bytes(b"\x00garbage" * 50)
  return path


@pytest.mark.parametrize(
  "make_args,message",
  [
    (lambda d: {"source": _gray(d / "gray.png"), "driving": _npy(d, (4, 257))}, "no face found in the source"),
    (lambda d: {"driving": _garbage(d / "drv.mp4")}, "is unreadable"),
    (lambda d: {"driving": _gray_video(d / "drv.mp4")}, "no face found in the driving video"),
    (lambda d: {"driving": _garbage(d / "drv.npy")}, "not a readable .npy"),
    (lambda d: {"driving": _npy(d, (4, 200))}, "coefficients of shape (4, 200)"),
    (lambda d: {"driving": _npy(d, (2, 4, 257))}, "coefficients of shape (2, 4, 257)"),
    (lambda d: {"driving": _npy(d, (4, 257), np.nan)}, "non-finite values"),
    (lambda d: {"driving": _mat(d, {"motion": np.zeros((3, 257))})}, "none of the coefficient layouts"),
    (lambda d: {"driving": _npy(d, (4, 257)), "frames": 9}, "has only 4 frames"),
    (lambda d: {"edit": "wobble=2"}, "unknown key 'wobble'"),
    (lambda d: {"driving": _npy(d, (4, 257)), "out": d / "out" / "x.avi"}, "expected an .mp4"),
  ],
)
def test_bad_input_exits_2_with_a_message_and_no_output(cli, tmp_path, capsys, make_args, message):
  assert cli(**make_args(tmp_path)) == 2
  err = capsys.readouterr().err
  assert err.startswith("mimajax animate: error:") and re.search(re.escape(message), err), err
  assert list((tmp_path / "out").iterdir()) == []


def test_write_failure_exits_1_naming_it_and_keeps_the_previous_output(cli, tmp_path, capsys, fake_ffmpeg):
  np.save(tmp_path / "d.npy", _indexed_rows(8))
  np.save(tmp_path / "src.npy", SOURCE_COEFFS)
  kw = dict(driving=tmp_path / "d.npy", source_coefficients=tmp_path / "src.npy")
  out = tmp_path / "out" / "result.mp4"
  assert cli(**kw) == 0, capsys.readouterr().err
  before = out.read_bytes()
  capsys.readouterr()
  fake_ffmpeg("enospc")
  assert cli(**kw) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("mimajax animate: error:") and "No space left on device" in captured.err
  assert len(captured.err.strip().splitlines()) <= 2 and "wrote" not in captured.out
  assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["result.mp4"]


def test_debug_environment_variable_adds_the_traceback(cli, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("MIMAJAX_DEBUG", "1")
  assert cli(driving=_garbage(tmp_path / "drv.npy")) == 2
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err
  assert err.strip().splitlines()[-1].startswith("mimajax animate: error:") and "not a readable .npy" in err


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_missing_or_corrupt_checkpoint_exits_2(tmp_path, capsys, kind):
  """The real loader behind --checkpoint: no folder, or a workdir whose config is not JSON."""
  (tmp_path / "out").mkdir()
  ckpt = tmp_path / "ckpt"
  if kind == "corrupt":
    (ckpt / "checkpoints" / "10" / "state").mkdir(parents=True)
    (ckpt / "config.json").write_text("{not json")
  import imageio.v3 as iio

  iio.imwrite(tmp_path / "face.png", _source())
  np.save(tmp_path / "d.npy", np.zeros((3, 257), np.float32))
  args = _args(tmp_path, checkpoint=ckpt, source=tmp_path / "face.png", driving=tmp_path / "d.npy")
  assert animate.run(args) == 2
  err = capsys.readouterr().err
  assert "mimajax animate: error:" in err and str(ckpt) in err and ("does not exist" in err) == (kind == "missing")
  assert list((tmp_path / "out").iterdir()) == []


def _gray(path):
  import imageio.v3 as iio

  iio.imwrite(path, np.full((128, 128, 3), 120, np.uint8))
  return path


def _gray_video(path):
  video_io.write_mp4(path, np.full((4, 64, 64, 3), 120, np.uint8))
  return path


def _npy(d, shape, fill=0.0):
  path = d / "bad.npy"
  np.save(path, np.full(shape, fill, np.float32))
  return path


def _mat(d, content):
  scipy.io.savemat(d / "bad.mat", content)
  return d / "bad.mat"
