"""MMFA's start from face-vid2vid's released weights: `mimajax parity --component mmfa_init`.

The PyTorch transcription of face-vid2vid (mimajax/mmfa/pytorch/face_vid2vid.py, the public reimplementation's names
and shapes) is built at random weights, its BatchNorm statistics and spectral-norm vectors set by a few training-mode
forwards (so they are a trained file's kind of values, not 0 / 1), saved with torch.save in the released layout
(NNNNNNNN-checkpoint.pth.tar with optimizer states and the epoch), and read back into MMFA's JAX modules through
mimajax.mmfa.face_vid2vid_format.init_from_face_vid2vid. Both then run on the same random inputs:

  kp_detector     canonical keypoints x_c                       (eval; train: batch statistics)
  head_estimator  yaw / pitch / roll logits, translation        (eval; train)
  appearance      the feature volume f_s                         (eval; train)
  dense_motion    mask, deformation, occlusion map on a given volume and keypoints (eval; train)
  generator       the warped volume and third + fourth on it (the deformation is the reference's) (eval; train)
  discriminator   every feature map and prediction map per scale (eval; train: one power iteration)

and after the training-mode pass, the updated BatchNorm running averages and spectral-norm vectors (read back
through the same key map). Each line prints a relative L2 error; the check returns the largest. torch is imported
only inside these functions.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from mimajax.mmfa import face_vid2vid_format as fmt
from mimajax.mmfa.appearance import AppearanceFeatureExtractor
from mimajax.mmfa.blocks import volume_to_channels
from mimajax.mmfa.dense_motion import DenseMotionNetwork
from mimajax.mmfa.discriminator import MultiScaleDiscriminator
from mimajax.mmfa.generator import MultiScaleGenerator, deform_input
from mimajax.mmfa.keypoint_detector import CanonicalKeypointDetector, HeadEstimator
from mimajax.parity.common import nchw, perturb_, rel_err

SIZES = {"tiny": fmt.TINY, "vox256": fmt.VOX256, "sd15": fmt.VOX256, "full": fmt.VOX256}  # the CLI's big size: sd15
IMAGE_SIZE = {"tiny": 64, "vox256": 256, "sd15": 256, "full": 256}


# ----------------------------------------------------------------------------------------------------------
# MMFA's JAX modules from face-vid2vid's model_params (as mimajax/mmfa/model.py builds them from the config)


FIRST_KERNEL_SIZE = {"spade": 3, "original": 7}  # the generator's `first` conv: Vox-256-New / Beta release


def jax_modules(model_params: Mapping, generator_kind: str = "spade", *, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
  """The six modules the map covers, named as in the MMFA model, from a face-vid2vid config's model_params, the
  appearance extractor's `first` conv sized for the checkpoint's generator kind."""
  common = dict(model_params["common_params"])
  gen = {k: v for k, v in model_params["generator_params"].items() if k != "dense_motion_params"}
  dense = model_params["generator_params"]["dense_motion_params"]
  image_channel, num_kp = common["image_channel"], common["num_kp"]
  first = FIRST_KERNEL_SIZE[generator_kind]
  return {
    "appearance": AppearanceFeatureExtractor(image_channel=image_channel, first_kernel_size=first, **gen, rngs=rngs),
    "kp_detector": CanonicalKeypointDetector(**common, **model_params["kp_detector_params"], rngs=rngs),
    "head_estimator": HeadEstimator(**common, **model_params["he_estimator_params"], rngs=rngs),
    "dense_motion": DenseMotionNetwork(
      num_kp=num_kp,
      feature_channel=gen["reshape_channel"],
      estimate_occlusion_map=gen["estimate_occlusion_map"],
      **dense,
      rngs=rngs,
    ),
    "generator": MultiScaleGenerator(image_channel=image_channel, **gen, rngs=rngs),
    "discriminator": MultiScaleDiscriminator(
      num_channels=image_channel, **model_params["discriminator_params"], rngs=rngs
    ),
  }


def abstract_jax_modules(model_params: Mapping, generator_kind: str = "spade") -> dict[str, nnx.Module]:
  """The same modules with shapes only (nnx.eval_shape: nothing is initialised)."""
  return nnx.eval_shape(lambda: jax_modules(model_params, generator_kind, rngs=nnx.Rngs(0)))


def zero_jax_modules(model_params: Mapping, generator_kind: str = "spade") -> dict[str, nnx.Module]:
  """The same modules with every variable zero: what the checkpoint fills is overwritten anyway, and on CPU the
  modules' own random init (one compiled op per variable shape) costs half a minute at tiny size."""
  out = {}
  for name, module in abstract_jax_modules(model_params, generator_kind).items():
    graphdef, state = nnx.split(module)
    out[name] = nnx.merge(graphdef, jax.tree.map(lambda v: jax.device_put(np.zeros(v.shape, v.dtype)), state))
  return out


