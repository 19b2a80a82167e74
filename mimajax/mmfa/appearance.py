"""MMFA's appearance feature extractor (sec. 3.1, appendix A.1): the source image as a 3-D feature volume f_s.

face-vid2vid's OcclusionAwareGenerator encoder (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis
modules/generator.py): `first` (SameBlock2d, 7x7 or 3x3), `down_blocks` (DownBlock2d's), `second` (1x1 conv to
max_features channels), a reshape to reshape_channel x reshape_depth, `resblocks_3d` (ResBlock3d's). The attribute
names are the generator's, so a checkpoint's generator.first / down_blocks / second / resblocks_3d keys map by name
(torch's Sequential children 3dr0.. are list indices here).
"""

from __future__ import annotations

import jax
from flax import nnx

from mimajax.mmfa.blocks import Conv2D, DownBlock2d, ResBlock3d, SameBlock2d, channels_to_volume


class AppearanceFeatureExtractor(nnx.Module):
  """image (N, H, W, image_channel) -> f_s (N, reshape_depth, H / 2^num_down_blocks, W / 2^num_down_blocks,
  reshape_channel). Takes face-vid2vid's generator_params; estimate_occlusion_map (the dense motion's) is accepted
  so the section can be passed whole, and unused here. first_kernel_size: 7 in face-vid2vid's
  OcclusionAwareGenerator (its Beta checkpoint), 3 in its OcclusionAwareSPADEGenerator (the Vox-256-New release)."""

  def __init__(
    self,
    *,
    block_expansion: int,
    max_features: int,
    num_down_blocks: int,
    reshape_channel: int,
    reshape_depth: int,
    num_resblocks: int,
    image_channel: int = 3,
    first_kernel_size: int = 7,
    estimate_occlusion_map: bool | None = None,
    rngs: nnx.Rngs,
  ):
    del estimate_occlusion_map
    if max_features != reshape_channel * reshape_depth:
      raise ValueError(
        f"AppearanceFeatureExtractor: max_features={max_features} must be reshape_channel x reshape_depth "
        f"({reshape_channel} x {reshape_depth}), the channels `second` reshapes into the volume"
      )
    k = first_kernel_size
    self.first = SameBlock2d(image_channel, block_expansion, kernel_size=k, padding=k // 2, rngs=rngs)
    widths = [min(max_features, block_expansion * (2**i)) for i in range(num_down_blocks + 1)]
    self.down_blocks = nnx.List([DownBlock2d(widths[i], widths[i + 1], rngs=rngs) for i in range(num_down_blocks)])
    self.second = Conv2D(widths[-1], max_features, 1, rngs=rngs)
    self.resblocks_3d = nnx.List([ResBlock3d(reshape_channel, 3, 1, rngs=rngs) for _ in range(num_resblocks)])
    self.reshape_depth = reshape_depth

  def __call__(self, image: jax.Array) -> jax.Array:
    out = self.first(image)
    for block in self.down_blocks:
      out = block(out)
    # torch's view(bs, reshape_channel, reshape_depth, h, w) of `second`'s NCHW output (channel = c * D + d).
    volume = channels_to_volume(self.second(out), self.reshape_depth)
    for block in self.resblocks_3d:
      volume = block(volume)
    return volume
