"""Deep3DFaceRecon's perspective camera, which places the 3DMM render I_R (MIMAFace, "Motion Representation").

Conventions (sicxu/Deep3DFaceRecon_pytorch `models/bfm.py`, and the MIMAFace release's
`models/D3DFR/BFM/BFM09Model.py`, which renders at 256 px with focal 1015 * 256 / 224):

- World (model) space: the 3DMM's vertices after rotation and translation, x right, y up, z towards the camera.
- The camera sits at z = `distance` = 10 looking down -z: camera-space vertex = (x, y, 10 - z); its third
  coordinate is the positive depth, smaller is nearer.
- Pinhole projection: u = focal * x_c / z_c + cx, v = focal * y_c / z_c + cy with focal 1015 and cx = cy = 112
  at 224 px; `Camera.deep3d(resolution)` scales both by resolution / 224 (focal 1015 * R / 224, centre R / 2).
- Image y is flipped: v grows upwards, rows grow downwards, so the row coordinate is H - v (Deep3DFaceRecon's
  landmarks say "y direction is opposite to v direction"; the release computes `img_size - y`).
- Continuous pixel coordinates: column x in [0, W], row y in [0, H]; pixel (row i, column j) covers
  [j, j + 1) x [i, i + 1) and its centre is (j + 0.5, i + 0.5) (nvdiffrast's and pytorch3d's convention, so
  the principal point R / 2 is the image centre, between the two middle pixels).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DEEP3D_FOCAL = 1015.0
DEEP3D_CENTER = 112.0
DEEP3D_SIZE = 224
DEEP3D_DISTANCE = 10.0


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera at z = distance looking down -z; focal and centre in pixels of a height x width image."""

  focal: float
  cx: float
  cy: float
  height: int
  width: int
  distance: float = DEEP3D_DISTANCE

  @classmethod
  def deep3d(cls, resolution: int | tuple[int, int]) -> "Camera":
    """Deep3DFaceRecon's camera (focal 1015, centre 112 at 224 px) scaled to `resolution` (square or (H, W))."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if height <= 0 or width <= 0:
      raise ValueError(f"Camera resolution must be positive; got {resolution!r}")
    scale = height / DEEP3D_SIZE  # the field of view is kept vertically; a non-square image widens it
    return cls(focal=DEEP3D_FOCAL * scale, cx=width / 2, cy=height / 2, height=height, width=width)

  def to_camera(self, vertices: jax.Array) -> jax.Array:
    """World (..., 3) -> camera space (x, y, distance - z); the last coordinate is the depth."""
    return jnp.concatenate([vertices[..., :2], self.distance - vertices[..., 2:3]], axis=-1)

  def to_screen(self, camera_points: jax.Array) -> jax.Array:
    """Camera space (..., 3) -> (column, row, depth) in continuous pixel coordinates (pixel centres at +0.5)."""
    depth = camera_points[..., 2]
    u = self.focal * camera_points[..., 0] / depth + self.cx
    v = self.focal * camera_points[..., 1] / depth + self.cy
    return jnp.stack([u, self.height - v, depth], axis=-1)

  def project(self, vertices: jax.Array) -> jax.Array:
    """World (..., 3) -> (column, row, depth): what the rasterizer takes."""
    return self.to_screen(self.to_camera(vertices))
