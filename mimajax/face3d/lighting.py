"""Vertex shading for the 3DMM render I_R: Deep3DFaceRecon's spherical-harmonics lighting, and a fixed Lambert light.

SH (sicxu/Deep3DFaceRecon_pytorch `models/bfm.py` `compute_color`; the MIMAFace release's `add_illumination`):
gamma (27) is read as (3, 9), nine SH bands per RGB channel, and 0.8 is added to band 0 of each channel (the
"init_lit" ambient term, so zero coefficients give a lit face). With a = (pi, 2 pi / sqrt 3, 2 pi / sqrt 8) and
c = (1 / sqrt(4 pi), sqrt 3 / sqrt(4 pi), 3 sqrt 5 / sqrt(12 pi)) the basis at unit normal n = (x, y, z) is

  Y = [a0 c0, -a1 c1 y, a1 c1 z, -a1 c1 x, a2 c2 x y, -a2 c2 y z, a2 c2 / (2 sqrt 3) (3 z^2 - 1), -a2 c2 x z,
       a2 c2 / 2 (x^2 - y^2)]

and colour = albedo * (Y @ gamma^T) per channel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
SH_C = (
  1 / math.sqrt(4 * math.pi),
  math.sqrt(3.0) / math.sqrt(4 * math.pi),
  3 * math.sqrt(5.0) / math.sqrt(12 * math.pi),
)
INIT_LIGHT = 0.8  # Deep3DFaceRecon's init_lit on band 0


def sh_basis(normals: jax.Array) -> jax.Array:
  """Unit normals (..., 3) -> the 9 SH basis values (..., 9) in Deep3DFaceRecon's order and signs."""
  (a0, a1, a2), (c0, c1, c2) = SH_A, SH_C
  x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
  return jnp.stack(
    [
      jnp.full_like(x, a0 * c0),
      -a1 * c1 * y,
      a1 * c1 * z,
      -a1 * c1 * x,
      a2 * c2 * x * y,
      -a2 * c2 * y * z,
      0.5 * a2 * c2 / math.sqrt(3.0) * (3 * z**2 - 1),
      -a2 * c2 * x * z,
      0.5 * a2 * c2 * (x**2 - y**2),
    ],
    axis=-1,
  )


def sh_irradiance(normals: jax.Array, gamma: jax.Array) -> jax.Array:
  """Normals (..., N, 3), gamma (..., 27) -> RGB light (..., N, 3), including the 0.8 ambient offset."""
  if gamma.shape[-1] != 27:
    raise ValueError(f"SH lighting gamma has shape {tuple(gamma.shape)}; expected last dimension 27 (9 bands x RGB)")
  bands = gamma.reshape(*gamma.shape[:-1], 3, 9).at[..., 0].add(INIT_LIGHT)  # (..., RGB, 9)
  return jnp.einsum("...nk,...ck->...nc", sh_basis(normals), bands, precision=jax.lax.Precision.HIGHEST)


def sh_color(albedo: jax.Array, normals: jax.Array, gamma: jax.Array) -> jax.Array:
  """Deep3DFaceRecon's `compute_color`: albedo (..., N, 3) lit by SH gamma (..., 27) at rotated normals."""
  return albedo * sh_irradiance(normals, gamma)


def lambert_color(
  albedo: jax.Array, normals: jax.Array, *, direction=(0.0, 0.0, 1.0), ambient: float = 0.3, diffuse: float = 0.7
) -> jax.Array:
  """Albedo lit by ambient + diffuse * max(0, n . l), l a fixed unit direction (default: from the camera, +z)."""
  light = jnp.asarray(direction, jnp.float32)
  light = light / jnp.linalg.norm(light)
  return albedo * (ambient + diffuse * jnp.maximum(jnp.sum(normals * light, axis=-1, keepdims=True), 0.0))
