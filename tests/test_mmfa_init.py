"""MMFA's start from face-vid2vid's released checkpoint (mimajax/mmfa/face_vid2vid_format.py): `mimajax parity
--component mmfa_init` at tiny size against the PyTorch transcription, the report of what is filled / new / unused,
the strict refusals (missing, mis-shaped, unexpected keys; the other generator kind; the detector's scale), and the
vox-256 sizes' shapes on both sides without computing anything."""

import copy

import numpy as np
import pytest
import torch
from flax import nnx

from mimajax import cli, parity
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.mmfa import face_vid2vid_format as fmt
from mimajax.mmfa.pytorch import face_vid2vid as ref
from mimajax.parity import mmfa as parity_mmfa

MAPPED = {"appearance", "kp_detector", "head_estimator", "dense_motion", "generator", "discriminator"}
BOOKKEEPING = {f"optimizer_{n}" for n in fmt.SECTIONS} | {"epoch"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: (torch nets, path)}: the tiny reference (default init) saved as Logger.save_cpk does, both releases."""
  out = {}
  for kind in ("spade", "original"):
    torch.manual_seed(0)
    nets = ref.build(fmt.TINY, kind, spade_hidden=16)
    path = tmp_path_factory.mktemp(kind) / "00000189-checkpoint.pth.tar"
    ref.save_checkpoint(nets, path, epoch=189)
    out[kind] = (nets, path)
  return out


class ExpressionStandIn(nnx.Module):
  """A module the map does not know (MMFA's expression encoder is not face-vid2vid's)."""

  def __init__(self):
    self.w = nnx.Param(np.ones(3, np.float32))


class Container(nnx.Module):
  """Holds modules as attributes, as the MMFA model (the training loop's "generator" group) does."""

  def __init__(self, parts):
    for name, module in parts.items():
      setattr(self, name, module)


@pytest.mark.slow  # the same command runs in CI in `launch/gpu_check.sh --dry-run` (tests/test_gpu_check.py)
def test_parity_command_tiny_within_tolerance(capsys):
  assert "mmfa_init" in parity.COMPONENTS and parity.TOLERANCES["mmfa_init"] == 1e-4
  assert cli.main(["parity", "--component", "mmfa_init"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("rel_err=") and float(out[-1].split("=")[1]) <= parity.TOLERANCES["mmfa_init"]
  text = "\n".join(out)
  assert "import exact to 0.0e+00" in text
  figures = (
    "eval  kp_detector x_c", "eval  head_estimator yaw", "eval  appearance f_s", "eval  dense_motion mask",
    "eval  dense_motion occlusion", "eval  generator third+fourth", "eval  discriminator 0.5 prediction_map",
    "train head_estimator translation", "train head_estimator running mean/var (updated)",
    "train discriminator spectral u/v (updated)",
  )  # fmt: skip
  for figure in figures:
    assert figure in text


def test_report_lists_filled_new_and_unused(checkpoints):
  nets, path = checkpoints["spade"]
  modules = parity_mmfa.zero_jax_modules(fmt.TINY, "spade")
  modules["expression_encoder"] = ExpressionStandIn()
  lines = []
  report = fmt.init_from_face_vid2vid(path, modules, log_fn=lines.append)

  assert set(report.filled) == MAPPED
  assert sorted(report.new["head_estimator"]) == ["fc_scale/bias", "fc_scale/kernel"]
  assert {p.split("/")[0] for p in report.filled["generator"]} == {"third", "fourth"}
  assert {p.split("/")[0] for p in report.new["generator"]} == {"resblocks", "to_images", "up_blocks"}
  assert report.new["expression_encoder"] == ["<all>"] and all(
    not report.new[m] for m in MAPPED - {"head_estimator", "generator"}
  )
  unused = {k for keys in report.unused.values() for k in keys}
  assert {"he_estimator.fc_exp.weight", "he_estimator.fc_exp.bias", "kp_detector.down.weight"} | BOOKKEEPING <= unused
  assert any(k.startswith("generator.decoder.G_middle_5.") for k in unused)
  # Every checkpoint entry is either filled (once) or reported unused.
  filled = {e.key for e in fmt.key_map(modules)[0]}
  every = {f"{s}.{k}" for s, net in nets.items() for k in net.state_dict()} | BOOKKEEPING
  assert filled.isdisjoint(unused) and filled | unused == every
  assert len(filled) == sum(len(v) for v in report.filled.values())

  # The values arrived in the JAX layouts; the new parts are untouched.
  g, d = nets["generator"].state_dict(), nets["discriminator"].state_dict()
  np.testing.assert_array_equal(modules["appearance"].first.conv.kernel[...],
                                g["first.conv.weight"].permute(2, 3, 1, 0))  # fmt: skip
  np.testing.assert_array_equal(modules["appearance"].resblocks_3d[1].conv2.kernel[...],
                                g["resblocks_3d.3dr1.conv2.weight"].permute(2, 3, 4, 1, 0))  # fmt: skip
  np.testing.assert_array_equal(modules["dense_motion"].norm.var[...], g["dense_motion_network.norm.running_var"])
  np.testing.assert_array_equal(modules["generator"].third.norm.mean[...], g["third.norm.running_mean"])
  he = nets["he_estimator"].state_dict()
  np.testing.assert_array_equal(modules["head_estimator"].fc_roll.kernel[...], he["fc_roll.weight"].T)
  np.testing.assert_array_equal(modules["head_estimator"].block5[1].norm3.scale[...], he["block5.b5_1.norm3.weight"])
  kp = nets["kp_detector"].state_dict()
  np.testing.assert_array_equal(modules["kp_detector"].predictor.up_blocks[1].conv.bias[...],
                                kp["predictor.up_blocks.up1.conv.bias"])  # fmt: skip
  sn = modules["discriminator"].discs["0-5"].down_blocks[1].conv
  np.testing.assert_array_equal(sn.kernel[...], d["discs.0-5.down_blocks.1.conv.weight_orig"].permute(2, 3, 1, 0))
  np.testing.assert_array_equal(sn.u[...], d["discs.0-5.down_blocks.1.conv.weight_u"])
  np.testing.assert_array_equal(sn.v[...], d["discs.0-5.down_blocks.1.conv.weight_v"])
  np.testing.assert_array_equal(modules["discriminator"].discs["1"].down_blocks[2].norm.scale[...],
                                d["discs.1.down_blocks.2.norm.weight"])  # fmt: skip
  assert not np.any(modules["generator"].to_images[0].kernel[...])
  assert not np.any(modules["head_estimator"].fc_scale.kernel[...])
  np.testing.assert_array_equal(modules["expression_encoder"].w[...], 1.0)
  assert any(line.startswith("  new    generator") and "up_blocks" in line for line in lines)
  assert any("unused 2 checkpoint entries: face-vid2vid's expression deltas" in line for line in lines)


def test_a_model_holding_the_parts_stands_for_them(checkpoints):
  nets, path = checkpoints["spade"]
  parts = parity_mmfa.zero_jax_modules(fmt.TINY, "spade")
  discriminator = parts.pop("discriminator")
  model = Container({**parts, "expression_encoder": ExpressionStandIn()})
  report = fmt.init_from_face_vid2vid(path, {"generator": model, "discriminator": discriminator})
  assert set(report.filled) == MAPPED and report.new["expression_encoder"] == ["<all>"]
  np.testing.assert_array_equal(model.kp_detector.kp.bias[...], nets["kp_detector"].state_dict()["kp.bias"])
  np.testing.assert_array_equal(model.generator.fourth.bias[...], nets["generator"].state_dict()["fourth.bias"])
  with pytest.raises(ValueError, match="none of"):
    fmt.init_from_face_vid2vid(path, {"expression_encoder": ExpressionStandIn()})


def _corrupt(path, tmp_path, how: str):
  raw = torch.load(path, map_location="cpu", weights_only=True)
  if how == "missing":
    del raw["kp_detector"]["kp.bias"]
  elif how == "shape":
    raw["he_estimator"]["fc_t.weight"] = torch.zeros(4, raw["he_estimator"]["fc_t.weight"].shape[1])
  else:  # a key of a mapped part that the map does not know
    raw["generator"]["third.extra.weight"] = torch.zeros(2)
  bad = tmp_path / f"{how}-checkpoint.pth.tar"
  torch.save(raw, bad)
  return bad


@pytest.mark.parametrize(
  "how, key",
  [
    ("missing", "kp_detector.kp.bias"),
    ("shape", "he_estimator.fc_t.weight"),
    ("unexpected", "generator.third.extra.weight"),
  ],
)
def test_bad_checkpoint_is_refused_naming_the_key_and_nothing_is_loaded(checkpoints, tmp_path, how, key):
  modules = parity_mmfa.zero_jax_modules(fmt.TINY, "spade")
  with pytest.raises(CheckpointKeyError) as e:
    fmt.init_from_face_vid2vid(_corrupt(checkpoints["spade"][1], tmp_path, how), modules)
  assert key in str(e.value) and "nothing was loaded" in str(e.value)
  listed = {"missing": e.value.missing, "shape": e.value.mismatched, "unexpected": e.value.unexpected}[how]
  assert len(listed) == 1 and listed[0].startswith(key)
  if how == "shape":
    assert listed[0] == f"{key}, (3, 64), (4, 64)"
  assert not np.any(modules["appearance"].first.conv.kernel[...]) and not np.any(modules["dense_motion"].norm.var[...])


def test_the_other_generator_kind_is_refused_at_first_only(checkpoints):
  original = parity_mmfa.zero_jax_modules(fmt.TINY, "original")
  with pytest.raises(CheckpointKeyError) as e:  # the Vox-256-New (SPADE) file into a 7x7 `first`
    fmt.init_from_face_vid2vid(checkpoints["spade"][1], original)
  assert e.value.mismatched == ["generator.first.conv.weight, (8, 3, 7, 7), (8, 3, 3, 3)"]
  assert not e.value.missing and not e.value.unexpected
  report = fmt.init_from_face_vid2vid(checkpoints["original"][1], original)  # the Beta file fits it
  unused = {k for keys in report.unused.values() for k in keys}
  beta_decoder = {"generator.final.weight", "generator.resblocks_2d.2dr1.conv2.weight",
                  "generator.up_blocks.1.norm.running_var"}  # fmt: skip
  assert beta_decoder <= unused


def test_keypoint_detector_scale_must_match_the_checkpoints():
  shapes = parity_mmfa.torch_state_shapes(fmt.TINY, "spade")  # scale_factor 0.5: a kp_detector.down.weight buffer
  params = copy.deepcopy(fmt.TINY)
  params["kp_detector_params"]["scale_factor"] = 1
  with pytest.raises(CheckpointKeyError, match=r"kp_detector\.down\.weight present .* scale_factor 1"):
    fmt.plan(parity_mmfa.abstract_jax_modules(params, "spade"), shapes)
  params["kp_detector_params"]["scale_factor"] = 0.25
  with pytest.raises(CheckpointKeyError, match=r"a 5-tap Gaussian, not the 13-tap one"):
    fmt.plan(parity_mmfa.abstract_jax_modules(params, "spade"), shapes)


def test_vox256_sizes_match_the_release_layout_on_both_sides():
  for kind, first in (("spade", (64, 3, 3, 3)), ("original", (64, 3, 7, 7))):
    shapes = parity_mmfa.torch_state_shapes(fmt.VOX256, kind)  # torch's meta device: no memory, no compute
    modules = parity_mmfa.abstract_jax_modules(fmt.VOX256, kind)  # nnx.eval_shape
    entries, report = fmt.plan(modules, shapes, tuple(sorted(BOOKKEEPING)))
    by_key = {e.key: e for e in entries}
    assert by_key["generator.first.conv.weight"].torch_shape == first
    for key, shape in (("kp_detector.predictor.conv.weight", (16384, 1024, 1, 1)),
                       ("kp_detector.predictor.up_blocks.up4.conv.weight", (32, 64, 3, 3, 3)),
                       ("he_estimator.block5.b5_4.conv3.weight", (1024, 256, 1, 1)),
                       ("he_estimator.fc_yaw.weight", (66, 2048)),
                       ("generator.resblocks_3d.3dr5.norm2.running_var", (32,)),
                       ("generator.third.conv.weight", (256, 512, 3, 3)),
                       ("generator.dense_motion_network.occlusion.weight", (1, 1792, 7, 7)),
                       ("discriminator.discs.1.conv.weight_v", (512,))):  # fmt: skip
      assert by_key[key].torch_shape == shape == shapes[key]
    assert kind != "spade" or "generator.decoder.G_middle_0.conv_0.weight_orig" in report.unused[
      "the SPADE generator's decoder (Vox-256-New; MMFA's multi-scale decoder replaces it)"]  # fmt: skip
    assert len(by_key) + sum(len(v) for v in report.unused.values()) == len(shapes) + len(BOOKKEEPING)


def test_unreadable_files_are_refused(tmp_path):
  with pytest.raises(CheckpointReadError, match="not found"):
    fmt.read_checkpoint(tmp_path / "absent.pth.tar")
  torch.save({"state_dict": {}}, tmp_path / "other.pth.tar")
  with pytest.raises(CheckpointReadError, match="not a face-vid2vid checkpoint"):
    fmt.read_checkpoint(tmp_path / "other.pth.tar")
  (tmp_path / "junk.pth.tar").write_bytes(b"not a zip")
  with pytest.raises(CheckpointReadError, match="cannot read"):
    fmt.read_checkpoint(tmp_path / "junk.pth.tar")
