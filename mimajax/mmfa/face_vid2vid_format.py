"""face-vid2vid's released checkpoint -> MMFA's modules: the one key map, the file reader and the strict import.

MMFA starts from public weights where its modules are face-vid2vid's (appendix A.1: "the keypoint detector, affine
transformation, and dense motion estimator are similar to Wang et al. (2021b)"; the paper's face-vid2vid is
zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis, whose Logger.save_cpk writes
NNNNNNNN-checkpoint.pth.tar = {'generator', 'discriminator', 'kp_detector', 'he_estimator': state_dict,
'optimizer_<each>': Adam state, 'epoch'}). The JAX modules keep that repository's attribute names, so the map is
its module path with list indices for torch's Sequential names and the leaves converted by kind.

The map (checkpoint key -> MMFA module / variable path):

  checkpoint                                   MMFA module     fills
  generator.{first,down_blocks,second,         appearance      all of it (AppearanceFeatureExtractor)
            resblocks_3d.3dr<i>}.*                             (resblocks_3d.3dr<i> -> resblocks_3d/<i>)
  generator.dense_motion_network.*             dense_motion    all of it (DenseMotionNetwork)
  generator.{third,fourth}.*                   generator       third, fourth; the multi-scale decoder stays new
  kp_detector.*                                kp_detector     all of it (predictor.{down,up}_blocks.{down,up}<i>
                                                               -> predictor/{down,up}_blocks/<i>)
  he_estimator.* but fc_exp                    head_estimator  all but MMFA's own scale head (block<b>.b<b>_<i>
                                                               -> block<b>/<i>)
  discriminator.discs.<scale>.*                discriminator   all of it (discs.<scale> -> discs/<scale>)

  Leaves: conv weight OIHW / OIDHW -> kernel HWIO / DHWIO; Linear weight (out, in) -> kernel (in, out); bias ->
  bias; BatchNorm weight / bias / running_mean / running_var -> scale / bias / mean / var; InstanceNorm (affine)
  weight / bias -> scale / bias; spectral norm weight_orig -> kernel (the unnormalised weight), weight_u -> u,
  weight_v -> v (as they are: the JAX spectral norm flattens its kernel in torch's (in, kh, kw) order, see
  mimajax/mmfa/discriminator.py).

  Not used (listed in the report, never an error): num_batches_tracked (BatchNorm counters; the momentum is
  fixed), he_estimator.fc_exp (face-vid2vid's expression deltas: MMFA's expression encoder-decoder replaces them),
  the generator's decoders (generator.decoder.*: the SPADE decoder of the Vox-256-New release;
  generator.{resblocks_2d,up_blocks,final}.*: OcclusionAwareGenerator's of the Beta release), kp_detector.jacobian.*
  (FOMM's Jacobians, off in vox-256), kp_detector.down.weight (AntiAliasInterpolation2d's fixed Gaussian, recomputed
  here; its presence and size must agree with the module's scale_factor), the optimizer states and 'epoch'.
  Stays new: the variables of a mapped module that are MMFA's own (each Part's `new`: head_estimator's fc_scale,
  the generator's multi-scale decoder), and the modules that are not face-vid2vid's at all (the expression encoder
  / decoder): the report lists them.

The Vox-256-New release is the SPADE generator (`first` 3x3), the Beta one OcclusionAwareGenerator (`first` 7x7): the
appearance module's `first` must be built with the checkpoint's kernel size, or the import lists the mis-shaped key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.convert.state_dict import check_params, update_params
from mimajax.errors import CheckpointKeyError, CheckpointReadError

log = logging.getLogger(__name__)

# face-vid2vid's config/vox-256.yaml `model_params`, in its own layout (the PyTorch reference is built from it).
VOX256 = dict(
  common_params=dict(num_kp=15, image_channel=3, feature_channel=32, estimate_jacobian=False),
  kp_detector_params=dict(
    temperature=0.1,
    block_expansion=32,
    max_features=1024,
    scale_factor=0.25,
    num_blocks=5,
    reshape_channel=16384,
    reshape_depth=16,
  ),
  he_estimator_params=dict(block_expansion=64, max_features=2048, num_bins=66),
  generator_params=dict(
    block_expansion=64,
    max_features=512,
    num_down_blocks=2,
    reshape_channel=32,
    reshape_depth=16,
    num_resblocks=6,
    estimate_occlusion_map=True,
    dense_motion_params=dict(block_expansion=32, max_features=1024, num_blocks=5, reshape_depth=16, compress=4),
  ),
  discriminator_params=dict(scales=[1], block_expansion=32, max_features=512, num_blocks=4, sn=True),
)

# Every structural feature of vox-256 (anti-aliased keypoint input, reshapes, occlusion, spectral norm, two
# discriminator scales so the scale names are exercised) at test size: 64 px images, 4 keypoints, depth 4, and
# (2, 1, 2, 1) of the head estimator's (3, 3, 5, 2) stride-1 bottlenecks (a second one where the name has an index).
TINY = dict(
  common_params=dict(num_kp=4, image_channel=3, feature_channel=8, estimate_jacobian=False),
  kp_detector_params=dict(
    temperature=0.1,
    block_expansion=4,
    max_features=32,
    scale_factor=0.5,
    num_blocks=2,
    reshape_channel=64,
    reshape_depth=4,
  ),
  he_estimator_params=dict(block_expansion=4, max_features=64, num_bins=66, num_bottlenecks=(2, 1, 2, 1)),
  generator_params=dict(
    block_expansion=8,
    max_features=32,
    num_down_blocks=2,
    reshape_channel=8,
    reshape_depth=4,
    num_resblocks=2,
    estimate_occlusion_map=True,
    dense_motion_params=dict(block_expansion=4, max_features=32, num_blocks=2, reshape_depth=4, compress=2),
  ),
  discriminator_params=dict(scales=[1, 0.5], block_expansion=4, max_features=32, num_blocks=3, sn=True),
)

SECTIONS = ("generator", "discriminator", "kp_detector", "he_estimator")


# ----------------------------------------------------------------------------------------------------------
# The key map


@dataclasses.dataclass(frozen=True)
class Part:
  """One MMFA module's share of the checkpoint.

  prefix: the torch key prefix of the module (section + '.' + its path there); covers: the checkpoint key prefixes
  this module takes (the rest of the section belongs to other parts or is unused). fills: the module's variable-path
  prefixes the checkpoint holds (None: all); new: the module's own variables (path prefixes) no key fills.
  renames: (regex on the dotted module path built from the JAX path, replacement), for torch's Sequential names.
  """

  prefix: str
  covers: tuple[str, ...]
  fills: tuple[str, ...] | None = None
  new: tuple[str, ...] = ()
  renames: tuple[tuple[str, str], ...] = ()
  what: str = ""


PARTS: dict[str, Part] = {
  "appearance": Part(
    "generator.",
    ("generator.first.", "generator.down_blocks.", "generator.second.", "generator.resblocks_3d."),
    renames=((r"^resblocks_3d\.(\d+)\.", r"resblocks_3d.3dr\1."),),
    what="face-vid2vid generator's first / down_blocks / second / resblocks_3d",
  ),
  "dense_motion": Part(
    "generator.dense_motion_network.",
    ("generator.dense_motion_network.",),
    what="face-vid2vid generator's dense_motion_network",
  ),
  "generator": Part(
    "generator.",
    ("generator.third.", "generator.fourth."),
    fills=("third", "fourth"),
    new=("",),
    what="face-vid2vid generator's third / fourth; the multi-scale decoder is MMFA's (appendix A.1)",
  ),
  "kp_detector": Part(
    "kp_detector.",
    ("kp_detector.",),
    renames=(
      (r"^predictor\.down_blocks\.(\d+)\.", r"predictor.down_blocks.down\1."),
      (r"^predictor\.up_blocks\.(\d+)\.", r"predictor.up_blocks.up\1."),
    ),
    what="face-vid2vid's KPDetector (canonical keypoints)",
  ),
  "head_estimator": Part(
    "he_estimator.",
    ("he_estimator.",),
    new=("fc_scale",),
    renames=tuple((rf"^block{b}\.(\d+)\.", rf"block{b}.b{b}_\1.") for b in (1, 3, 5, 7)),
    what="face-vid2vid's HEEstimator (yaw / pitch / roll bins, translation); MMFA's scale head is new",
  ),
  "discriminator": Part("discriminator.", ("discriminator.",), what="face-vid2vid's MultiScaleDiscriminator"),
}

# Checkpoint keys deliberately not used, with the reason the report gives (matched in order, on the full key).
UNUSED: tuple[tuple[str, str], ...] = (
  (r"\.num_batches_tracked$", "BatchNorm batch counters (the running-average momentum is fixed)"),
  (r"^he_estimator\.fc_exp\.", "face-vid2vid's expression deltas (MMFA's expression encoder-decoder replaces them)"),
  (r"^generator\.decoder\.", "the SPADE generator's decoder (Vox-256-New; MMFA's multi-scale decoder replaces it)"),
  (r"^generator\.(resblocks_2d|up_blocks|final)\.", "OcclusionAwareGenerator's decoder (Beta; replaced by MMFA's)"),
  (r"^kp_detector\.jacobian\.", "FOMM-style keypoint Jacobians (estimate_jacobian is off in vox-256)"),
  (r"^kp_detector\.down\.weight$", "the anti-aliasing Gaussian (a fixed buffer, recomputed from scale_factor)"),
)

KP_DOWN_KEY = "kp_detector.down.weight"


def _torch_leaf(leaf: str, shape: tuple, spectral: bool) -> tuple[str, tuple]:
  """The torch leaf name and shape of a JAX variable."""
  if leaf == "kernel":
    name = "weight_orig" if spectral else "weight"
    if len(shape) == 2:
      return name, (shape[1], shape[0])
    if len(shape) in (4, 5):
      return name, (shape[-1], shape[-2], *shape[:-2])
    raise ValueError(f"a kernel of rank {len(shape)} has no torch layout")
  if leaf in ("u", "v"):
    return f"weight_{leaf}", shape
  return {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf), shape


@dataclasses.dataclass(frozen=True)
class Entry:
  """One filled variable: its module, JAX path (as nnx gives it: list indices are ints) and shape, the torch key
  and its shape."""

  module: str
  path: tuple
  shape: tuple[int, ...]
  key: str
  torch_shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return "/".join(str(p) for p in self.path)


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
  return any(p == "" or path == p or path.startswith(p + "/") for p in prefixes)


def _variables(module: nnx.Module) -> dict[tuple, tuple[int, ...]]:
  """{path: shape} of every variable (parameters and buffers); works on abstract modules from nnx.eval_shape."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module)):
    out[tuple(path)] = tuple(np.shape(var.get_value() if hasattr(var, "get_value") else var))
  return out