def torch_state_shapes(model_params: Mapping, generator_kind: str = "spade") -> dict[str, tuple]:
  """{checkpoint key: shape} of the PyTorch reference built on torch's meta device (no memory, no compute)."""
  import torch

  from mimajax.mmfa.pytorch import face_vid2vid as ref

  with torch.device("meta"):
    nets = ref.build(model_params, generator_kind)
  return {f"{name}.{k}": tuple(v.shape) for name, net in nets.items() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# The reference at random weights


def _inputs(model_params: Mapping, px: int, batch: int, seed: int) -> dict[str, np.ndarray]:
  """Random images and keypoints, NHWC (the JAX side's layout)."""
  rng = np.random.default_rng(seed)
  k = model_params["common_params"]["num_kp"]
  kp_source = rng.uniform(-0.7, 0.7, (batch, k, 3)).astype(np.float32)
  out = dict(
    image=rng.uniform(0, 1, (batch, px, px, 3)).astype(np.float32),
    kp_source=kp_source,
    kp_driving=(kp_source + rng.normal(0, 0.1, kp_source.shape)).astype(np.float32),
  )
  for s in model_params["discriminator_params"]["scales"]:
    side = int(px * s)
    out[f"prediction_{s}"] = rng.uniform(0, 1, (batch, side, side, 3)).astype(np.float32)
  return out


def _torch_forward_all(nets: dict, x: Mapping[str, np.ndarray], scales) -> None:
  """One forward of every compared network (to move BatchNorm statistics / spectral-norm vectors in training
  mode); the generator up to third + fourth (its decoder is not MMFA's, and at vox-256 the costliest part)."""
  import torch

  image = torch.from_numpy(nchw(x["image"]))
  kp_driving, kp_source = ({"value": torch.from_numpy(x[k])} for k in ("kp_driving", "kp_source"))
  nets["kp_detector"](image)
  nets["he_estimator"](image)
  g = nets["generator"]
  volume = g.appearance(image)
  g.to_2d(g.deform(volume, g.dense_motion_network(volume, kp_driving, kp_source)["deformation"]))
  nets["discriminator"]({f"prediction_{s}": torch.from_numpy(nchw(x[f"prediction_{s}"])) for s in scales})


def randomise_(nets: dict, model_params: Mapping, px: int, batch: int, seed: int) -> dict:
  """Weights that exercise every parameter and buffer: noise on all parameters (perturb_), random BatchNorm affines,
  then two training-mode forwards on random inputs with a cumulative average (momentum None), so the running
  statistics are the activations' own, and the spectral-norm vectors have moved by two power iterations."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for i, net in enumerate(nets.values()):
      perturb_(net, seed + i)
      for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
          m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
          m.momentum = None
      net.train()
    scales = model_params["discriminator_params"]["scales"]
    for step in range(2):
      _torch_forward_all(nets, _inputs(model_params, px, batch, seed + 100 + step), scales)
    for net in nets.values():
      for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
          m.momentum = 0.1
      net.eval()
  return nets


# ----------------------------------------------------------------------------------------------------------
# The comparison


def _nhwc(t) -> np.ndarray:
  """A torch NC... tensor as a channels-last float64 array."""
  return np.moveaxis(t.detach().double().numpy(), 1, -1)


def reference_outputs(nets: dict, x: Mapping[str, np.ndarray], scales, dtype) -> dict[str, np.ndarray]:
  """Every compared output of the PyTorch reference (float64 arrays, channels-last), run in `dtype` in the nets'
  current modes; plus the inputs the JAX side is given where a module is checked on its own ('in ...')."""
  import torch

  def t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

  image = t(nchw(x["image"]))
  g = nets["generator"]
  out = {}
  with torch.no_grad():
    out["kp_detector x_c"] = nets["kp_detector"](image)["value"].double().numpy()
    he = nets["he_estimator"](image)
    for ours, theirs in (("yaw", "yaw"), ("pitch", "pitch"), ("roll", "roll"), ("translation", "t")):
      out[f"head_estimator {ours}"] = he[theirs].double().numpy()
    volume = g.appearance(image)  # (N, C, D, H, W)
    out["appearance f_s"] = _nhwc(volume)
    motion = g.dense_motion_network(volume, {"value": t(x["kp_driving"])}, {"value": t(x["kp_source"])})
    out["dense_motion deformation"] = motion["deformation"].double().numpy()
    out["dense_motion mask"] = _nhwc(motion["mask"])
    if "occlusion_map" in motion:
      out["dense_motion occlusion"] = _nhwc(motion["occlusion_map"])
    warped = g.deform(volume, motion["deformation"])
    out["generator warped volume"] = _nhwc(warped)
    out["generator third+fourth"] = _nhwc(g.to_2d(warped))
    disc = nets["discriminator"]({f"prediction_{s}": t(nchw(x[f"prediction_{s}"])) for s in scales})
    for s in scales:
      for i, fm in enumerate(disc[f"feature_maps_{s}"]):
        out[f"discriminator {s} feature_map {i}"] = _nhwc(fm)
      out[f"discriminator {s} prediction_map"] = _nhwc(disc[f"prediction_map_{s}"])
  return out


def _jit_call(fn, *args):
  """fn(*args) compiled once (nnx.jit: a module's state changes in training mode come back): on CPU one compile per
  module is faster than op-by-op dispatch of its first eager call."""
  return nnx.jit(fn)(*args)


def our_outputs(modules: dict, x: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], scales) -> dict:
  """The same outputs from MMFA's JAX modules (in their current modes). dense_motion and the generator's warp /
  third + fourth run on the reference's volume and deformation, so each module is checked on its own."""
  f32 = np.float32
  volume = ref["appearance f_s"].astype(f32)
  deformation = ref["dense_motion deformation"].astype(f32)
  warped = ref["generator warped volume"].astype(f32)
  pyramid = {f"prediction_{s}": x[f"prediction_{s}"] for s in scales}
  out = {"kp_detector x_c": _jit_call(lambda m, a: m(a), modules["kp_detector"], x["image"])}
  he = _jit_call(lambda m, a: m(a), modules["head_estimator"], x["image"])
  for k in ("yaw", "pitch", "roll", "translation"):
    out[f"head_estimator {k}"] = he[k]
  out["appearance f_s"] = _jit_call(lambda m, a: m(a), modules["appearance"], x["image"])
  motion = _jit_call(lambda m, *a: m(*a), modules["dense_motion"], volume, x["kp_driving"], x["kp_source"])
  out["dense_motion deformation"] = motion["deformation"]
  out["dense_motion mask"] = motion["mask"]
  if "occlusion_map" in motion:
    out["dense_motion occlusion"] = motion["occlusion_map"]
  out["generator warped volume"], out["generator third+fourth"] = _jit_call(
    lambda g, v, d, w: (deform_input(v, d), g.fourth(g.third(volume_to_channels(w)))),
    modules["generator"], volume, deformation, warped,
  )  # fmt: skip
  disc = _jit_call(lambda m, p: m(p), modules["discriminator"], pyramid)
  for s in scales:
    for i, fm in enumerate(disc[f"feature_maps_{s}"]):
      out[f"discriminator {s} feature_map {i}"] = fm
    out[f"discriminator {s} prediction_map"] = disc[f"prediction_map_{s}"]
  return {k: np.asarray(v) for k, v in out.items()}


def _buffers(entries: list[fmt.Entry], modules: dict | None = None, nets: dict | None = None) -> dict:
  """Every BatchNorm running average and spectral-norm vector (float64, flattened), grouped per module and kind,
  read from the JAX modules or from the torch nets through the key map."""
  flats = {name: dict(nnx.to_flat_state(nnx.state(m))) for name, m in (modules or {}).items()}
  states = {name: net.state_dict() for name, net in (nets or {}).items()}
  groups: dict[str, list] = {}
  for e in entries:
    leaf = str(e.path[-1])
    if leaf not in ("mean", "var", "u", "v"):
      continue
    if modules is not None:
      value = np.asarray(flats[e.module][e.path].get_value(), np.float64)
    else:
      section, key = e.key.split(".", 1)
      value = states[section][key].double().numpy()
    kind = "running mean/var" if leaf in ("mean", "var") else "spectral u/v"
    groups.setdefault(f"{e.module} {kind} (updated)", []).append(value.reshape(-1))
  return {name: np.concatenate(parts) for name, parts in groups.items()}


def _import_error(nets: dict, modules: dict, entries: list[fmt.Entry]) -> float:
  """max |JAX variable - checkpoint value| over every filled variable, in torch layout (0 for an exact copy)."""
  states = {name: net.state_dict() for name, net in nets.items()}
  flats = {name: dict(nnx.to_flat_state(nnx.state(m))) for name, m in modules.items()}
  worst = 0.0
  for e in entries:
    section, key = e.key.split(".", 1)
    theirs = states[section][key].numpy()
    ours = fmt.to_jax_layout(e, theirs)
    worst = max(worst, float(np.max(np.abs(np.asarray(flats[e.module][e.path].get_value()) - ours), initial=0.0)))
  return worst


def _set_mode(nets: dict, modules: dict, train: bool) -> None:
  for net in nets.values():
    net.train(train)
  for m in modules.values():
    m.train() if train else m.eval()


def mmfa_init_parity(size: str = "tiny", seed: int = 0, log: Callable[[str], None] = print, batch: int = 2,
                     generator_kind: str = "spade", train: bool = True, floor: bool = True,
                     reference_dtype: str | None = None, **kw) -> float:  # fmt: skip
  """face-vid2vid's PyTorch modules vs MMFA's JAX modules filled from their saved checkpoint; the largest rel_err.

  The reference runs in float64 (the same float32 weights; reference_dtype, default float64 at tiny size), so a
  figure is the JAX side's own error; each line also shows torch's float32 result against it: the float32 floor of
  these random weights (the head estimator's trunk amplifies rounding most: with all 16 of its bottlenecks, at tiny
  widths, torch's own float32 result was 1.1e-4 off). At vox-256 the reference is float32: torch's float64 Conv3d
  on CPU unfolds the dense motion's 7x7x7 mask conv into a ~20 GB buffer.
  size "tiny" (64 px, fmt.TINY) or "vox256" (256 px, config/vox-256.yaml; the CLI's "sd15" means it too).
  generator_kind: the reference generator, "spade" (the Vox-256-New release: OcclusionAwareSPADEGenerator, `first`
  3x3) or "original" (the Beta release: OcclusionAwareGenerator, `first` 7x7). train: also compare training mode
  (batch statistics, one power iteration) and the buffers it updates. floor: also run the reference in float32,
  to print torch's own error. The JAX modules start from zeros (zero_jax_modules): the checkpoint fills what is
  compared.
  """
  import torch

  from mimajax.mmfa.pytorch import face_vid2vid as ref

  model_params = copy.deepcopy(SIZES[size])
  reference_dtype = reference_dtype or ("float64" if size == "tiny" else "float32")
  scales = model_params["discriminator_params"]["scales"]
  px = IMAGE_SIZE[size]
  if size != "tiny":
    batch = min(batch, 1)  # vox-256 on CPU: one sample (training-mode BatchNorm still sees >= 64 values a channel)
  torch.manual_seed(seed)
  t0 = time.perf_counter()
  nets = randomise_(ref.build(model_params, generator_kind, spade_hidden=128 if size != "tiny" else 16),
                    model_params, px, max(batch, 2), seed)  # fmt: skip
  modules = zero_jax_modules(model_params, generator_kind)
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "00000000-checkpoint.pth.tar"
    ref.save_checkpoint(nets, path, epoch=0)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = fmt.init_from_face_vid2vid(path, modules, log_fn=lambda line: log("  " + line))
    t_import = time.perf_counter() - t0
  entries, _, _ = fmt.key_map(modules)
  log(f"mmfa_init parity ({size}, {px} px, batch {batch}, generator {generator_kind!r}, random weights, "
      f"reference in {reference_dtype}): "
      f"{sum(len(v) for v in report.filled.values())} variables filled; import exact to "
      f"{_import_error(nets, modules, entries):.1e}")  # fmt: skip
  exact_dtype = getattr(torch, reference_dtype)
  floor = floor and exact_dtype != torch.float32
  nets_ref = nets
  if exact_dtype != torch.float32:
    nets_ref = {name: copy.deepcopy(net).to(exact_dtype) for name, net in nets.items()}
  x = _inputs(model_params, px, batch, seed)
  t0 = time.perf_counter()
  errs, floors = {}, {}
  for mode in ("eval", "train") if train else ("eval",):
    _set_mode(nets, modules, mode == "train")
    _set_mode(nets_ref, {}, mode == "train")
    exact = reference_outputs(nets_ref, x, scales, exact_dtype)
    torch32 = reference_outputs(nets, x, scales, torch.float32) if floor else {}
    ours = our_outputs(modules, x, exact, scales)
    if mode == "train":  # the buffers the pass updated
      exact.update(_buffers(entries, nets=nets_ref))
      torch32.update(_buffers(entries, nets=nets) if floor else {})
      ours.update(_buffers(entries, modules=modules))
    for k in exact:
      errs[f"{mode:<5} {k}"] = rel_err(ours[k], exact[k])
      floors[f"{mode:<5} {k}"] = rel_err(torch32[k], exact[k]) if floor else float("nan")
  _set_mode(nets, modules, False)
  t_run = time.perf_counter() - t0
  for name, e in errs.items():
    log(f"  {name:<48} rel_err={e:.3e}" + (f"   (torch fp32: {floors[name]:.1e})" if floor else ""))
  worst = max(errs, key=errs.get)
  log(f"mmfa_init parity: worst {worst.split(maxsplit=1)[1]} ({worst.split()[0]}); reference {t_ref:.1f}s, import "
      f"{t_import:.1f}s, compare {t_run:.1f}s")  # fmt: skip
  return errs[worst]
