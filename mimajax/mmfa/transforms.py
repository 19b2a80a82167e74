"""The random geometric transform of the equivariance loss (appendix A.2, eq. 15): face-vid2vid's / FOMM's `Transform`.

zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis modules/model.py `Transform`, in pure JAX:
  affine  theta = I_{2x3} + N(0, sigma_affine^2) per image                  (sigma_affine 0.05)
  TPS     control points on a points_tps x points_tps grid of [-1, 1]^2, weights w ~ N(0, sigma_tps^2) per image
          and point; a coordinate p moves by sum_j w_j d_j^2 log(d_j + 1e-6) with d_j = |p - c_j|_1 (the L1
          distance, as face-vid2vid and FOMM compute it)                     (sigma_tps 0.005, points_tps 5)
  warp_coordinates(p) = theta [p; 1] + TPS(p), coordinates (x, y) in [-1, 1].
  transform_frame(I)(q) = I(warp_coordinates(q)): the transformed image samples the original at the warped grid
          (F.grid_sample with padding_mode="reflection", align_corners=False, over make_coordinate_grid_2d's grid).
So a point seen at q in the transformed frame is at warp_coordinates(q) in the original: the equivariance loss
compares kp_driving with warp_coordinates(kp_transformed) (the paper's T^-1 of eq. 15 is this coordinate warp).
sigma_tps = 0 (or points_tps = 0) leaves the affine part alone, as face-vid2vid's Transform without TPS.
`RandomTransform.similarity` draws the rotation + scaling + translation that eq. 7's self-supervised
representation loss applies to the driver (sec. 3.2); it warps images the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimajax.mmfa.blocks import grid_sample_2d, make_coordinate_grid_2d

SIGMA_AFFINE = 0.05  # face-vid2vid config/vox-256.yaml transform_params
SIGMA_TPS = 0.005
POINTS_TPS = 5
TPS_EPS = 1e-6
# eq. 7's augmentation ranges (the paper gives none): ours
MAX_ROTATION = 15.0  # degrees
SCALE_RANGE = (0.9, 1.1)
MAX_TRANSLATION = 0.1  # normalised units, 5 % of the image side


class RandomTransform(NamedTuple):
  """One random transform per image of a batch (a pytree: sample it inside a jitted step from a key)."""

  theta: jax.Array  # (N, 2, 3) affine part
  control_points: jax.Array  # (P, 2) TPS control points
  control_params: jax.Array  # (N, P) TPS weights

  @classmethod
  def sample(cls, key: jax.Array, batch: int, *, sigma_affine: float = SIGMA_AFFINE, sigma_tps: float = SIGMA_TPS,
             points_tps: int = POINTS_TPS) -> RandomTransform:  # fmt: skip
    k_affine, k_tps = jax.random.split(key)
    theta = jnp.eye(2, 3, dtype=jnp.float32)[None] + sigma_affine * jax.random.normal(k_affine, (batch, 2, 3))
    if points_tps > 0:
      control_points = make_coordinate_grid_2d((points_tps, points_tps)).reshape(-1, 2)
    else:
      control_points = jnp.zeros((0, 2), jnp.float32)
    params = sigma_tps * jax.random.normal(k_tps, (batch, control_points.shape[0]))
    return cls(theta, control_points, params)

  @classmethod
  def similarity(cls, key: jax.Array, batch: int, *, max_rotation: float = MAX_ROTATION, scale_range=SCALE_RANGE,
                 max_translation: float = MAX_TRANSLATION) -> RandomTransform:  # fmt: skip
    """Eq. 7's augmentation: a random rotation (uniform +-max_rotation degrees), isotropic scaling (uniform in
    scale_range) and translation (uniform +-max_translation per axis, normalised units) per image, no TPS. The paper
    names the three kinds but not their ranges; ours keep the face in the frame."""
    k_rot, k_scale, k_shift = jax.random.split(key, 3)
    angle = jnp.deg2rad(jax.random.uniform(k_rot, (batch,), minval=-max_rotation, maxval=max_rotation))
    scale = jax.random.uniform(k_scale, (batch,), minval=scale_range[0], maxval=scale_range[1])
    shift = jax.random.uniform(k_shift, (batch, 2), minval=-max_translation, maxval=max_translation)
    c, s = jnp.cos(angle) * scale, jnp.sin(angle) * scale
    theta = jnp.stack([jnp.stack([c, -s, shift[:, 0]], -1), jnp.stack([s, c, shift[:, 1]], -1)], axis=-2)
    return cls(theta, jnp.zeros((0, 2), jnp.float32), jnp.zeros((batch, 0), jnp.float32))

  def warp_coordinates(self, coordinates: jax.Array) -> jax.Array:
    """(N or 1, P, 2) coordinates (x, y) -> (N, P, 2) warped by this batch's transforms."""
    affine = jnp.einsum("nij,npj->npi", self.theta[:, :, :2], coordinates) + self.theta[:, None, :, 2]
    distances = jnp.abs(coordinates[:, :, None, :] - self.control_points[None, None]).sum(-1)  # (N, P, C), L1
    tps = jnp.square(distances) * jnp.log(distances + TPS_EPS) * self.control_params[:, None, :]
    return affine + tps.sum(-1)[..., None]

  def jacobian(self, coordinates: jax.Array) -> jax.Array:
    """d warp / d p at each coordinate: (N, P, 2) -> (N, P, 2, 2), rows the output (x, y) (face-vid2vid's layout,
    for an equivariance_jacobian term; face-vid2vid's vox-256 weights it 0)."""
    n = self.theta.shape[0]
    coordinates = jnp.broadcast_to(coordinates, (n, *coordinates.shape[1:]))

    def one(theta, params, p):
      single = RandomTransform(theta[None], self.control_points, params[None])
      return jax.jacfwd(lambda q: single.warp_coordinates(q[None, None])[0, 0])(p)

    return jax.vmap(lambda t, w, ps: jax.vmap(lambda p: one(t, w, p))(ps))(self.theta, self.control_params, coordinates)

  def transform_frame(self, image: jax.Array) -> jax.Array:
    """The transformed images (N, H, W, C): each samples the original at the warped coordinate grid, with torch's
    reflection padding (align_corners=False) as face-vid2vid's F.grid_sample(..., padding_mode="reflection")."""
    n, h, w, _ = image.shape
    grid = make_coordinate_grid_2d((h, w)).reshape(1, h * w, 2)
    grid = self.warp_coordinates(grid).reshape(n, h, w, 2)
    return grid_sample_2d(image, reflect_grid(grid, (h, w)))


