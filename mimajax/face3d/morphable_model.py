"""The 3D morphable model behind MIMAFace's motion coefficients and render I_R (its supplementary "3DMM").

Geometry follows Deep3DFaceRecon (sicxu/Deep3DFaceRecon_pytorch `models/bfm.py`, the same formulas as the
MIMAFace release's `models/D3DFR/BFM/BFM09Model.py` and its 3DMM-Fitting `BaseModel`):

  shape    S = mean_shape + identity_basis @ alpha + expression_basis @ beta      (N, 3), mean centred
  albedo   T = (mean_texture + texture_basis @ delta) / 255                         (N, 3)
  rotation M = (Rz(z) @ Ry(y) @ Rx(x))^T, applied as points @ M (row vectors)
  pose     S' = S @ M + translation
  normals  sum of the unit normals (v1 - v2) x (v2 - v3) of a vertex's triangles, normalised, then @ M

Bases are stored as Deep3DFaceRecon stores them: (3N, K) with rows interleaved x0, y0, z0, x1, ...
Every function takes any leading batch axes. Matmuls run at HIGHEST precision: a bf16/tf32 default would move
vertices by pixels.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from mimajax.errors import CheckpointReadError

HIGHEST = jax.lax.Precision.HIGHEST
IDENTITY_DIM, EXPRESSION_DIM, TEXTURE_DIM = 80, 64, 80


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MorphableModel:
  """A linear face model; a pytree, so it can be passed into `jax.jit` instead of baked in as constants."""

  mean_shape: jax.Array  # (N, 3), centred
  identity_basis: jax.Array  # (3N, 80)
  expression_basis: jax.Array  # (3N, 64)
  mean_texture: jax.Array  # (N, 3), 0..255
  texture_basis: jax.Array  # (3N, 80), 0..255 units
  triangles: jax.Array  # (T, 3) int32, 0-based, counter-clockwise seen from +z (normals towards the camera)
  point_buf: jax.Array | None = None  # (N, P) int32: triangles around each vertex, -1 = none (Deep3DFaceRecon's)
  keypoints: jax.Array | None = None  # (K,) int32 vertex indices: BFM's 68 landmarks, or a synthetic model's 5

  @property
  def num_vertices(self) -> int:
    return self.mean_shape.shape[0]

  @property
  def num_triangles(self) -> int:
    return self.triangles.shape[0]

  def validate(self) -> "MorphableModel":
    """Raises ValueError naming the first array whose shape does not fit the others; returns self."""
    n = self.num_vertices
    expected = {
      "mean_shape": (n, 3),
      "identity_basis": (3 * n, IDENTITY_DIM),
      "expression_basis": (3 * n, EXPRESSION_DIM),
      "mean_texture": (n, 3),
      "texture_basis": (3 * n, TEXTURE_DIM),
      "triangles": (self.num_triangles, 3),
    }
    for name, shape in expected.items():
      got = tuple(getattr(self, name).shape)
      if got != shape:
        raise ValueError(f"MorphableModel.{name} has shape {got}; expected {shape} for {n} vertices")
    if self.point_buf is not None and (self.point_buf.ndim != 2 or self.point_buf.shape[0] != n):
      raise ValueError(f"MorphableModel.point_buf has shape {tuple(self.point_buf.shape)}; expected ({n}, P)")
    tri = np.asarray(self.triangles)
    if tri.size and (tri.min() < 0 or tri.max() >= n):
      raise ValueError(f"MorphableModel.triangles index vertices {tri.min()}..{tri.max()}; the model has {n}")
    return self


def from_mesh(
  vertices,
  triangles,
  *,
  expression_basis=None,
  color=(200.0, 160.0, 140.0),
  keypoints=None,
  recenter: bool = True,
) -> MorphableModel:
  """A model from any mesh (e.g. a landmark-derived canonical face): zero identity/texture bases, flat albedo."""
  vertices = np.asarray(vertices, np.float32).reshape(-1, 3)
  n = vertices.shape[0]
  if recenter:
    vertices = vertices - vertices.mean(0, keepdims=True)
  exp = np.zeros((3 * n, EXPRESSION_DIM), np.float32) if expression_basis is None else expression_basis
  return MorphableModel(
    mean_shape=jnp.asarray(vertices),
    identity_basis=jnp.zeros((3 * n, IDENTITY_DIM), jnp.float32),
    expression_basis=jnp.asarray(exp, jnp.float32),
    mean_texture=jnp.broadcast_to(jnp.asarray(color, jnp.float32), (n, 3)),
    texture_basis=jnp.zeros((3 * n, TEXTURE_DIM), jnp.float32),
    triangles=jnp.asarray(np.asarray(triangles, np.int32).reshape(-1, 3)),
    keypoints=None if keypoints is None else jnp.asarray(np.asarray(keypoints, np.int32).reshape(-1)),
  ).validate()


# Keys of Deep3DFaceRecon's BFM_model_front.mat (util/load_mats.py `transferBFM09`), all 1-based indices:
#   meanshape (1, 3N) decimetres   idBase (3N, 80)   exBase (3N, 64)   meantex (1, 3N) 0..255   texBase (3N, 80)
#   tri (T, 3)   point_buf (N, 8), 0 = no triangle   keypoints (68, 1)
# N = 35709 and T = 70789 for BFM09 front. Other keys (frontmask2_idx, tri_mask2, skinmask) are for fitting losses.
BFM_REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri")


def load_bfm(path: str | os.PathLike, *, recenter: bool = True) -> MorphableModel:
  """Deep3DFaceRecon's `BFM_model_front.mat` (or the MIMAFace release's `BFM09_model_info.mat`) -> MorphableModel.

  `recenter` subtracts the mean vertex from the mean shape, as Deep3DFaceRecon (`recenter=True`) and the release do.
  """
  from scipy.io import loadmat

  try:
    mat = loadmat(os.fspath(path))
  except Exception as e:  # scipy raises OSError, ValueError, IndexError, ... depending on how a file is broken
    raise CheckpointReadError(f"cannot read the 3DMM file {os.fspath(path)!r}: {e}") from e
  missing = [k for k in BFM_REQUIRED_KEYS if k not in mat]
  if missing:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise CheckpointReadError(
      f"{os.fspath(path)!r} is not a Deep3DFaceRecon BFM model: missing keys {missing} (found {found})"
    )
  mean_shape = np.asarray(mat["meanshape"], np.float32).reshape(-1, 3)
  if recenter:
    mean_shape = mean_shape - mean_shape.mean(0, keepdims=True)
  optional = {}
  if "point_buf" in mat:
    optional["point_buf"] = jnp.asarray(np.asarray(mat["point_buf"], np.int64).astype(np.int32) - 1)
  if "keypoints" in mat:
    optional["keypoints"] = jnp.asarray(np.asarray(mat["keypoints"], np.int64).reshape(-1).astype(np.int32) - 1)
  model = MorphableModel(
    mean_shape=jnp.asarray(mean_shape),
    identity_basis=jnp.asarray(np.asarray(mat["idBase"], np.float32)),
    expression_basis=jnp.asarray(np.asarray(mat["exBase"], np.float32)),
    mean_texture=jnp.asarray(np.asarray(mat["meantex"], np.float32).reshape(-1, 3)),
    texture_basis=jnp.asarray(np.asarray(mat["texBase"], np.float32)),
    triangles=jnp.asarray(np.asarray(mat["tri"], np.int64).astype(np.int32) - 1),
    **optional,
  )
  try:
    return model.validate()
  except ValueError as e:
    raise CheckpointReadError(f"{os.fspath(path)!r}: {e}") from e


def _apply_basis(basis: jax.Array, weights: jax.Array, n: int) -> jax.Array:
  return jnp.einsum("ik,...k->...i", basis, weights, precision=HIGHEST).reshape(*weights.shape[:-1], n, 3)


def compute_shape(model: MorphableModel, identity: jax.Array, expression: jax.Array) -> jax.Array:
  """(..., 80), (..., 64) -> vertices (..., N, 3) in model space (Deep3DFaceRecon `compute_shape`)."""
  n = model.num_vertices
  return (
    model.mean_shape
    + _apply_basis(model.identity_basis, identity, n)
    + _apply_basis(model.expression_basis, expression, n)
  )


def compute_texture(model: MorphableModel, texture: jax.Array) -> jax.Array:
  """(..., 80) -> albedo (..., N, 3) in [0, 1] for in-range coefficients (Deep3DFaceRecon `compute_texture`)."""
  return (model.mean_texture + _apply_basis(model.texture_basis, texture, model.num_vertices)) / 255.0


def compute_rotation(angles: jax.Array) -> jax.Array:
  """Euler angles (..., 3) (x, y, z) in radians -> (..., 3, 3) M = (Rz @ Ry @ Rx)^T, used as `points @ M`."""
  x, y, z = angles[..., 0], angles[..., 1], angles[..., 2]
  one, zero = jnp.ones_like(x), jnp.zeros_like(x)

  def mat(rows):
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

  rot_x = mat([(one, zero, zero), (zero, jnp.cos(x), -jnp.sin(x)), (zero, jnp.sin(x), jnp.cos(x))])
  rot_y = mat([(jnp.cos(y), zero, jnp.sin(y)), (zero, one, zero), (-jnp.sin(y), zero, jnp.cos(y))])
  rot_z = mat([(jnp.cos(z), -jnp.sin(z), zero), (jnp.sin(z), jnp.cos(z), zero), (zero, zero, one)])
  rot = jnp.matmul(jnp.matmul(rot_z, rot_y, precision=HIGHEST), rot_x, precision=HIGHEST)
  return jnp.swapaxes(rot, -1, -2)


def transform(points: jax.Array, rotation: jax.Array, translation: jax.Array) -> jax.Array:
  """(..., N, 3) @ (..., 3, 3) + (..., 3): Deep3DFaceRecon's rigid `transform`."""
  return jnp.matmul(points, rotation, precision=HIGHEST) + translation[..., None, :]


def _normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
  # torch.nn.functional.normalize: v / max(|v|, eps), so zero vectors stay zero
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def face_normals(vertices: jax.Array, triangles: jax.Array) -> jax.Array:
  """Unit normals (v1 - v2) x (v2 - v3) per triangle: (..., N, 3) -> (..., T, 3); degenerate ones are 0."""
  v1, v2, v3 = (vertices[..., triangles[:, k], :] for k in range(3))
  return _normalize(jnp.cross(v1 - v2, v2 - v3))


def compute_normals(model: MorphableModel, vertices: jax.Array) -> jax.Array:
  """Per-vertex unit normals (..., N, 3): the normalised sum of the adjacent triangles' unit normals."""
  normals = face_normals(vertices, model.triangles)
  if model.point_buf is not None:
    # Deep3DFaceRecon's gather: a zero "triangle" appended at the end is what the -1 padding indexes
    padded = jnp.concatenate([normals, jnp.zeros_like(normals[..., :1, :])], axis=-2)
    summed = padded[..., model.point_buf, :].sum(axis=-2)
  else:
    summed = jnp.zeros_like(vertices)
    for k in range(3):
      summed = summed.at[..., model.triangles[:, k], :].add(normals)
  return _normalize(summed)
