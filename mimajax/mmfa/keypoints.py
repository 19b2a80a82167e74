"""MMFA's keypoint decomposition (sec. 3.2, eq. 5): x = s (R x_c + delta) + t under a scaled orthographic projection.

The paper's equations are missing from its text; eq. 5 is reconstructed from the prose ("canonical keypoints x_c,
rotation R, translation t, scale s and expression deformations delta", "referring to the face description of 3DDFA")
and from face-vid2vid's eq. 3, x = R x_c + t + delta, to which MMFA adds the scale of the face (the paper's fix for
face-size changes that face-vid2vid forced into delta). The scale multiplies the rotated, deformed shape, as in
3DDFA's s R S + t; the translation is not scaled.

The paper's three assumptions (sec. 3.2), which make this decomposition valid:
  1. The centroid of the object lies at the origin of the world coordinate frame, which coincides with the camera
     coordinate frame (so R and t can act directly on x_c, with no camera extrinsics).
  2. The mapping from the camera frame to the image frame is an orthographic projection (the perspective effect of
     the face's distance is absorbed by s; a keypoint's image position is its (x, y), independent of its depth).
  3. The object is rigid: scale and rotation change no topological relation between face regions (the non-rigid
     part is delta alone).

Coordinates (the MMFA interface, face-vid2vid's normalised frame): keypoints (N, K, 3) ordered (x, y, z) with
x along the image width (right), y along the image height (down, image rows), z the depth (away from the camera;
x, y, z is right-handed), each in [-1, 1] where they fall inside the feature volume. Rotations act on column vectors:
x' = R x (face-vid2vid's `einsum('bmp,bkp->bkm', R, kp)`).

Rotation sources:
  rotation_from_degrees  face-vid2vid's get_rotation_matrix (modules/model.py) from its head-pose estimator's or
                         Hopenet's yaw, pitch, roll in degrees; R = Rx(pitch) Ry(yaw) Rz(roll), degrees converted
                         with face-vid2vid's pi = 3.14 (so its checkpoints' keypoints are reproduced).
  rotation_from_deep3d   the Deep3DFaceRecon-style angles the dataset stores per frame (mimajax.faces.motion_fit:
                         x = pitch, y = yaw, z = roll in radians, R_w = Rz Ry Rx acting on column vectors in the world
                         frame x right, y up, z toward the camera). The keypoint frame flips y and z, p_k = F p_w with
                         F = diag(1, -1, -1) (a proper rotation, so handedness is kept), hence R_k = F R_w F
                         = Rz(-z) Ry(-y) Rx(x): the image position of a rotated point is the same in both frames
                         (tests/test_mmfa_keypoints.py projects a point set through both and through the camera).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimajax.face3d.morphable_model import compute_rotation

HIGHEST = jax.lax.Precision.HIGHEST
FACE_VID2VID_PI = 3.14  # face-vid2vid's get_rotation_matrix converts degrees with 3.14, not math.pi
NUM_BINS = 66  # Hopenet's and face-vid2vid's head-pose bins: 3 degrees wide from -99 to +99
BIN_WIDTH = 3.0
BIN_START = -99.0
WORLD_TO_KEYPOINT = (1.0, -1.0, -1.0)  # F = diag(1, -1, -1): world (x right, y up, z to camera) -> keypoint frame


class Motion(NamedTuple):
  """The per-image motion parameters of eq. 5 (a pytree, so it passes through jit)."""

  rotation: jax.Array  # (N, 3, 3), keypoint frame, acting on column vectors
  delta: jax.Array  # (N, K, 3) expression deformation
  scale: jax.Array  # (N,) > 0
  translation: jax.Array  # (N, 3)


def transform_keypoints(x_c: jax.Array, rotation: jax.Array, delta: jax.Array, scale: jax.Array,
                        translation: jax.Array) -> jax.Array:  # fmt: skip
  """Eq. 5: x = s (R x_c + delta) + t. x_c, delta (N, K, 3); rotation (N, 3, 3); scale (N,); translation (N, 3)."""
  rotated = jnp.einsum("nij,nkj->nki", rotation, x_c, precision=HIGHEST)
  return scale[:, None, None] * (rotated + delta) + translation[:, None, :]


def keypoints_from_motion(x_c: jax.Array, motion: Motion) -> jax.Array:
  """Eq. 5 with the parameters in a Motion."""
  return transform_keypoints(x_c, motion.rotation, motion.delta, motion.scale, motion.translation)


def project_to_2d(x: jax.Array) -> jax.Array:
  """Orthographic projection (assumption 2): (..., 3) -> (..., 2) image-plane (x, y), the depth dropped."""
  return x[..., :2]


def _stack_matrix(rows) -> jax.Array:
  return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def rotation_from_degrees(yaw: jax.Array, pitch: jax.Array, roll: jax.Array, *,
                          pi: float = FACE_VID2VID_PI) -> jax.Array:  # fmt: skip
  """face-vid2vid's get_rotation_matrix: (N,) degrees each -> (N, 3, 3) R = Rx(pitch) Ry(yaw) Rz(roll).

  Pitch turns about x (the image's horizontal axis), yaw about y (its vertical axis), roll about z (the view axis);
  pi defaults to face-vid2vid's 3.14 so the released face-vid2vid checkpoints give their own keypoints."""
  p, y, r = (jnp.asarray(a, jnp.float32) / 180.0 * pi for a in (pitch, yaw, roll))
  one, zero = jnp.ones_like(p), jnp.zeros_like(p)
  pitch_mat = _stack_matrix([(one, zero, zero), (zero, jnp.cos(p), -jnp.sin(p)), (zero, jnp.sin(p), jnp.cos(p))])
  yaw_mat = _stack_matrix([(jnp.cos(y), zero, jnp.sin(y)), (zero, one, zero), (-jnp.sin(y), zero, jnp.cos(y))])
  roll_mat = _stack_matrix([(jnp.cos(r), -jnp.sin(r), zero), (jnp.sin(r), jnp.cos(r), zero), (zero, zero, one)])
  return jnp.einsum("nij,njk,nkm->nim", pitch_mat, yaw_mat, roll_mat, precision=HIGHEST)


def headpose_from_bins(logits: jax.Array) -> jax.Array:
  """(N, 66) bin logits -> (N,) degrees: the softmax expectation of the bin index times 3, minus 99.

  Hopenet's test code and face-vid2vid's headpose_pred_to_degree read the bins this way (bin i -> -99 + 3 i, its
  lower edge), and both networks were trained against it, so it is kept rather than centred on the bins."""
  probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  index = jnp.arange(logits.shape[-1], dtype=jnp.float32)
  return jnp.sum(probabilities * index, axis=-1) * BIN_WIDTH + BIN_START


def rotation_from_deep3d(angles: jax.Array) -> jax.Array:
  """The dataset's stored angles (N, 3) radians, (x = pitch, y = yaw, z = roll), R_w = Rz Ry Rx in the world frame
  (x right, y up, z toward the camera) -> R_k = F R_w F (N, 3, 3) in the keypoint frame, F = diag(1, -1, -1).

  R_w is taken from mimajax.face3d.morphable_model.compute_rotation (which returns its transpose, the row-vector
  matrix), so this stays the dataset's definition."""
  world = jnp.swapaxes(compute_rotation(jnp.asarray(angles, jnp.float32)), -1, -2)
  f = jnp.asarray(WORLD_TO_KEYPOINT, jnp.float32)
  return f[:, None] * world * f[None, :]


def relative_motion(source: Motion, driving: Motion, driving_first: Motion) -> Motion:
  """Relative animation: the driver's change since its first frame applied to the source's own parameters.

  face-vid2vid's demo (normalize_kp with use_relative_movement) adds kp_d - kp_d0 to kp_s in keypoint space; with
  MMFA's decomposed parameters the same idea acts per parameter, as LivePortrait's relative mode does:
    R = R_d R_d0^-1 R_s,  delta = delta_s + (delta_d - delta_d0),  s = s_s s_d / s_d0,  t = t_s + (t_d - t_d0).
  R_d0^-1 = R_d0^T (rotations). All three Motions must have the same batch size (broadcast a single first frame
  yourself). LivePortrait zeroes t's depth; here it is kept: under the orthographic projection (assumption 2) it only
  shifts the keypoints along the depth axis of the feature volume."""
  rotation = jnp.einsum(
    "nij,nkj,nkl->nil", driving.rotation, driving_first.rotation, source.rotation, precision=HIGHEST
  )  # R_d R_d0^T R_s
  return Motion(
    rotation=rotation,
    delta=source.delta + (driving.delta - driving_first.delta),
    scale=source.scale * driving.scale / driving_first.scale,
    translation=source.translation + (driving.translation - driving_first.translation),
  )
