"""`mimajax export`: PyTorch loads the folder strictly, bit-exact round trips into JAX, atomic writes, the command."""

import argparse
import json
import shutil
import types

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mimajax.convert.animatediff_format import load_animatediff_checkpoint
from mimajax.convert.sd_single_file import load_models
from mimajax.face3d import synthetic_model
from mimajax.mimaface import export, ica
from mimajax.mimaface.inference import load_inference
from mimajax.parity.mimaface import build_random


def _params(module) -> dict:
  return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    np.testing.assert_array_equal(pa[path], pb[path], err_msg="/".join(map(str, path)))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  """The tiny stage-2 model with random weights, its VAE and face model, and its export."""
  model, vae = build_random("tiny", stage=2, seed=0)
  face = synthetic_model(0, resolution=8)
  folder = export.export_mimaface(model, vae, tmp_path_factory.mktemp("video") / "export", face_model=face)
  return types.SimpleNamespace(model=model, vae=vae, face=face, folder=folder)


def test_export_layout_index_and_config(video):
  files = {str(p.relative_to(video.folder)) for p in video.folder.rglob("*") if p.is_file()}
  assert files == {
    "model_index.json",
    "mimaface_config.json",
    "face_model.npz",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "mia/config.json",
    "mia/mia.safetensors",
    "conv_in/conv_in.safetensors",
    "scheduler/scheduler_config.json",
    "sd_single_file/mimaface_unet_vae.safetensors",
    "sd_single_file/mimaface_motion_modules.safetensors",
  }
  index = json.loads((video.folder / "model_index.json").read_text())
  assert index["unet"] == ["diffusers", "UNetMotionModel"] and index["mia"][1] == "MotionIdentityAdapter"
  config = json.loads((video.folder / "mimaface_config.json").read_text())
  # k as animate uses it for the checkpoint: the one rule (F // 4 for F = 16 frames)
  assert config["inference"]["ica_frames"] == ica.inference_overlap(16) == 4
  assert config["inference"]["scheduler"] == "ddim"
  assert export.config_from_dict(config) == video.model.config
  assert not list(video.folder.parent.glob(".*"))  # no temporary folder left beside it