def face_vid2vid_parts(modules: Mapping[str, nnx.Module]) -> dict[str, nnx.Module]:
  """The given modules by part name. A module whose own children carry part names (the MMFA model: the training
  loop's "generator" group) stands for its children, under their attribute names; the others keep their names.
  Raises ValueError when no face-vid2vid part is among them (an import that would fill nothing)."""
  out: dict[str, nnx.Module] = {}
  for name, module in modules.items():
    children = {k: v for k, v in vars(module).items() if isinstance(v, nnx.Module)}
    expand = any(k in PARTS for k in children)
    for key, child in (children if expand else {name: module}).items():
      if key in out:
        raise ValueError(f"face-vid2vid init: two modules named {key!r} among {sorted(modules)}")
      out[key] = child
  if not any(name in PARTS for name in out):
    raise ValueError(f"face-vid2vid init: none of {sorted(modules)} is (or holds) one of {sorted(PARTS)}")
  return out


def key_map(modules: Mapping[str, nnx.Module]) -> tuple[list[Entry], dict[str, list[str]], list[str]]:
  """(filled entries, {module: new variable paths}, given modules that are not face-vid2vid's) of the modules
  (by part name, or containers of them: see face_vid2vid_parts).

  Raises AssertionError when a mapped module has a variable that is neither filled nor listed as new, whose key
  falls outside its part, or two variables map to one key: the map is out of date with the module (a programming
  error, not the checkpoint's).
  """
  entries, new, foreign, seen = [], {}, [], {}
  for name, module in face_vid2vid_parts(modules).items():
    part = PARTS.get(name)
    if part is None:
      foreign.append(name)
      continue
    variables = _variables(module)
    spectral = {path[:-1] for path in variables if path[-1] == "u"}
    new[name] = []
    for path, shape in variables.items():
      dotted = "/".join(str(p) for p in path)
      filled = _matches(dotted, part.fills) if part.fills is not None else not _matches(dotted, part.new)
      if not filled:
        if not _matches(dotted, part.new):
          raise AssertionError(f"face_vid2vid_format: {name}/{dotted} is neither filled nor new in PARTS")
        new[name].append(dotted)
        continue
      owner = path[:-1]
      leaf, tshape = _torch_leaf(str(path[-1]), shape, owner in spectral)
      module_path = "".join(f"{p}." for p in owner)
      for pattern, repl in part.renames:
        module_path = re.sub(pattern, repl, module_path)
      key = part.prefix + module_path + leaf
      if not key.startswith(part.covers):
        raise AssertionError(f"face_vid2vid_format: {name}/{dotted} maps to {key}, outside its part {part.covers}")
      if key in seen:
        raise AssertionError(f"face_vid2vid_format: {seen[key]} and {name}/{dotted} both map to {key}")
      seen[key] = f"{name}/{dotted}"
      entries.append(Entry(name, path, shape, key, tshape))
  return entries, new, foreign


