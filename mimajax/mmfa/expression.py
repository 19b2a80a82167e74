"""MMFA's expression encoder-decoder (sec. 3.2, eq. 4; appendix A.1): image -> f_exp (N, d); (f_exp, x_c) -> delta.

The paper describes the architecture in words only, without sizes:
  encoder  "a convolutional layer with ReLU activation and a maxpooling layer", then "ResBottleneck blocks (Kim et
           al. 2018) to downsize the image features and obtain a feature map", then "an additional linear layer to map
           the reshaped feature map to a d-dimensional expression feature".
  decoder  f_exp concatenated with the canonical keypoints x_c ("which provides the spatial information"), "several
           fully connected layers with BatchNorm and ReLU", and a last fully connected layer without activation
           ("the expression deformation can be negative").
Our reading, sized after face-vid2vid's HEEstimator (whose ResBottleneck this is, mimajax.mmfa.blocks): the stem is
a 7x7 stride-2 conv + ReLU + torch's MaxPool2d(3, 2, 1); then `num_blocks` stages, each a 1x1 conv to the stage's
width min(max_features, block_expansion * 2^(i + 2)) with BatchNorm + ReLU (HEEstimator's conv2..conv5 / norm2..norm5)
and a stride-2 ResBottleneck (the downsizing); then the feature map is averaged over space (default; any input size)
or, with `image_size` given, flattened (the paper's "reshaped"); a linear layer gives f_exp. With block_expansion 64
and 4 blocks the widths are HEEstimator's 256, 512, 1024, 2048.

The decoder's last layer starts at zero (our choice), so delta = 0 at initialisation: the untrained keypoints are
the rigidly moved canonical ones, as in eq. 5 without expression. BatchNorm is blocks.BatchNorm (torch semantics:
batch statistics in training, running averages after `module.eval()`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.face3d.d3dfr import max_pool_3x3_s2
from mimajax.mmfa.blocks import BatchNorm, Conv2D, Linear, ResBottleneck


class ExpressionEncoder(nnx.Module):
  """Image (N, H, W, C) in [0, 1] -> expression code f_exp (N, exp_dim). The spatial side shrinks 4x in the stem and
  2x per block: H must be a multiple of 2^(2 + num_blocks) when `image_size` (flattening) is used."""

  def __init__(self, *, image_channel: int = 3, block_expansion: int = 64, num_blocks: int = 4, exp_dim: int = 128,
               max_features: int = 2048, image_size: int | None = None, rngs: nnx.Rngs):  # fmt: skip
    if num_blocks < 1:
      raise ValueError(f"ExpressionEncoder needs at least one ResBottleneck block, got num_blocks={num_blocks}")
    self.conv1 = Conv2D(image_channel, block_expansion, 7, stride=2, padding=3, rngs=rngs)
    widths = [min(max_features, block_expansion * 2 ** (i + 2)) for i in range(num_blocks)]
    if any(w % 4 for w in widths):
      raise ValueError(f"ResBottleneck widths must be multiples of 4, got {widths}")
    cins = [block_expansion] + widths[:-1]
    self.channel_convs = nnx.List([Conv2D(a, b, 1, rngs=rngs) for a, b in zip(cins, widths)])
    self.channel_norms = nnx.List([BatchNorm(w) for w in widths])
    self.blocks = nnx.List([ResBottleneck(w, stride=2, rngs=rngs) for w in widths])
    self.image_size = image_size
    if image_size is None:
      features = widths[-1]
    else:
      side = image_size // 2 ** (2 + num_blocks)
      if side < 1 or image_size % 2 ** (2 + num_blocks):
        raise ValueError(f"image_size {image_size} is not a multiple of 2^(2 + num_blocks) = {2 ** (2 + num_blocks)}")
      features = widths[-1] * side * side
    self.fc = Linear(features, exp_dim, rngs=rngs)

  def __call__(self, image: jax.Array) -> jax.Array:
    x = max_pool_3x3_s2(jax.nn.relu(self.conv1(image)))
    for conv, norm, block in zip(self.channel_convs, self.channel_norms, self.blocks):
      x = block(jax.nn.relu(norm(conv(x))))
    if self.image_size is None:
      x = x.mean(axis=(1, 2))
    else:
      if image.shape[1] != self.image_size or image.shape[2] != self.image_size:
        raise ValueError(f"ExpressionEncoder built for {self.image_size} px images, got {image.shape[1:3]}")
      # torch's view(N, -1) flattens (C, H, W); keep that order so a torch transcription's fc weights map directly
      x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return self.fc(x)


class ExpressionDecoder(nnx.Module):
  """Eq. 4's decoder: (f_exp (N, exp_dim), x_c (N, K, 3)) -> delta (N, K, 3). Hidden widths `hidden` (ours)."""

  def __init__(self, *, exp_dim: int, num_kp: int, hidden: Sequence[int] = (256, 256), rngs: nnx.Rngs):
    self.num_kp = num_kp
    sizes = [exp_dim + 3 * num_kp, *tuple(hidden)]
    self.layers = nnx.List([Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.norms = nnx.List([BatchNorm(b) for b in sizes[1:]])
    self.out = Linear(sizes[-1], 3 * num_kp, rngs=rngs, zero_init=True)  # delta = 0 at start (our choice)

  def __call__(self, f_exp: jax.Array, x_c: jax.Array) -> jax.Array:
    if x_c.shape[1:] != (self.num_kp, 3):
      raise ValueError(f"ExpressionDecoder: canonical keypoints must be (N, {self.num_kp}, 3), got {x_c.shape}")
    x = jnp.concatenate([f_exp, x_c.reshape(x_c.shape[0], -1)], axis=-1)
    for layer, norm in zip(self.layers, self.norms):
      x = jax.nn.relu(norm(layer(x)))
    return self.out(x).reshape(-1, self.num_kp, 3)
