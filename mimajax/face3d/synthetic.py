"""A synthetic stand-in for the BFM (licence-gated) so the 3DMM render I_R works offline: a face-like height field.

The mean shape is a grid mapped onto an elliptic disc (the extent of Deep3DFaceRecon's front face: about 1.5 x 1.9
decimetres, 0.9 deep), lifted onto an ellipsoidal cap with a nose ridge, eye sockets, brows, lips and cheeks.
Identity, expression and texture bases are smooth random fields (sums of low-frequency cosines) with decaying
amplitudes, like PCA bases; the expression basis is concentrated around the mouth, eyes and brows. Everything is
deterministic for a seed. Keypoints are Deep3DFaceRecon's five: eye at -x, eye at +x, nose tip, mouth corners
at -x and +x (image left to right).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mimajax.face3d.morphable_model import EXPRESSION_DIM, IDENTITY_DIM, TEXTURE_DIM, MorphableModel

HALF_WIDTH, HALF_HEIGHT, DEPTH = 0.75, 0.95, 0.55


def _bump(x, y, cx, cy, sx, sy):
  return np.exp(-(((x - cx) / sx) ** 2) - ((y - cy) / sy) ** 2)


def _face_surface(x, y):
  """Height z(x, y) of the synthetic face; x, y in decimetres, the face centred at the origin."""
  r2 = (x / HALF_WIDTH) ** 2 + (y / HALF_HEIGHT) ** 2
  z = DEPTH * np.sqrt(np.clip(1.0 - 0.8 * r2, 0.0, None))
  z += 0.22 * _bump(x, y, 0.0, -0.05, 0.09, 0.28) + 0.08 * _bump(x, y, 0.0, -0.22, 0.16, 0.1)  # nose ridge, tip
  z -= 0.09 * (_bump(x, y, -0.28, 0.2, 0.14, 0.08) + _bump(x, y, 0.28, 0.2, 0.14, 0.08))  # eye sockets
  z += 0.05 * (_bump(x, y, -0.28, 0.36, 0.18, 0.05) + _bump(x, y, 0.28, 0.36, 0.18, 0.05))  # brows
  z += 0.04 * _bump(x, y, 0.0, -0.47, 0.2, 0.05) - 0.03 * _bump(x, y, 0.0, -0.53, 0.2, 0.02)  # lips, their seam
  z += 0.04 * (_bump(x, y, -0.38, -0.15, 0.15, 0.15) + _bump(x, y, 0.38, -0.15, 0.15, 0.15))  # cheeks
  return z


def _grid(resolution):
  s, t = np.meshgrid(np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution))  # t (rows) along y
  # Square -> disc (orientation preserving), then stretched to the face's ellipse.
  x = HALF_WIDTH * s * np.sqrt(1 - t**2 / 2)
  y = HALF_HEIGHT * t * np.sqrt(1 - s**2 / 2)
  return x.reshape(-1), y.reshape(-1)


def _grid_triangles(resolution):
  """Two counter-clockwise (seen from +z) triangles per grid cell, so normals face the camera."""
  i, j = np.meshgrid(np.arange(resolution - 1), np.arange(resolution - 1), indexing="ij")
  a = (i * resolution + j).reshape(-1)
  b, c, d = a + 1, a + resolution + 1, a + resolution  # (x+1, y), (x+1, y+1), (x, y+1)
  return np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).astype(np.int32)


def _smooth_fields(rng, x, y, count, channels, amplitude, decay):
  """`count` random smooth fields per channel -> basis (N * channels, count), column k scaled by decay**k."""
  u, v = x / HALF_WIDTH, y / HALF_HEIGHT
  basis = np.empty((x.size, channels, count), np.float64)
  for k in range(count):
    for ch in range(channels):
      field = np.zeros_like(u)
      for _ in range(3):
        fu, fv = rng.integers(0, 3, size=2)
        field += rng.normal() * np.cos(np.pi * (fu * u + fv * v) / 2 + rng.uniform(0, 2 * np.pi))
      basis[:, ch, k] = field / np.sqrt(3.0)
    basis[..., k] *= amplitude * decay**k
  return basis.reshape(x.size * channels, count)


def synthetic_model(seed: int = 0, resolution: int = 48) -> MorphableModel:
  """A face-like MorphableModel on a resolution x resolution grid: 2 (resolution - 1)^2 triangles."""
  if resolution < 3:
    raise ValueError(f"synthetic_model: resolution must be >= 3 grid points per side; got {resolution}")
  rng = np.random.default_rng(seed)
  x, y = _grid(resolution)
  mean = np.stack([x, y, _face_surface(x, y)], -1)
  mean -= mean.mean(0, keepdims=True)

  identity = _smooth_fields(rng, x, y, IDENTITY_DIM, 3, amplitude=0.015, decay=0.96)
  # Expressions move the mouth, eyes and brows more than the forehead and chin.
  region = (
    _bump(x, y, 0.0, -0.45, 0.3, 0.18)
    + 0.6 * (_bump(x, y, -0.28, 0.25, 0.18, 0.15) + _bump(x, y, 0.28, 0.25, 0.18, 0.15))
    + 0.15
  )
  expression = _smooth_fields(rng, x, y, EXPRESSION_DIM, 3, amplitude=0.02, decay=0.95)
  expression = (expression.reshape(-1, 3, EXPRESSION_DIM) * region[:, None, None]).reshape(-1, EXPRESSION_DIM)

  skin = np.array([205.0, 160.0, 135.0])
  shade = 1.0 - 0.25 * (_bump(x, y, 0.0, -0.47, 0.2, 0.05))[:, None] * np.array([0.0, 1.0, 1.0])  # redder lips
  mean_texture = skin * shade
  texture = _smooth_fields(rng, x, y, TEXTURE_DIM, 3, amplitude=6.0, decay=0.96)

  def nearest(px, py):
    return int(np.argmin((x - px) ** 2 + (y - py) ** 2))

  keypoints = [nearest(-0.28, 0.2), nearest(0.28, 0.2), nearest(0.0, -0.2), nearest(-0.2, -0.5), nearest(0.2, -0.5)]
  return MorphableModel(
    mean_shape=jnp.asarray(mean, jnp.float32),
    identity_basis=jnp.asarray(identity, jnp.float32),
    expression_basis=jnp.asarray(expression, jnp.float32),
    mean_texture=jnp.asarray(mean_texture, jnp.float32),
    texture_basis=jnp.asarray(texture, jnp.float32),
    triangles=jnp.asarray(_grid_triangles(resolution)),
    keypoints=jnp.asarray(keypoints, jnp.int32),
  ).validate()