def to_jax_layout(entry: Entry, value: np.ndarray) -> np.ndarray:
  """A checkpoint array in the JAX variable's layout."""
  value = np.asarray(value, np.float32)
  leaf = entry.path[-1]
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    return np.moveaxis(value, (0, 1), (-1, -2))  # (O, I, *k) -> (*k, I, O)
  return value.reshape(entry.shape)


# ----------------------------------------------------------------------------------------------------------
# The checkpoint file


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
  """A face-vid2vid checkpoint (NNNNNNNN-checkpoint.pth.tar) as ({'<section>.<key>': float32 array}, [the other
  top-level entries: optimizer states, 'epoch']). torch.load(weights_only=True): no pickled code runs. torch is
  imported only here."""
  import torch

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointReadError(f"face-vid2vid checkpoint {path!r} not found (a NNNNNNNN-checkpoint.pth.tar of "
                              "zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis)")  # fmt: skip
  try:
    raw = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors all mean an unusable file)
    raise CheckpointReadError(f"cannot read the face-vid2vid checkpoint {path!r}: {type(e).__name__}: {e}") from e
  if not isinstance(raw, dict) or not any(isinstance(raw.get(s), dict) for s in SECTIONS):
    found = sorted(raw)[:10] if isinstance(raw, dict) else type(raw).__name__
    raise CheckpointReadError(f"{path!r} is not a face-vid2vid checkpoint: expected a dict with state dicts under "
                              f"{', '.join(SECTIONS)}; found {found}")  # fmt: skip
  arrays, other = {}, []
  for section, value in raw.items():
    if section not in SECTIONS:
      other.append(str(section))
      continue
    for key, tensor in value.items():
      if hasattr(tensor, "detach"):
        t = tensor.detach().cpu()
        arrays[f"{section}.{key}"] = t.numpy() if not t.is_floating_point() else t.float().numpy()
  return arrays, sorted(other)


