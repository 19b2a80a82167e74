"""MMFA's training losses (eq. 6-9, 14, 15; appendix A.2), each a named pure function of arrays.

The paper's equations are missing from its text; each docstring says how it is reconstructed (the prose and
face-vid2vid's train code, zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis modules/model.py).
Functions return the UNWEIGHTED loss except where face-vid2vid weights inside the loss (per VGG layer, per
discriminator feature map: `layer_weights`, defaults face-vid2vid's 10s). The scalar weights of eq. 14 live in the
config (configs/mmfa.py loss_config, with their sources): face-vid2vid's vox-256 values where the loss is
face-vid2vid's (GAN 1, equivariance 10, keypoint prior 10, deformation prior 5), ours for MMFA's own (eq. 7-9).

Perceptual design (eq. 6 with face-vid2vid's pyramid): the generator's outputs I_1..I_n (coarse -> fine) are each
compared with the ground truth resized to that output's resolution (face-vid2vid's band-limited
AntiAliasInterpolation2d); each pair then goes through face-vid2vid's image pyramid (scales 1, 0.5, 0.25, 0.125 of
that output), and each pyramid level through the frozen VGG (perceptual.py), summing w_l * mean |phi_l(x) - phi_l(y)|
over the five layers. The two pyramids compose so that no image is compared below the finest output's coarsest
level: for an output at fraction f of the finest resolution, the levels s with f * s < min(scales) are skipped
(with a 256-px finest output: 64 px output -> 64, 32; 128 -> 128, 64, 32; 256 -> 256, 128, 64, 32). Beyond the
paper's "a down-sampling pyramid for the output and the ground truth", this keeps every compared image at least
as large as face-vid2vid's smallest (32 px at 256), which the VGG's four max pools need. The ground truth's
features carry no gradient (face-vid2vid's y_vgg.detach()).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mimajax.mmfa.blocks import AntiAliasInterpolation2d
from mimajax.mmfa.keypoints import project_to_2d

PYRAMID_SCALES = (1.0, 0.5, 0.25, 0.125)  # face-vid2vid vox-256 train_params.scales
PERCEPTUAL_LAYER_WEIGHTS = (10.0,) * 5  # face-vid2vid loss_weights.perceptual
FEATURE_MATCHING_LAYER_WEIGHTS = (10.0,) * 4  # face-vid2vid loss_weights.feature_matching
KEYPOINT_DISTANCE_THRESHOLD = 0.1  # face-vid2vid: "set Dt = 0.1" (squared distance)
KEYPOINT_DEPTH_TARGET = 0.33  # face-vid2vid: "set Zt = 0.33"

Features = Callable[[jax.Array], Sequence[jax.Array]]


def downsample(image: jax.Array, scale: float) -> jax.Array:
  """face-vid2vid's band-limited downsampling (blocks.AntiAliasInterpolation2d) of (N, H, W, C) by `scale` <= 1."""
  return AntiAliasInterpolation2d(image.shape[-1], scale)(image)


def perceptual_loss(features: Features, prediction: jax.Array, target: jax.Array, *,
                    layer_weights: Sequence[float] = PERCEPTUAL_LAYER_WEIGHTS) -> jax.Array:  # fmt: skip
  """sum_l w_l mean |phi_l(prediction) - phi_l(target)| (face-vid2vid's per-scale term); target features detached.
  Both images go through one `features` call."""
  n = prediction.shape[0]
  feats = features(jnp.concatenate([prediction, jax.lax.stop_gradient(target)], axis=0))
  if len(feats) != len(layer_weights):
    raise ValueError(f"{len(feats)} feature maps but {len(layer_weights)} layer weights")
  total = jnp.zeros((), jnp.float32)
  for f, w in zip(feats, layer_weights):
    if w:
      total = total + w * jnp.mean(jnp.abs(f[:n] - jax.lax.stop_gradient(f[n:])))
  return total


