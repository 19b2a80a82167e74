"""MMFA's dense 3-D motion (sec. 3.1, appendix A.1): face-vid2vid's DenseMotionNetwork with occlusion.

From the source feature volume and the two keypoint sets (eq. 5's x_s and x_d) it builds K + 1 sparse motions (the
identity for the background, p - x_d,k + x_s,k for keypoint k: translations only, no jacobians), samples the
compressed feature with each, and lets a 3-D hourglass weigh them (softmax mask) into one deformation; an
occlusion map (N, H, W, 1) comes from the hourglass output flattened over depth. Attribute names are face-vid2vid's
(zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis modules/dense_motion.py): hourglass, mask,
compress, norm, occlusion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa.blocks import (
  BatchNorm,
  Conv2D,
  Conv3D,
  Hourglass,
  grid_sample_3d,
  kp2gaussian,
  make_coordinate_grid_3d,
  volume_to_channels,
)

KP_VARIANCE = 0.01  # face-vid2vid's create_heatmap_representations


def sparse_motions(spatial_size: tuple[int, int, int], kp_driving: jax.Array, kp_source: jax.Array) -> jax.Array:
  """face-vid2vid's create_sparse_motions without jacobians: (N, K + 1, d, h, w, 3), background (identity grid)
  first, then p - kp_driving[k] + kp_source[k] (where each driving-frame point samples the source)."""
  n, k, _ = kp_driving.shape
  grid = make_coordinate_grid_3d(spatial_size)[None, None]  # (1, 1, d, h, w, 3)
  driving_to_source = grid - kp_driving[:, :, None, None, None, :] + kp_source[:, :, None, None, None, :]
  return jnp.concatenate([jnp.broadcast_to(grid, (n, 1, *grid.shape[2:])), driving_to_source], axis=1)


def heatmap_representations(spatial_size: tuple[int, int, int], kp_driving: jax.Array, kp_source: jax.Array):
  """face-vid2vid's create_heatmap_representations: Gaussian(driving) - Gaussian(source) per keypoint, a zero map
  for the background first: (N, K + 1, d, h, w, 1)."""
  heat = kp2gaussian(kp_driving, spatial_size, KP_VARIANCE) - kp2gaussian(kp_source, spatial_size, KP_VARIANCE)
  heat = jnp.moveaxis(heat, -1, 1)  # (N, K, d, h, w)
  zeros = jnp.zeros_like(heat[:, :1])
  return jnp.concatenate([zeros, heat], axis=1)[..., None]


def hourglass_inputs(feature: jax.Array, kp_driving: jax.Array, kp_source: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The sparse motions (N, K + 1, d, h, w, 3) and the hourglass input (N, d, h, w, (K + 1) (1 + C)) from the
  compressed feature (N, d, h, w, C): per motion its heatmap difference then the feature it samples (torch's
  cat([heatmap, deformed], dim=2).view(bs, -1, d, h, w): channel = motion * (C + 1) + j)."""
  n, d, h, w, _ = feature.shape
  k = kp_driving.shape[1]
  motions = sparse_motions((d, h, w), kp_driving, kp_source)
  # All K + 1 grids sample the one volume: stacked along the grid's depth, no repeated copies of the feature.
  deformed = grid_sample_3d(feature, motions.reshape(n, (k + 1) * d, h, w, 3)).reshape(n, k + 1, d, h, w, -1)
  inputs = jnp.concatenate([heatmap_representations((d, h, w), kp_driving, kp_source), deformed], axis=-1)
  return motions, jnp.moveaxis(inputs, 1, -2).reshape(n, d, h, w, -1)


class DenseMotionNetwork(nnx.Module):
  """(feature (N, D, H, W, feature_channel), kp_driving (N, K, 3), kp_source (N, K, 3)) ->
  dict(mask (N, D, H, W, K + 1), deformation (N, D, H, W, 3) of (x, y, z), occlusion_map (N, H, W, 1) when
  estimate_occlusion_map). Takes face-vid2vid's dense_motion_params plus num_kp / feature_channel / the
  generator's estimate_occlusion_map, as its OcclusionAwareGenerator passes them."""

  def __init__(
    self,
    *,
    block_expansion: int,
    num_blocks: int,
    max_features: int,
    num_kp: int,
    feature_channel: int,
    reshape_depth: int,
    compress: int,
    estimate_occlusion_map: bool = False,
    rngs: nnx.Rngs,
  ):
    self.hourglass = Hourglass(
      block_expansion, in_features=(num_kp + 1) * (compress + 1), num_blocks=num_blocks, max_features=max_features,
      rngs=rngs,
    )  # fmt: skip
    self.mask = Conv3D(self.hourglass.out_filters, num_kp + 1, 7, padding=3, rngs=rngs)
    self.compress = Conv3D(feature_channel, compress, 1, rngs=rngs)
    self.norm = BatchNorm(compress)
    self.occlusion = (
      Conv2D(self.hourglass.out_filters * reshape_depth, 1, 7, padding=3, rngs=rngs) if estimate_occlusion_map else None
    )
    self.num_kp, self.reshape_depth = num_kp, reshape_depth

  def __call__(self, feature: jax.Array, kp_driving: jax.Array, kp_source: jax.Array) -> dict[str, jax.Array]:
    n, d, h, w, _ = feature.shape
    k = self.num_kp
    if kp_driving.shape != (n, k, 3) or kp_source.shape != (n, k, 3):
      raise ValueError(f"DenseMotionNetwork: keypoints {kp_driving.shape} / {kp_source.shape}, want ({n}, {k}, 3)")
    if self.occlusion is not None and d != self.reshape_depth:
      raise ValueError(f"DenseMotionNetwork: feature depth {d} != reshape_depth {self.reshape_depth}")
    feature = jax.nn.relu(self.norm(self.compress(feature)))

    motions, inputs = hourglass_inputs(feature, kp_driving, kp_source)
    prediction = self.hourglass(inputs)
    mask = jax.nn.softmax(self.mask(prediction), axis=-1)  # (N, d, h, w, K+1)
    deformation = (motions * jnp.moveaxis(mask, -1, 1)[..., None]).sum(axis=1)  # torch's (motion * mask).sum(1)
    out = dict(mask=mask, deformation=deformation)
    if self.occlusion is not None:
      out["occlusion_map"] = jax.nn.sigmoid(self.occlusion(volume_to_channels(prediction)))
    return out
