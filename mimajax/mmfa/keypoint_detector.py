"""MMFA's canonical keypoint detector and head estimator (sec. 3.1, eq. 5; appendix A.1): face-vid2vid's networks.

x = s (R x_c + delta) + t (eq. 5): x_c comes from CanonicalKeypointDetector (face-vid2vid's KPDetector without
jacobians), R / t / s from HeadEstimator (face-vid2vid's HEEstimator plus MMFA's scale head). Attribute names are
face-vid2vid's (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis modules/keypoint_detector.py),
so its checkpoint keys map one to one (torch Sequential children down0 / b1_0 / ... are list indices here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa.blocks import (
  AntiAliasInterpolation2d,
  BatchNorm,
  Conv2D,
  Conv3D,
  KPHourglass,
  Linear,
  ResBottleneck,
  make_coordinate_grid_3d,
)


def heatmap_to_keypoints(logits: jax.Array, temperature: float) -> jax.Array:
  """face-vid2vid's heatmap -> keypoint: softmax over the volume of logits / temperature, then the expectation of
  the coordinate grid. logits (N, D, H, W, K) -> (N, K, 3) of (x, y, z), inside [-1, 1] (a convex combination)."""
  n, d, h, w, k = logits.shape
  heat = jax.nn.softmax(logits.reshape(n, d * h * w, k) / temperature, axis=1)
  grid = make_coordinate_grid_3d((d, h, w)).reshape(d * h * w, 3)
  # HIGHEST: a TF32 product would move keypoints by ~1e-3 on GPUs.
  return jnp.einsum("npk,pc->nkc", heat, grid, precision=jax.lax.Precision.HIGHEST)


class CanonicalKeypointDetector(nnx.Module):
  """x_c of eq. 5: face-vid2vid's KPDetector with estimate_jacobian=False (MMFA uses no jacobians).

  image (N, H, W, image_channel) in [0, 1] -> x_c (N, num_kp, 3). The image is band-limited downsampled by
  scale_factor (`down`), `predictor` (KPHourglass) gives a (reshape_depth, H', W') volume, `kp` (3x3x3 conv) one
  heatmap per keypoint. feature_channel is accepted (face-vid2vid's common_params pass it) and unused, as there.
  """

  def __init__(
    self,
    *,
    block_expansion: int,
    num_kp: int,
    max_features: int,
    reshape_channel: int,
    reshape_depth: int,
    num_blocks: int,
    temperature: float,
    image_channel: int = 3,
    scale_factor: float = 1.0,
    feature_channel: int | None = None,
    estimate_jacobian: bool = False,
    rngs: nnx.Rngs,
  ):
    del feature_channel  # unused in face-vid2vid's KPDetector too
    if estimate_jacobian:
      raise ValueError("CanonicalKeypointDetector: MMFA's keypoints carry no jacobians (estimate_jacobian=False)")
    self.predictor = KPHourglass(
      block_expansion,
      in_features=image_channel,
      reshape_features=reshape_channel,
      reshape_depth=reshape_depth,
      num_blocks=num_blocks,
      max_features=max_features,
      rngs=rngs,
    )
    self.kp = Conv3D(self.predictor.out_filters, num_kp, 3, padding=1, rngs=rngs)
    self.temperature, self.scale_factor = temperature, scale_factor
    if scale_factor != 1:
      self.down = AntiAliasInterpolation2d(image_channel, scale_factor)

  def __call__(self, image: jax.Array) -> jax.Array:
    if self.scale_factor != 1:
      image = self.down(image)
    return heatmap_to_keypoints(self.kp(self.predictor(image)), self.temperature)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(kernel_size=3, stride=2, padding=1) on (N, H, W, C) (padding never wins: -inf)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class HeadEstimator(nnx.Module):
  """R, t and s of eq. 5: face-vid2vid's HEEstimator (a ResNet-50-like trunk of ResBottlenecks, 66-bin yaw / pitch /
  roll logits, translation) with MMFA's scale head.

  image (N, H, W, 3) -> dict(yaw, pitch, roll: (N, num_bins) logits, translation (N, 3), scale (N,)).
  - Trunk: face-vid2vid hard-codes the widths 256 / 512 / 1024 / 2048 and 3 / 3 / 5 / 2 stride-1 bottlenecks per
    stage; here the widths are min(max_features, 4 block_expansion 2^i) (exactly those at vox-256's 64 / 2048) and
    the counts `num_bottlenecks`, so tiny configs keep every name (ours; the same rule as the torch transcription
    in mimajax/mmfa/pytorch/face_vid2vid.py).
  - face-vid2vid's forward returns yaw = fc_roll(x) and roll = fc_yaw(x) (its layer names are swapped against its
    outputs, and its released weights are trained that way): kept, so that a checkpoint's fc_roll / fc_yaw map by
    name and still give its yaw / roll.
  - fc_scale (ours, for MMFA's s): s = exp(fc_scale(x)) > 0, zero-initialised so that s = 1 at the start.
  - face-vid2vid's fc_exp (3 K expression offsets) is left out: MMFA's expression deformation comes from its
    expression encoder-decoder (mimajax/mmfa/expression.py). A checkpoint's fc_exp.* keys are unused.
  num_kp / feature_channel / estimate_jacobian are accepted (face-vid2vid's common_params) and unused.
  """

  def __init__(
    self,
    *,
    block_expansion: int,
    max_features: int = 2048,
    num_bins: int = 66,
    image_channel: int = 3,
    num_bottlenecks: tuple[int, int, int, int] = (3, 3, 5, 2),
    num_kp: int | None = None,
    feature_channel: int | None = None,
    estimate_jacobian: bool | None = None,
    rngs: nnx.Rngs,
  ):
    del num_kp, feature_channel, estimate_jacobian
    w = [min(max_features, 4 * block_expansion * 2**i) for i in range(4)]
    if any(width % 4 for width in w):
      raise ValueError(f"HeadEstimator: trunk widths {w} must be multiples of 4 (the bottlenecks' width / 4)")
    self.conv1 = Conv2D(image_channel, block_expansion, 7, padding=3, stride=2, rngs=rngs)
    self.norm1 = BatchNorm(block_expansion)
    self.conv2 = Conv2D(block_expansion, w[0], 1, rngs=rngs)
    self.norm2 = BatchNorm(w[0])
    self.block1 = nnx.List([ResBottleneck(w[0], 1, rngs=rngs) for _ in range(num_bottlenecks[0])])
    self.conv3 = Conv2D(w[0], w[1], 1, rngs=rngs)
    self.norm3 = BatchNorm(w[1])
    self.block2 = ResBottleneck(w[1], 2, rngs=rngs)
    self.block3 = nnx.List([ResBottleneck(w[1], 1, rngs=rngs) for _ in range(num_bottlenecks[1])])
    self.conv4 = Conv2D(w[1], w[2], 1, rngs=rngs)
    self.norm4 = BatchNorm(w[2])
    self.block4 = ResBottleneck(w[2], 2, rngs=rngs)
    self.block5 = nnx.List([ResBottleneck(w[2], 1, rngs=rngs) for _ in range(num_bottlenecks[2])])
    self.conv5 = Conv2D(w[2], w[3], 1, rngs=rngs)
    self.norm5 = BatchNorm(w[3])
    self.block6 = ResBottleneck(w[3], 2, rngs=rngs)
    self.block7 = nnx.List([ResBottleneck(w[3], 1, rngs=rngs) for _ in range(num_bottlenecks[3])])
    self.fc_roll = Linear(w[3], num_bins, rngs=rngs)
    self.fc_pitch = Linear(w[3], num_bins, rngs=rngs)
    self.fc_yaw = Linear(w[3], num_bins, rngs=rngs)
    self.fc_t = Linear(w[3], 3, rngs=rngs)
    self.fc_scale = Linear(w[3], 1, zero_init=True, rngs=rngs)

  def __call__(self, image: jax.Array) -> dict[str, jax.Array]:
    out = _max_pool_3x3_s2(jax.nn.relu(self.norm1(self.conv1(image))))
    out = jax.nn.relu(self.norm2(self.conv2(out)))
    for block in self.block1:
      out = block(out)
    out = self.block2(jax.nn.relu(self.norm3(self.conv3(out))))
    for block in self.block3:
      out = block(out)
    out = self.block4(jax.nn.relu(self.norm4(self.conv4(out))))
    for block in self.block5:
      out = block(out)
    out = self.block6(jax.nn.relu(self.norm5(self.conv5(out))))
    for block in self.block7:
      out = block(out)
    out = out.mean(axis=(1, 2))  # adaptive_avg_pool2d(1)
    return dict(
      yaw=self.fc_roll(out),  # sic: face-vid2vid's naming (see the class docstring)
      pitch=self.fc_pitch(out),
      roll=self.fc_yaw(out),
      translation=self.fc_t(out),
      scale=jnp.exp(self.fc_scale(out)[:, 0]),
    )