def _reflect(u: jax.Array, size: int) -> jax.Array:
  """torch's reflect_coordinates for align_corners=False (reflect about -0.5 and size - 0.5), then the clip to
  [0, size - 1] that grid_sampler_compute_source_index applies: pixel coordinates in, pixel coordinates out."""
  span = float(size)
  v = jnp.abs(u + 0.5)
  flips = jnp.floor(v / span)
  extra = jnp.mod(v, span)
  reflected = jnp.where(jnp.mod(flips, 2) == 0, extra - 0.5, span - extra - 0.5)
  return jnp.clip(reflected, 0.0, size - 1.0)


def reflect_grid(grid: jax.Array, spatial_size: tuple[int, int]) -> jax.Array:
  """A sampling grid (..., 2) of (x, y) in normalised coordinates moved inside the image as torch's reflection
  padding does, so that blocks.grid_sample_2d (zeros padding) then samples exactly what padding_mode="reflection"
  would."""
  h, w = spatial_size
  out = []
  for k, size in ((0, w), (1, h)):
    u = ((grid[..., k] + 1.0) * size - 1.0) / 2.0  # unnormalise (align_corners=False)
    out.append((2.0 * _reflect(u, size) + 1.0) / size - 1.0)
  return jnp.stack(out, axis=-1)