def pyramid_perceptual_loss(features: Features, prediction: jax.Array, target: jax.Array, *,
                            scales: Sequence[float] = PYRAMID_SCALES,
                            layer_weights: Sequence[float] = PERCEPTUAL_LAYER_WEIGHTS) -> jax.Array:  # fmt: skip
  """face-vid2vid's pyramid perceptual loss: perceptual_loss summed over the image pyramid's scales."""
  total = jnp.zeros((), jnp.float32)
  for s in scales:
    total = total + perceptual_loss(features, downsample(prediction, s), downsample(target, s),
                                    layer_weights=layer_weights)  # fmt: skip
  return total


def multiscale_perceptual_loss(features: Features, predictions: Sequence[jax.Array], target: jax.Array, *,
                               scales: Sequence[float] = PYRAMID_SCALES,
                               layer_weights: Sequence[float] = PERCEPTUAL_LAYER_WEIGHTS) -> jax.Array:  # fmt: skip
  """Eq. 6: sum over the generator's outputs (any order; each (N, h, h, 3), h = H / 2^j) of the pyramid perceptual
  loss against the ground truth (N, H, W, 3) resized to h, skipping the levels below min(scales) of the finest
  output (see the module docstring)."""
  if isinstance(predictions, jax.Array):
    predictions = [predictions]
  finest = max(p.shape[1] for p in predictions)
  lowest = min(scales)
  total = jnp.zeros((), jnp.float32)
  for prediction in predictions:
    h = prediction.shape[1]
    if target.shape[1] % h or target.shape[2] % prediction.shape[2]:
      raise ValueError(f"output {prediction.shape[1:3]} is not the ground truth {target.shape[1:3]} over an integer")
    fraction = h / finest
    gt = downsample(target, h / target.shape[1])
    kept = [s for s in scales if fraction * s >= lowest - 1e-9]
    total = total + pyramid_perceptual_loss(features, prediction, gt, scales=kept, layer_weights=layer_weights)
  return total


# ----------------------------------------------------------------------------------------------------------- GAN


def _maps(outputs: Mapping[str, jax.Array] | Sequence[jax.Array], prefix: str = "prediction_map_") -> list:
  """The discriminator's prediction maps: a MultiScaleDiscriminator dict's `prediction_map_<scale>` entries in
  sorted key order, or a plain sequence of arrays."""
  if isinstance(outputs, Mapping):
    return [outputs[k] for k in sorted(outputs) if k.startswith(prefix)]
  return list(outputs)


def lsgan_generator_loss(fake: Mapping[str, jax.Array] | Sequence[jax.Array]) -> jax.Array:
  """Appendix A.2's least-squares GAN (Mao et al. 2017), generator side, as face-vid2vid's gan_mode 'ls':
  sum over discriminator scales of mean (1 - D(G))^2."""
  return sum((jnp.mean(jnp.square(1.0 - m)) for m in _maps(fake)), jnp.zeros((), jnp.float32))


def lsgan_discriminator_loss(real: Mapping[str, jax.Array] | Sequence[jax.Array],
                             fake: Mapping[str, jax.Array] | Sequence[jax.Array]) -> jax.Array:  # fmt: skip
  """The discriminator's side (face-vid2vid 'ls'): sum over scales of mean ((1 - D(real))^2 + D(fake)^2). Score the
  generated images detached so that this loss does not reach the generator."""
  return sum((jnp.mean(jnp.square(1.0 - r) + jnp.square(f)) for r, f in zip(_maps(real), _maps(fake))),
             jnp.zeros((), jnp.float32))  # fmt: skip


