"""The MMFA generator: the networks of Fig. 2 (a) and (c) assembled, and the motion of one face image (eq. 4-5).

  source I_s -> appearance feature volume f_s (face-vid2vid's extractor)
  any image I -> canonical keypoints x_c (face-vid2vid's detector), scale s and translation t (a simple decoder),
                 expression code f_exp (the expression encoder), R (a pretrained head pose: the dataset's stored pose
                 or Hopenet, outside this module)
  delta = Dec(f_exp of the image, x_c of the SOURCE)  (eq. 4: the deformation belongs to the face being animated)
  x = s (R x_c + delta) + t                           (eq. 5)
  dense motion (kp_driving, kp_source, f_s) -> deformation + occlusion -> multi-scale generator -> images

Parameter groups of training: this module is "generator" (everything above), the discriminator is its own group.
Attribute names are those of face-vid2vid where the part is face-vid2vid's (`face_vid2vid_format.py` maps its
released checkpoint onto them).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.mmfa import keypoints
from mimajax.mmfa.appearance import AppearanceFeatureExtractor
from mimajax.mmfa.dense_motion import DenseMotionNetwork
from mimajax.mmfa.discriminator import MultiScaleDiscriminator
from mimajax.mmfa.expression import ExpressionDecoder, ExpressionEncoder
from mimajax.mmfa.generator import MultiScaleGenerator
from mimajax.mmfa.keypoint_detector import CanonicalKeypointDetector, HeadEstimator


def _kw(section: Mapping[str, Any], *drop: str) -> dict:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(section).items() if k not in drop}


class MMFA(nnx.Module):
  """The generator group. `model` is config.model (face-vid2vid-named sections; see configs/mmfa.py)."""

  def __init__(self, model, *, rngs: nnx.Rngs):
    common = dict(num_kp=model.num_kp, image_channel=model.image_channel, feature_channel=model.feature_channel)
    gen = _kw(model.generator)
    self.num_kp = model.num_kp
    self.appearance = AppearanceFeatureExtractor(
      image_channel=model.image_channel, **_kw(gen, "estimate_occlusion_map"), rngs=rngs
    )
    self.kp_detector = CanonicalKeypointDetector(**common, **_kw(model.kp_detector), rngs=rngs)
    self.head_estimator = HeadEstimator(**common, **_kw(model.head_estimator), rngs=rngs)
    exp = _kw(model.expression)
    self.expression_encoder = ExpressionEncoder(
      image_channel=model.image_channel, block_expansion=exp["block_expansion"], num_blocks=exp["num_blocks"],
      exp_dim=exp["exp_dim"], rngs=rngs,
    )  # fmt: skip
    self.expression_decoder = ExpressionDecoder(
      exp_dim=exp["exp_dim"], num_kp=model.num_kp, hidden=tuple(exp["decoder_hidden"]), rngs=rngs
    )
    self.dense_motion = DenseMotionNetwork(
      num_kp=model.num_kp, feature_channel=gen["reshape_channel"],
      estimate_occlusion_map=gen["estimate_occlusion_map"], **_kw(model.dense_motion), rngs=rngs,
    )  # fmt: skip
    self.generator = MultiScaleGenerator(image_channel=model.image_channel, **_kw(gen, "first_kernel_size"), rngs=rngs)

  # -------------------------------------------------------------------------------------------- motion (eq. 4-5)
  def canonical(self, image: jax.Array) -> jax.Array:
    """x_c of a face image (N, H, W, 3) in [0, 1]."""
    return self.kp_detector(image)

  def motion(self, image: jax.Array, rotation: jax.Array, canonical: jax.Array) -> tuple[keypoints.Motion, jax.Array]:
    """The motion of `image` for the face with canonical keypoints `canonical` (the source's, eq. 4), and the
    image's expression code f_exp."""
    head = self.head_estimator(image)
    f_exp = self.expression_encoder(image)
    return self.motion_from_code(f_exp, head, rotation, canonical), f_exp

  def motion_from_code(self, f_exp: jax.Array, head: dict, rotation: jax.Array,
                       canonical: jax.Array) -> keypoints.Motion:  # fmt: skip
    """eq. 4: delta = Dec([f_exp; x_c]); with the head's s and t and the given R (editing swaps any of them)."""
    delta = self.expression_decoder(f_exp, canonical)
    return keypoints.Motion(rotation, delta, head["scale"], head["translation"])

  # -------------------------------------------------------------------------------------------- generation
  def features(self, source: jax.Array) -> jax.Array:
    """f_s: the source's 3-D appearance feature volume (N, D, H', W', C)."""
    return self.appearance(source)

  def generate(self, features: jax.Array, kp_source: jax.Array, kp_driving: jax.Array) -> dict:
    """Dense motion from the keypoints, warp f_s, decode at every scale (coarse -> fine)."""
    motion = self.dense_motion(features, kp_driving, kp_source)
    out = self.generator(features, motion["deformation"], motion.get("occlusion_map"))
    return {**out, **{k: v for k, v in motion.items() if k in ("deformation", "occlusion_map", "mask")}}

  def __call__(self, source: jax.Array, driver: jax.Array, source_rotation: jax.Array, driver_rotation: jax.Array,
               *, transformed: jax.Array | None = None, augmented: jax.Array | None = None) -> dict:  # fmt: skip
    """Same-identity reconstruction (training): the driver's motion applied to the source's canonical keypoints.

    transformed: the driver under the equivariance loss's random warp (eq. 15): its own canonical keypoints and
    motion (R: the driver's) come back as kp_transformed. augmented: the driver rotated / scaled / shifted for eq. 7:
    its code comes back as f_exp_augmented. Every image of a step goes through each network in one batch (one
    call, not one per image set: a third of the program to compile), so training-mode BatchNorm statistics are
    those of all the step's images together."""
    n = source.shape[0]
    posed = [source, driver] + ([transformed] if transformed is not None else [])
    coded = posed + ([augmented] if augmented is not None else [])
    canonical = self.kp_detector(jnp.concatenate(posed))
    head = self.head_estimator(jnp.concatenate(posed))
    f_exp = self.expression_encoder(jnp.concatenate(coded))
    part = lambda x, i: x[i * n : (i + 1) * n]
    x_c = part(canonical, 0)
    # eq. 4: the source's and the driver's deformations for the source's x_c; the transformed driver's for its own
    owners = [x_c, x_c] + ([part(canonical, 2)] if transformed is not None else [])
    rotations = [source_rotation, driver_rotation] + ([driver_rotation] if transformed is not None else [])
    motion = self.motion_from_code(f_exp[: len(posed) * n], head, jnp.concatenate(rotations), jnp.concatenate(owners))
    motions = [jax.tree.map(lambda x, i=i: part(x, i), motion) for i in range(len(posed))]
    kps = [keypoints.keypoints_from_motion(o, m) for o, m in zip(owners, motions)]
    out = self.generate(self.features(source), kps[0], kps[1])
    out = dict(out, canonical=x_c, driver_canonical=part(canonical, 1), source_motion=motions[0],
               driver_motion=motions[1], kp_source=kps[0], kp_driving=kps[1], f_exp_source=part(f_exp, 0),
               f_exp_driver=part(f_exp, 1))  # fmt: skip
    if transformed is not None:
      out["kp_transformed"] = kps[2]
    if augmented is not None:
      out["f_exp_augmented"] = part(f_exp, len(posed))
    return out


def build_discriminator(model, *, rngs: nnx.Rngs) -> MultiScaleDiscriminator:
  d = _kw(model.discriminator)
  return MultiScaleDiscriminator(num_channels=model.image_channel, **d, rngs=rngs)


def images(frames: jax.Array) -> jax.Array:
  """Loader frames (uint8 0..255, or float in [0, 1]) as the networks' float32 images in [0, 1]."""
  if jnp.issubdtype(frames.dtype, jnp.integer):
    return frames.astype(jnp.float32) / 255.0
  return frames.astype(jnp.float32)
