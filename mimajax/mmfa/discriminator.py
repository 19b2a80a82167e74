"""MMFA's discriminator (appendix A.2 "GAN Loss": intermediate features for feature matching, final maps for the
least-squares loss): face-vid2vid's MultiScaleDiscriminator, a Pix2Pix-style patch discriminator per image scale.

Attribute names are face-vid2vid's (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis
modules/discriminator.py): discs (keyed by the scale with '.' -> '-', as its ModuleDict), down_blocks, conv, norm.
With sn=True every conv is spectrally normalised as torch.nn.utils.spectral_norm does it; its weight_orig /
weight_u / weight_v / bias are kernel / u / v / bias here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa.blocks import Conv2D, avg_pool

SN_EPS = 1e-12  # torch spectral_norm's eps (its F.normalize: v / max(|v|, eps))


def _normalize(v: jax.Array) -> jax.Array:
  return v / jnp.maximum(jnp.linalg.norm(v), SN_EPS)


class SpectralNormConv2D(Conv2D):
  """A Conv2D whose kernel is divided by its largest singular value, estimated as torch.nn.utils.spectral_norm does:
  the kernel as a (out, in * kh * kw) matrix W in torch's (in, kh, kw) order, vectors u (out) and v (in * kh * kw)
  kept as nnx.BatchStat. In training (`use_running_average=False`, what Module.train() sets) each call first does one
  power iteration, v = normalize(W^T u), u = normalize(W v), stored and not differentiated; eval (Module.eval())
  leaves u, v alone. sigma = u . W v, and the gradient reaches the kernel through sigma, as in torch."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    padding: int = 0,
    use_running_average: bool = False,
    rngs: nnx.Rngs,
  ):
    super().__init__(in_features, out_features, kernel_size, padding=padding, rngs=rngs)
    self.use_running_average = use_running_average
    u = jax.random.normal(rngs.params(), (out_features,), jnp.float32)
    v = jax.random.normal(rngs.params(), (in_features * self.kernel_size[0] * self.kernel_size[1],), jnp.float32)
    self.u = nnx.BatchStat(_normalize(u))
    self.v = nnx.BatchStat(_normalize(v))

  def _matrix(self, kernel: jax.Array) -> jax.Array:
    return jnp.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[-1], -1)  # torch weight.view(out, -1)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running = self.use_running_average if use_running_average is None else use_running_average
    kernel = self.kernel[...]
    matrix = self._matrix(kernel)
    hp = jax.lax.Precision.HIGHEST
    u, v = self.u[...], self.v[...]
    if not use_running:
      w = jax.lax.stop_gradient(matrix)
      v = _normalize(jnp.dot(w.T, u, precision=hp))
      u = _normalize(jnp.dot(w, v, precision=hp))
      self.u[...], self.v[...] = u, v
    sigma = jnp.dot(u, jnp.dot(matrix, v, precision=hp), precision=hp)
    y = jax.lax.conv_general_dilated(
      x, kernel / sigma, self.stride, [(p, p) for p in self.padding], dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # fmt: skip
    return y + self.bias[...]


class InstanceNorm2d(nnx.Module):
  """torch nn.InstanceNorm2d(affine=True, track_running_stats=False): per sample and channel over (H, W), biased
  variance, eps 1e-5, in training and eval alike. Leaves scale / bias (torch weight / bias)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


class DiscriminatorBlock(nnx.Module):
  """face-vid2vid's discriminator DownBlock2d: 4x4 conv (no padding) -> InstanceNorm (norm) -> LeakyReLU(0.2) ->
  2x2 average pool (pool)."""

  def __init__(self, in_features: int, out_features: int, *, norm: bool, pool: bool, sn: bool, rngs: nnx.Rngs):
    conv = SpectralNormConv2D if sn else Conv2D
    self.conv = conv(in_features, out_features, 4, rngs=rngs)
    self.norm = InstanceNorm2d(out_features) if norm else None
    self.pool = pool

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.conv(x)
    if self.norm is not None:
      out = self.norm(out)
    out = jax.nn.leaky_relu(out, 0.2)
    return avg_pool(out, (2, 2)) if self.pool else out


class Discriminator(nnx.Module):
  """face-vid2vid's Discriminator: num_blocks DiscriminatorBlocks (no norm on the first, no pool on the last), then a
  1x1 conv to one channel. image (N, H, W, num_channels) -> (feature maps of every block, prediction map)."""

  def __init__(
    self,
    *,
    num_channels: int = 3,
    block_expansion: int = 64,
    num_blocks: int = 4,
    max_features: int = 512,
    sn: bool = False,
    rngs: nnx.Rngs,
  ):
    widths = [num_channels] + [min(max_features, block_expansion * (2 ** (i + 1))) for i in range(num_blocks)]
    self.down_blocks = nnx.List(
      [
        DiscriminatorBlock(widths[i], widths[i + 1], norm=i != 0, pool=i != num_blocks - 1, sn=sn, rngs=rngs)
        for i in range(num_blocks)
      ]
    )
    self.conv = (SpectralNormConv2D if sn else Conv2D)(widths[-1], 1, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    feature_maps = []
    for block in self.down_blocks:
      x = block(x)
      feature_maps.append(x)
    return feature_maps, self.conv(x)


def scale_key(scale: float | int) -> str:
  """face-vid2vid's pyramid / output key suffix: str(scale) (1 -> '1', 0.5 -> '0.5')."""
  return str(scale)


class MultiScaleDiscriminator(nnx.Module):
  """face-vid2vid's MultiScaleDiscriminator: one Discriminator per scale of the image pyramid.

  pyramid {"prediction_<scale>": (N, h, w, C)} -> {"feature_maps_<scale>": [...], "prediction_map_<scale>":
  (N, h', w', 1)} for each configured scale. Takes face-vid2vid's discriminator_params (+ image_channel as
  num_channels)."""

  def __init__(
    self,
    *,
    scales: Sequence[float | int] = (1,),
    block_expansion: int = 64,
    num_blocks: int = 4,
    max_features: int = 512,
    sn: bool = False,
    num_channels: int = 3,
    rngs: nnx.Rngs,
  ):
    self.scales = tuple(scales)
    self.discs = nnx.Dict(
      {
        scale_key(s).replace(".", "-"): Discriminator(
          num_channels=num_channels,
          block_expansion=block_expansion,
          num_blocks=num_blocks,
          max_features=max_features,
          sn=sn,
          rngs=rngs,
        )  # fmt: skip
        for s in self.scales
      }
    )

  def __call__(self, pyramid: Mapping[str, jax.Array]) -> dict[str, jax.Array | list[jax.Array]]:
    out = {}
    for s in self.scales:
      key = scale_key(s)
      feature_maps, prediction_map = self.discs[key.replace(".", "-")](pyramid["prediction_" + key])
      out["feature_maps_" + key] = feature_maps
      out["prediction_map_" + key] = prediction_map
    return out