def feature_matching_loss(real: Mapping[str, Sequence[jax.Array]] | Sequence[Sequence[jax.Array]],
                          fake: Mapping[str, Sequence[jax.Array]] | Sequence[Sequence[jax.Array]], *,
                          layer_weights: Sequence[float] = FEATURE_MATCHING_LAYER_WEIGHTS) -> jax.Array:  # fmt: skip
  """Feature matching (Wang et al. 2018; appendix A.2), face-vid2vid's: sum over scales and discriminator feature
  maps of w_i mean |D_i(real) - D_i(fake)|. Inputs: discriminator dicts (`feature_maps_<scale>` lists) or, per
  scale, lists of maps. The real side is detached (it carries no generator gradient either way)."""
  real_scales, fake_scales = _maps(real, "feature_maps_"), _maps(fake, "feature_maps_")
  total = jnp.zeros((), jnp.float32)
  for real_maps, fake_maps in zip(real_scales, fake_scales):
    for w, a, b in zip(layer_weights, real_maps, fake_maps):
      if w:
        total = total + w * jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b))
  return total


# ----------------------------------------------------------------------------------------------------- keypoints


def equivariance_loss(kp_driving: jax.Array, kp_transformed: jax.Array, transform) -> jax.Array:
  """Eq. 15 (FOMM's equivariance, face-vid2vid's equivariance_value): keypoints projected to 2-D (the paper: "we
  project the 3D keypoints to 2D"), mean |kp_d - T(kp_t)|_1 where kp_t are the keypoints estimated on
  transform.transform_frame(driving) and T = transform.warp_coordinates (transforms.py: the map from the transformed
  frame back to the original, the paper's T^-1). kp_* (N, K, 3) or (N, K, 2)."""
  return jnp.mean(jnp.abs(project_to_2d(kp_driving) - transform.warp_coordinates(project_to_2d(kp_transformed))))


def keypoint_prior_loss(kp: jax.Array, *, distance_threshold: float = KEYPOINT_DISTANCE_THRESHOLD,
                        depth_target: float = KEYPOINT_DEPTH_TARGET) -> jax.Array:  # fmt: skip
  """face-vid2vid's keypoint prior (appendix A.2 "the same setting of threshold as in Wang et al."), on the driving
  keypoints (N, K, 3):
    sum over ordered pairs (i, j) of mean_n max(0, Dt - |kp_i - kp_j|^2)  +  mean_n |mean_k z_k - Zt|
  with Dt = 0.1, Zt = 0.33. As in face-vid2vid the pairs include i = j, which add the constant K * Dt (no gradient;
  kept so the value reads as face-vid2vid's); torch's pairwise_distance eps (1e-6) is left out."""
  diff = kp[:, :, None, :] - kp[:, None, :, :]
  hinge = jnp.maximum(distance_threshold - jnp.sum(jnp.square(diff), axis=-1), 0.0)  # (N, K, K)
  pairs = jnp.sum(jnp.mean(hinge, axis=0))
  depth = jnp.mean(jnp.abs(jnp.mean(kp[:, :, 2], axis=-1) - depth_target))
  return pairs + depth


def deformation_prior_loss(delta: jax.Array) -> jax.Array:
  """Appendix A.2's deformation prior, face-vid2vid's expression loss: the L1 norm of each image's deformation
  (N, K, 3) (torch.norm(exp, p=1, dim=-1) over its K * 3 values), averaged over the batch."""
  return jnp.mean(jnp.sum(jnp.abs(delta.reshape(delta.shape[0], -1)), axis=-1))