def test_pytorch_loads_every_part_strictly(video):
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, UNetMotionModel
  from safetensors.numpy import load_file
  from transformers import CLIPVisionModel

  from mimajax.mimaface.pytorch import MIMAFacePipeline, MotionIdentityAdapter

  f = video.folder
  unet, info = UNetMotionModel.from_pretrained(f / "unet", output_loading_info=True, low_cpu_mem_usage=False)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  assert unet.config.in_channels == 13
  _, info = AutoencoderKL.from_pretrained(f / "vae", output_loading_info=True, low_cpu_mem_usage=False)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  _, info = CLIPVisionModel.from_pretrained(f / "image_encoder", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  scheduler = DDIMScheduler.from_pretrained(f / "scheduler")
  assert (scheduler.config.steps_offset, scheduler.config.set_alpha_to_one) == (1, False)

  pipe = MIMAFacePipeline.from_pretrained(f)  # MIA: load_state_dict(strict=True)
  assert isinstance(pipe.mia, MotionIdentityAdapter)
  # The zero-initialised paths carry the model's (random) weights, not fresh ones.
  want = np.asarray(video.model.mia.motion_attn.to_out.kernel[...]).T
  np.testing.assert_array_equal(pipe.mia.motion_attn.to_out.weight.detach().numpy(), want)
  conv_in = load_file(str(f / "conv_in" / "conv_in.safetensors"))
  np.testing.assert_array_equal(conv_in["conv_in.weight"], unet.conv_in.weight.detach().numpy())
  np.testing.assert_array_equal(
    conv_in["conv_in.weight"], np.asarray(video.model.unet.conv_in.kernel[...]).transpose(3, 2, 0, 1)
  )
  assert pipe.unet.dtype == torch.float32


def test_round_trip_into_jax_is_bit_exact(video):
  back = load_inference(video.folder, attention_impl="xla")
  assert back.model.config == video.model.config
  _assert_same_params(back.model, video.model)
  _assert_same_params(back.vae, video.vae)
  np.testing.assert_array_equal(back.face_model.mean_shape, video.face.mean_shape)
  assert (back.num_frames, back.ica_frames, back.sampler.num_inference_steps) == (16, 4, 25)

  # The single files: the spatial U-Net + VAE with LDM keys, the motion modules as AnimateDiff writes them.
  spatial = video.model.unet.spatial_unet()
  unet, vae = load_models(
    video.folder / "sd_single_file" / "mimaface_unet_vae.safetensors", spatial.config, video.vae.config
  )
  _assert_same_params(unet, spatial)
  _assert_same_params(vae, video.vae)
  motion_file = video.folder / "sd_single_file" / "mimaface_motion_modules.safetensors"
  heads = video.model.config.motion.num_attention_heads
  _assert_same_params(load_animatediff_checkpoint(spatial, motion_file, num_attention_heads=heads), video.model.unet)


def test_a_folder_missing_a_weight_is_refused_by_both_readers(video, tmp_path):
  from safetensors.numpy import load_file, save_file

  from mimajax.errors import CheckpointKeyError
  from mimajax.mimaface.pytorch import MIMAFacePipeline

  folder = tmp_path / "export"
  shutil.copytree(video.folder, folder)

  def drop(path, key):
    state = load_file(str(path))
    del state[key]
    save_file(state, str(path))

  drop(folder / "mia" / "mia.safetensors", "motion_attn.to_out.bias")
  with pytest.raises(RuntimeError, match="motion_attn.to_out.bias"):  # torch's load_state_dict(strict=True)
    MIMAFacePipeline.from_pretrained(folder)
  with pytest.raises(CheckpointKeyError, match="motion_attn.to_out.bias"):
    load_inference(folder)
  drop(folder / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.bias")
  with pytest.raises(ValueError, match="conv_in.bias"):  # diffusers would initialise it at random and warn
    MIMAFacePipeline.from_pretrained(folder)


def test_stage1_export_writes_an_image_unet(tmp_path):
  from diffusers import UNet2DConditionModel

  model, vae = build_random("tiny", stage=1, seed=1)
  folder = export.export_mimaface(model, vae, tmp_path / "export", single_file=False)
  assert not (folder / "sd_single_file").exists() and not (folder / "face_model.npz").exists()
  _, info = UNet2DConditionModel.from_pretrained(folder / "unet", output_loading_info=True, low_cpu_mem_usage=False)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  back = load_inference(folder)
  assert not back.model.config.video and back.ica_frames == 0
  _assert_same_params(back.model, model)


def test_export_is_atomic_and_refuses_an_existing_folder(video, tmp_path, monkeypatch):
  out = tmp_path / "export"

  def broken(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(export.sd_single_file, "save_single_file", broken)  # fails after unet/, vae/, mia/ are written
  with pytest.raises(RuntimeError, match="disk full"):
    export.export_mimaface(video.model, video.vae, out)
  assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temporary folder

  monkeypatch.undo()
  out.mkdir()
  (out / "old.txt").write_text("x")
  (out / "mimaface_config.json").write_text("{}")  # an (older) export: the only kind overwrite replaces
  with pytest.raises(FileExistsError, match="overwrite"):
    export.export_mimaface(video.model, video.vae, out, single_file=False)
  export.export_mimaface(video.model, video.vae, out, single_file=False, overwrite=True)
  assert not (out / "old.txt").exists() and (out / "mia" / "mia.safetensors").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_command_loads_the_checkpoint_and_writes_the_folder(video, tmp_path, monkeypatch):
  from mimajax.mimaface import export_command, inference

  config = tiny.get_config("2")
  calls = []

  def load_inference(path, *, use_ema=True, vae_dir=None, face_model_path=None):
    calls.append((path, use_ema, vae_dir))
    return types.SimpleNamespace(model=video.model, vae=video.vae, face_model=video.face, schedule=None,
                                 config=config, resolution=32, num_frames=4, ica_frames=1)  # fmt: skip

  monkeypatch.setattr(inference, "load_inference", load_inference)
  parser = argparse.ArgumentParser()
  export_command.add_arguments(parser)
  out = tmp_path / "export"
  args = parser.parse_args(["--checkpoint", "runs/tiny", "--out", str(out), "--no-single-file", "--no-ema"])
  assert export_command.run(args) == 0
  assert calls == [("runs/tiny", False, None)]
  inference = json.loads((out / "mimaface_config.json").read_text())["inference"]
  assert (inference["resolution"], inference["num_frames"], inference["ica_frames"]) == (32, 4, 1)
  assert inference["num_inference_steps"] == config.sample.num_inference_steps
  assert not (out / "sd_single_file").exists() and (out / "training_config.json").is_file()
  assert export_command.run(args) == 2  # exists: refused without --overwrite


# ----------------------------------------------------------------------------- where an export may go


def _listing(folder):
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def command(video, tmp_path, monkeypatch):
  """run(argv) of `mimajax export` with the stand-in model behind any --checkpoint; a training workdir `wd`."""
  from mimajax.mimaface import export_command, inference

  def load_inference(path, **kw):
    return types.SimpleNamespace(model=video.model, vae=video.vae, face_model=video.face, schedule=None,
                                 config=None, resolution=32, num_frames=4, ica_frames=1)  # fmt: skip

  monkeypatch.setattr(inference, "load_inference", load_inference)
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "10" / "state").mkdir(parents=True)
  (wd / "checkpoints" / "10" / "state" / "array").write_bytes(b"weights")
  (wd / "config.json").write_text("{}")
  (wd / "vae").mkdir()
  (wd / "vae" / "config.json").write_text("{}")

  def run(*argv):
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    return export_command.run(parser.parse_args([*map(str, argv), "--no-single-file"]))

  run.wd = wd
  return run


@pytest.mark.parametrize(
  "checkpoint, out, how, named",
  [
    ("wd", "wd", "is", "wd"),
    ("wd/checkpoints/10", "wd/checkpoints/10", "is", "wd/checkpoints/10"),
    ("wd/checkpoints/10", "wd", "contains", "wd/checkpoints/10"),
    ("wd", "wd/export", "lies inside", "wd"),
    ("wd/checkpoints/10", "wd/export", "lies inside", "wd"),  # a step folder reads its workdir's config, vae/, ...
    ("wd", "link", "is", "wd"),  # a symbolic link to the workdir
  ],
)
@pytest.mark.parametrize("overwrite", [True, False])
def test_export_refuses_an_out_that_would_destroy_the_checkpoint(command, tmp_path, capsys, checkpoint, out, how,
                                                                  named, overwrite):  # fmt: skip
  from mimajax import atomic

  (tmp_path / "link").symlink_to(command.wd)
  (command.wd / f".export.{atomic.host_tag()}.{_dead_pid()}.0123abcd.tmp").mkdir()  # stale, but in the checkpoint
  before = _listing(command.wd)
  argv = ["--checkpoint", tmp_path / checkpoint, "--out", tmp_path / out] + (["--overwrite"] if overwrite else [])
  assert command(*argv) == 2
  err = capsys.readouterr().err
  assert f"{how} {tmp_path / named}, which the export is made from" in err, err
  assert len(err.strip().splitlines()) == 1
  assert _listing(command.wd) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "wd"]


def test_overwrite_replaces_only_an_export_folder(command, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  assert command("--checkpoint", command.wd, "--out", out, "--overwrite") == 2
  assert "is not a mimajax export (no mimaface_config.json)" in capsys.readouterr().err
  assert _listing(out) == {"notes.txt": b"mine"}
  (out / "notes.txt").unlink()  # an empty folder: nothing to lose
  assert command("--checkpoint", command.wd, "--out", out, "--overwrite") == 0
  assert (out / "mimaface_config.json").is_file()
  (out / "marker").write_text("old export")
  assert command("--checkpoint", command.wd, "--out", out, "--overwrite") == 0  # an export: replaced
  assert not (out / "marker").exists() and (out / "mimaface_config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wd"]


def _dead_pid():
  import subprocess
  import sys

  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  return int(proc.stdout)


def test_an_export_removes_what_killed_exports_left_beside_it(video, tmp_path):
  import os
  import time

  from mimajax import atomic

  host, dead = atomic.host_tag(), _dead_pid()
  hour_ago = time.time() - 2 * atomic.STALE_AFTER_S

  def leftover(name, *, old=False):
    path = tmp_path / name
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text("{}")
    if old:
      for p in (path / "unet" / "config.json", path / "unet", path):
        os.utime(p, (hour_ago, hour_ago))
    return path

  removed = [
    leftover(f".export.{host}.{dead}.0123abcd.tmp"),  # this host's, its process gone
    leftover(".export.k2j_x9qa.tmp", old=True),  # an earlier version's mkdtemp name, untouched for 2 hours
    leftover(".export.otherhost.4242.0123abcd.tmp", old=True),  # another host's, untouched for 2 hours
  ]
  kept = [
    leftover(f".export.{host}.1.0123abcd.tmp"),  # this host's, its process (pid 1) running
    leftover(".export.otherhost.4242.89abcdef.tmp"),  # another host's, written to just now
    leftover(".export.k2j_x9qb.tmp"),  # an earlier version's, just now
    leftover(".export.notes", old=True),  # not a temporary name
    leftover(".other.k2j_x9qa.tmp", old=True),  # beside another folder
  ]
  export.export_mimaface(video.model, video.vae, tmp_path / "export", single_file=False)
  names = {p.name for p in tmp_path.iterdir()}
  assert names == {"export"} | {p.name for p in kept}, sorted(names)
  assert not any(p.exists() for p in removed)


def test_an_export_a_killed_overwrite_moved_aside_is_put_back(video, tmp_path):
  from mimajax import atomic

  out = tmp_path / "export"
  export.export_mimaface(video.model, video.vae, out, single_file=False)
  (out / "marker").write_text("previous export")
  aside = tmp_path / f".export.{atomic.host_tag()}.{_dead_pid()}.0123abcd.old"
  aside.mkdir()
  out.rename(aside / "export")  # killed between the two renames of an overwrite: no export under its name
  with pytest.raises(FileExistsError, match="overwrite"):
    export.export_mimaface(video.model, video.vae, out, single_file=False)
  assert (out / "marker").read_text() == "previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_folders_honour_the_umask(video, tmp_path):
  import os

  previous = os.umask(0o022)
  try:
    folder = export.export_mimaface(video.model, video.vae, tmp_path / "export", face_model=video.face)
  finally:
    os.umask(previous)
  modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}
  want = {k: oct(0o755) if (tmp_path / k).is_dir() else oct(0o644) for k in modes}
  assert modes == want


def test_a_missing_checkpoint_is_one_line_on_stderr_exit_2(tmp_path, capsys):
  from mimajax import cli

  assert cli.main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "export")]) == 2
  missing = tmp_path / "nope"
  err = capsys.readouterr().err.strip()
  assert err == f"mimajax export: error: cannot load --checkpoint {missing}: checkpoint {missing} does not exist"
  assert not (tmp_path / "export").exists()