# ----------------------------------------------------------------------------------------------------------
# The import


@dataclasses.dataclass
class InitReport:
  """What an import filled, what stays new and what of the checkpoint is not used."""

  filled: dict[str, list[str]]  # module -> variable paths filled
  new: dict[str, list[str]]  # module -> its variable paths that stay new (MMFA's own), or ["<all>"]
  unused: dict[str, list[str]]  # reason -> checkpoint keys (and top-level entries) not used
  source: str = ""

  def lines(self) -> list[str]:
    out = [f"face-vid2vid init from {self.source}:" if self.source else "face-vid2vid init:"]
    for name, paths in self.filled.items():
      out.append(f"  filled {name}: {len(paths)} variables ({PARTS[name].what})")
    for name, paths in self.new.items():
      if paths == ["<all>"]:
        out.append(f"  new    {name}: all of it (not a face-vid2vid module)")
      elif paths:
        groups = sorted({p.split("/", 1)[0] for p in paths})
        out.append(f"  new    {name}: {len(paths)} variables ({', '.join(groups)}: MMFA's own)")
    for reason, keys in self.unused.items():
      out.append(f"  unused {len(keys)} checkpoint entries: {reason}")
    return out

  def __str__(self) -> str:
    return "\n".join(self.lines())


def _unused_reason(key: str) -> str | None:
  for pattern, reason in UNUSED:
    if re.search(pattern, key):
      return reason
  return None


def _check_kp_down(modules: Mapping[str, nnx.Module], shapes: Mapping[str, tuple], problems: list[str]) -> None:
  """The checkpoint's anti-aliasing buffer must exist iff the keypoint detector downsamples, with its kernel size
  (every conv of the detector has the same shape at any scale_factor, so only this buffer tells them apart)."""
  kp = modules.get("kp_detector")
  if kp is None or not any(k.startswith("kp_detector.") for k in shapes):
    return
  scale = float(getattr(kp, "scale_factor", 1.0))
  if KP_DOWN_KEY not in shapes:
    if scale != 1.0:
      problems.append(f"{KP_DOWN_KEY} missing (the checkpoint's detector has scale_factor 1) but kp_detector has "
                      f"scale_factor {scale:g}")  # fmt: skip
    return
  if scale == 1.0:
    problems.append(f"{KP_DOWN_KEY} present (the checkpoint's detector downsamples its input) but kp_detector has "
                    "scale_factor 1")  # fmt: skip
    return
  size = 2 * round((1 / scale - 1) / 2 * 4) + 1  # AntiAliasInterpolation2d's kernel size
  found = tuple(shapes[KP_DOWN_KEY])
  if found[-2:] != (size, size):
    problems.append(f"{KP_DOWN_KEY} is {found}: a {found[-1]}-tap Gaussian, not the {size}-tap one of kp_detector's "
                    f"scale_factor {scale:g}")  # fmt: skip