def expression_representation_loss(f_exp: jax.Array, f_exp_augmented: jax.Array, *,
                                   stop_gradient_augmented: bool = False, eps: float = 1e-8) -> jax.Array:  # fmt: skip
  """Eq. 7, the self-supervised representation loss: mean over the batch of 1 - cos(f_exp(I_d), f_exp(I_d')), I_d'
  the driver under a random rotation, scaling and translation (the expression is unchanged). Cosine as torch's
  cosine_similarity (each norm clamped at eps). Gradients flow through both codes by default (the paper's formula
  has no stop-gradient; collapse is prevented by the reconstruction losses, which need f_exp to carry the
  expression); stop_gradient_augmented=True treats the augmented code as a fixed target (SimSiam-style)."""
  if stop_gradient_augmented:
    f_exp_augmented = jax.lax.stop_gradient(f_exp_augmented)
  na = jnp.maximum(jnp.linalg.norm(f_exp, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(f_exp_augmented, axis=-1), eps)
  cosine = jnp.sum(f_exp * f_exp_augmented, axis=-1) / (na * nb)
  return jnp.mean(1.0 - cosine)


def identity_latent_consistency_loss(x_c_source: jax.Array, x_c_driving: jax.Array) -> jax.Array:
  """Eq. 8: the distance between the canonical keypoints (N, K, 3) of the source and of the driver (the same
  identity), in the canonical space. The paper's norm is lost; ours is the mean absolute difference (L1 mean, the
  norm of face-vid2vid's keypoint losses), symmetric (gradients into both)."""
  return jnp.mean(jnp.abs(x_c_source - x_c_driving))


# -------------------------------------------------------------------------------------------------- landmarks

# MediaPipe FaceMesh's topology (mediapipe.python.solutions.face_mesh_connections: the vertices of FACEMESH_LEFT_EYE,
# FACEMESH_RIGHT_EYE, FACEMESH_LIPS; irises 468..477 exist only with refine_landmarks, 478 points).
FACEMESH_RIGHT_EYE = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
FACEMESH_LEFT_EYE = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
FACEMESH_IRISES = tuple(range(468, 478))  # right iris centre 468 + 469..472, left centre 473 + 474..477
FACEMESH_LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267,
                 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)  # fmt: skip
# eq. 9's part weights (lost from the paper): ours, the expression-carrying parts (eyes with pupils, lips) counted
# twice the rest (contour, brows, nose, cheeks).
LANDMARK_PART_WEIGHTS = dict(eyes=2.0, lips=2.0, rest=1.0)


def facemesh_part_groups(num_landmarks: int = 478) -> dict[str, tuple[int, ...]]:
  """eq. 9's face parts as FaceMesh indices: eyes (both eye contours, plus the irises / pupils when the mesh has
  478 points), lips, and the rest (every other point)."""
  if num_landmarks not in (468, 478):
    raise ValueError(f"FaceMesh has 468 or 478 (refined, with irises) landmarks, got {num_landmarks}")
  eyes = FACEMESH_RIGHT_EYE + FACEMESH_LEFT_EYE + (FACEMESH_IRISES if num_landmarks == 478 else ())
  used = set(eyes) | set(FACEMESH_LIPS)
  return dict(eyes=eyes, lips=FACEMESH_LIPS, rest=tuple(i for i in range(num_landmarks) if i not in used))


def landmark_loss(generated: jax.Array, driving: jax.Array, *, groups: Mapping[str, Sequence[int]] | None = None,
                  weights: Mapping[str, float] = LANDMARK_PART_WEIGHTS) -> jax.Array:  # fmt: skip
  """Eq. 9, the 2-D landmark loss: sum over face parts g of lambda_g mean_{n, i in g} |l_i(generated) - l_i(driving)|_1
  for landmarks (N, P, 2) of the generated and driving images (from a differentiable landmark network; the paper's
  has 145 points with pupils, ours are FaceMesh's, `facemesh_part_groups(P)` by default). Use coordinates in the
  normalised [-1, 1] image frame, so the weights do not depend on the resolution. The driver's landmarks are the
  target (no gradient). L1 rather than the Euclidean norm: its gradient is defined at zero."""
  groups = facemesh_part_groups(generated.shape[1]) if groups is None else groups
  driving = jax.lax.stop_gradient(driving)
  total = jnp.zeros((), jnp.float32)
  for name, index in groups.items():
    w = weights.get(name, 0.0)
    if w and len(index):
      idx = jnp.asarray(index, jnp.int32)
      total = total + w * jnp.mean(jnp.abs(generated[:, idx, :2] - driving[:, idx, :2]))
  return total
