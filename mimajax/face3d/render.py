"""MIMAFace's render condition I_R: the 3DMM face of a row of coefficients, rasterized at training resolution.

The MIMAFace release (models/D3DFR) renders BFM09 with pytorch3d at 256 px (focal 1015 * 256 / 224), vertex
colours = SH-lit albedo clamped to [0, 255], black background, and a mask where the face is drawn; the render
and mask are VAE-encoded / concatenated with the U-Net input. Here the same with the JAX rasterizer:

  coeffs (..., 257 | 261) -> shape, pose, SH-lit vertex colours -> Camera.deep3d(resolution) -> rasterize
  -> images (..., H, W, 3) in [0, 1] (background 0), mask (..., H, W, 1)

Jittable with `jax.jit(render_coefficients, static_argnames=("resolution", "shading"))`; pass the model as an
argument (it is a pytree) rather than closing over it, so its bases are not baked into the program as constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimajax.face3d import coefficients as coeff_layout
from mimajax.face3d.camera import Camera
from mimajax.face3d.lighting import lambert_color, sh_color
from mimajax.face3d.morphable_model import (
  MorphableModel,
  compute_normals,
  compute_rotation,
  compute_shape,
  compute_texture,
  transform,
)
from mimajax.face3d.rasterizer import interpolate, rasterize

SHADINGS = ("sh", "gray", "lambert")
GRAY_ALBEDO = 127.0 / 255.0  # the release's `rendered_img_gray` texture


def face_geometry(model: MorphableModel, coeffs: jax.Array) -> dict[str, jax.Array]:
  """Coefficients (..., 257 | 261) -> world vertices (..., N, 3), rotated vertex normals, rotation, groups."""
  groups = coeff_layout.split(coeffs)
  shape = compute_shape(model, groups["identity"], groups["expression"])
  rotation = compute_rotation(groups["angle"])
  vertices = transform(shape, rotation, groups["translation"])
  normals = jnp.matmul(compute_normals(model, shape), rotation, precision=jax.lax.Precision.HIGHEST)
  return dict(vertices=vertices, normals=normals, rotation=rotation, groups=groups)


def vertex_colors(model: MorphableModel, geometry: dict[str, jax.Array], shading: str = "sh") -> jax.Array:
  """Per-vertex RGB (..., N, 3) in [0, 1].

  "sh": the coefficients' albedo lit by their SH gamma (the release's `rendered_img`, what MIMAFace encodes);
  "gray": a flat 127/255 albedo lit by the same SH gamma (the release's `rendered_img_gray`);
  "lambert": the flat albedo under a fixed light from the camera, ignoring texture and gamma (geometry only).
  """
  normals, groups = geometry["normals"], geometry["groups"]
  if shading == "sh":
    color = sh_color(compute_texture(model, groups["texture"]), normals, groups["gamma"])
  elif shading == "gray":
    color = sh_color(jnp.full_like(normals, GRAY_ALBEDO), normals, groups["gamma"])
  elif shading == "lambert":
    color = lambert_color(jnp.full_like(normals, 0.8), normals)
  else:
    raise ValueError(f"render shading {shading!r} unknown; expected one of {SHADINGS}")
  return jnp.clip(color, 0.0, 1.0)


def render_coefficients(
  model: MorphableModel,
  coeffs: jax.Array,
  resolution: int | tuple[int, int] = 256,
  *,
  shading: str = "sh",
  background: float = 0.0,
  **rasterize_options,
) -> tuple[jax.Array, jax.Array]:
  """3DMM coefficients (..., 257 | 261) -> (I_R images (..., H, W, 3) in [0, 1], mask (..., H, W, 1))."""
  geometry = face_geometry(model, jnp.asarray(coeffs, jnp.float32))
  colors = vertex_colors(model, geometry, shading)
  camera = Camera.deep3d(resolution)
  fragments = rasterize(camera.project(geometry["vertices"]), model.triangles, resolution, **rasterize_options)
  return interpolate(colors, model.triangles, fragments, background), fragments.mask


def project_keypoints(model: MorphableModel, coeffs: jax.Array, resolution: int | tuple[int, int] = 224) -> jax.Array:
  """The model's keypoints in pixel coordinates (..., K, 2) = (column, row), rows growing downwards.

  At 224 px these are Deep3DFaceRecon's `get_landmarks(to_image(...))` with y replaced by 224 - y.
  """
  if model.keypoints is None:
    raise ValueError("project_keypoints: this MorphableModel has no keypoints")
  groups = coeff_layout.split(jnp.asarray(coeffs, jnp.float32))
  shape = compute_shape(model, groups["identity"], groups["expression"])
  vertices = transform(shape, compute_rotation(groups["angle"]), groups["translation"])
  return Camera.deep3d(resolution).project(vertices[..., model.keypoints, :])[..., :2]