def _shaped(shape) -> np.ndarray:
  """A zero-stride array of the shape (no memory): check_params reads shapes off arrays."""
  return np.broadcast_to(np.zeros((), np.int8), tuple(shape))


def plan(modules: Mapping[str, nnx.Module], shapes: Mapping[str, tuple], other: tuple[str, ...] = (),
         where: str = "face-vid2vid checkpoint") -> tuple[list[Entry], InitReport]:  # fmt: skip
  """The strict check of a checkpoint's keys and shapes ({key: shape}; e.g. a torch model on the meta device)
  against the modules, no values needed: raises CheckpointKeyError listing every missing, unexpected and mis-shaped
  key (and a keypoint anti-aliasing buffer that disagrees with the detector's scale_factor)."""
  modules = face_vid2vid_parts(modules)
  entries, new, foreign = key_map(modules)
  by_key = {e.key: e for e in entries}
  unused: dict[str, list[str]] = {}
  given = {}
  for key, shape in shapes.items():
    reason = None if key in by_key else _unused_reason(key)
    if reason is None and key not in by_key:
      owner = next((n for n, part in PARTS.items() if key.startswith(part.covers)), None)
      if owner is not None and owner not in modules:
        reason = f"{owner}'s keys ({owner} not given)"
      elif owner is None and not any(key.startswith(part.prefix) for n, part in PARTS.items() if n in modules):
        reason = f"section {key.split('.', 1)[0]} (none of its modules given)"
    if reason is None:
      given[(key,)] = _shaped(shape)  # mapped, or unknown in a given part: check_params lists it as unexpected
    else:
      unused.setdefault(reason, []).append(key)
  if other:
    unused["optimizer states and the epoch (training bookkeeping)"] = list(other)
  problems: list[str] = []
  _check_kp_down(modules, shapes, problems)
  try:
    check_params({(e.key,): e.torch_shape for e in entries}, given, where)
  except CheckpointKeyError as e:
    if problems:
      e.args = (e.args[0] + "\n  inconsistent:\n" + "\n".join(f"    {p}" for p in problems),)
    raise
  if problems:
    raise CheckpointKeyError(f"{where}: the checkpoint does not match the model; nothing was loaded.\n  inconsistent:\n"
                             + "\n".join(f"    {p}" for p in problems))  # fmt: skip
  filled: dict[str, list[str]] = {}
  for e in entries:
    filled.setdefault(e.module, []).append(e.name)
  report = InitReport(filled, {**new, **{name: ["<all>"] for name in foreign}}, unused, where)
  return entries, report


def _placed(value: np.ndarray, var: nnx.Variable) -> jax.Array:
  """The array in the variable's dtype, laid out as the variable is (its sharding, when the model was built under a
  mesh: each host places only its own shards)."""
  current = var.get_value()
  value = value.astype(current.dtype)
  sharding = getattr(current, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def init_from_face_vid2vid(path: str | os.PathLike, modules: Mapping[str, nnx.Module],
                           log_fn: Callable[[str], None] | None = None) -> InitReport:  # fmt: skip
  """Fills the face-vid2vid parts of MMFA's modules ({'appearance', 'kp_detector', 'head_estimator',
  'dense_motion', 'generator', 'discriminator', ...: module}, or containers of them such as the MMFA model:
  {'generator': MMFA, 'discriminator': MultiScaleDiscriminator}) in place from a released checkpoint. Parameters
  and buffers alike: BatchNorm running averages and spectral-norm vectors are nnx.BatchStat variables here.

  Strict: every key the map expects must be in the file with its shape, and every key of a mapped section must
  be mapped or listed as unused, else CheckpointKeyError lists all that is wrong and nothing is written. Modules
  the map does not know (the expression encoder / decoder) are left as they are and reported new. Returns (and
  logs) the report of what was filled, what stays new and what of the file is not used.
  """
  modules = face_vid2vid_parts(modules)
  arrays, other = read_checkpoint(path)
  where = os.fspath(path)
  entries, report = plan(modules, {k: v.shape for k, v in arrays.items()}, tuple(other), where)
  per_module: dict[str, list] = {}
  for e in entries:
    per_module.setdefault(e.module, []).append(e)
  for name, group in per_module.items():
    module = modules[name]
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    leaves = [(e.path, flat[e.path].replace(_placed(to_jax_layout(e, arrays[e.key]), flat[e.path]))) for e in group]
    update_params(module, nnx.from_flat_state(leaves), f"{where} -> {name}")
  for line in report.lines():
    (log_fn or log.info)(line)
  return report
