"""MMFA's multi-scale generator (appendix A.1 "Multi-Scale Generator"): the warped feature volume -> images at
3 resolutions, coarse to fine, the finest at the input image's.

Layout (ours where the paper is silent; with vox-256's num_down_blocks = 2 the outputs are H/4, H/2, H):
  f_s (N, D, H', W', C) --grid_sample_3d(deformation)--> reshape to 2-D (N, H', W', C * D)     [face-vid2vid]
  third: SameBlock2d(C * D -> w_0, 3x3, LeakyReLU); fourth: 1x1 conv; x occlusion_map            [face-vid2vid]
  for level i = 0 .. num_down_blocks (H' * 2^i):
    resblocks[i]: ResBlock2d(w_i)                            [paper: "a ResBlock to extract the image feature"]
    to_images[i]: 7x7 conv w_i -> image_channel, sigmoid     [paper: "a convolutional layer ... an output image";
                                                              face-vid2vid's `final` 7x7 conv + sigmoid]
    if not the last level: up_blocks[i]: UpBlock2d(w_i + image_channel -> w_{i+1}) on concat(feature, image)
                                                             [paper: "concatenate ... UpBlock"]
  with w_i = max(block_expansion, block_expansion * 2^(num_down_blocks - i)): face-vid2vid's decoder widths.
The paper's single ResBlock per level replaces face-vid2vid's num_resblocks ResBlock2d's at the coarsest level
(`num_resblocks` sets the appearance extractor's 3-D blocks only). third / fourth keep face-vid2vid's names (its
checkpoint's generator.third / fourth map by name); resblocks / to_images / up_blocks are MMFA's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa.blocks import (
  Conv2D,
  ResBlock2d,
  SameBlock2d,
  UpBlock2d,
  grid_sample_3d,
  interpolate_linear,
  volume_to_channels,
)


def deform_input(feature: jax.Array, deformation: jax.Array) -> jax.Array:
  """face-vid2vid's deform_input: warp the volume (N, D, H, W, C) with a deformation (N, d, h, w, 3), first resized
  trilinearly (align_corners=False) to the volume's size when it differs.

  As in face-vid2vid, the deformation's identity is make_coordinate_grid's (ends at +-1) read by grid_sample with
  align_corners=False (pixel centres at -1 + (2i + 1) / size): the identity deformation resamples the volume
  slightly shrunk towards its centre, not exactly; released face-vid2vid weights are trained with that."""
  if deformation.shape[1:4] != feature.shape[1:4]:
    deformation = interpolate_linear(deformation, feature.shape[1:4])
  return grid_sample_3d(feature, deformation)


class MultiScaleGenerator(nnx.Module):
  """(feature (N, D, H', W', reshape_channel), deformation (N, D, H', W', 3), occlusion_map (N, H', W', 1) or None)
  -> dict(predictions: num_down_blocks + 1 images (N, H' 2^i, W' 2^i, image_channel) in (0, 1) coarse -> fine,
  prediction: the finest). Takes face-vid2vid's generator_params (num_resblocks / estimate_occlusion_map accepted
  so the section can be passed whole; unused here)."""

  def __init__(
    self,
    *,
    block_expansion: int,
    max_features: int,
    num_down_blocks: int,
    reshape_channel: int,
    reshape_depth: int,
    image_channel: int = 3,
    num_resblocks: int | None = None,
    estimate_occlusion_map: bool | None = None,
    rngs: nnx.Rngs,
  ):
    del num_resblocks, estimate_occlusion_map
    if max_features != reshape_channel * reshape_depth:
      raise ValueError(
        f"MultiScaleGenerator: max_features={max_features} must be reshape_channel x reshape_depth "
        f"({reshape_channel} x {reshape_depth}), the channels of the volume reshaped to 2-D"
      )
    widths = [max(block_expansion, block_expansion * (2 ** (num_down_blocks - i))) for i in range(num_down_blocks + 1)]
    self.third = SameBlock2d(max_features, widths[0], kernel_size=3, padding=1, lrelu=True, rngs=rngs)
    self.fourth = Conv2D(widths[0], widths[0], 1, rngs=rngs)
    self.resblocks = nnx.List([ResBlock2d(w, 3, 1, rngs=rngs) for w in widths])
    self.to_images = nnx.List([Conv2D(w, image_channel, 7, padding=3, rngs=rngs) for w in widths])
    self.up_blocks = nnx.List(
      [UpBlock2d(widths[i] + image_channel, widths[i + 1], rngs=rngs) for i in range(num_down_blocks)]
    )

  def __call__(
    self, feature: jax.Array, deformation: jax.Array, occlusion_map: jax.Array | None = None
  ) -> dict[str, jax.Array | tuple[jax.Array, ...]]:
    out = self.fourth(self.third(volume_to_channels(deform_input(feature, deformation))))
    if occlusion_map is not None:
      if occlusion_map.shape[1:3] != out.shape[1:3]:
        occlusion_map = interpolate_linear(occlusion_map, out.shape[1:3])  # face-vid2vid: bilinear
      out = out * occlusion_map
    predictions = []
    for i, (resblock, to_image) in enumerate(zip(self.resblocks, self.to_images)):
      out = resblock(out)
      image = jax.nn.sigmoid(to_image(out))
      predictions.append(image)
      if i < len(self.up_blocks):
        out = self.up_blocks[i](jnp.concatenate([out, image], axis=-1))
    return dict(predictions=tuple(predictions), prediction=predictions[-1])
