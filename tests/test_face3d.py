"""3DMM and renderer (mimajax.face3d): analytic rasterizer cases, Deep3DFaceRecon formulas, BFM loader, I_R."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax.errors import CheckpointReadError
from mimajax.face3d import coefficients
from mimajax.face3d.camera import Camera
from mimajax.face3d.lighting import sh_color, sh_irradiance
from mimajax.face3d.morphable_model import (
  compute_normals,
  compute_rotation,
  compute_shape,
  compute_texture,
  from_mesh,
  load_bfm,
)
from mimajax.face3d.rasterizer import interpolate, rasterize
from mimajax.face3d.render import face_geometry, project_keypoints, render_coefficients, vertex_colors
from mimajax.face3d.synthetic import synthetic_model

TRI = jnp.array([[0, 1, 2]], jnp.int32)
render_jit = jax.jit(render_coefficients, static_argnames=("resolution", "shading"))
geometry_jit = jax.jit(face_geometry)  # eager JAX compiles every op on its own: slower for a test than one jit
colors_jit = jax.jit(vertex_colors, static_argnames=("shading",))


@pytest.fixture(scope="module")
def model():
  return synthetic_model(seed=0, resolution=20)


def _coeffs(batch, seed=0, scale=0.5, width=257):
  rng = np.random.default_rng(seed)
  c = np.zeros((batch, width), np.float32)
  c[:, :224] = rng.normal(size=(batch, 224)) * scale
  c[:, 224:227] = rng.normal(size=(batch, 3)) * 0.2
  c[:, 227:254] = rng.normal(size=(batch, 27)) * 0.1
  c[:, 254:257] = rng.normal(size=(batch, 3)) * 0.1
  return c


def _screen_triangle(points, depth=5.0):
  return jnp.asarray([[x, y, depth] for x, y in points], jnp.float32)


# --- Deep3DFaceRecon's formulas (sicxu/Deep3DFaceRecon_pytorch models/bfm.py), retyped in torch -------------


def _d3d_rotation(angles):
  import torch

  b = angles.shape[0]
  ones, zeros = torch.ones([b, 1]), torch.zeros([b, 1])
  x, y, z = angles[:, :1], angles[:, 1:2], angles[:, 2:]
  rot_x = torch.cat([ones, zeros, zeros, zeros, torch.cos(x), -torch.sin(x), zeros, torch.sin(x), torch.cos(x)], 1)
  rot_y = torch.cat([torch.cos(y), zeros, torch.sin(y), zeros, ones, zeros, -torch.sin(y), zeros, torch.cos(y)], 1)
  rot_z = torch.cat([torch.cos(z), -torch.sin(z), zeros, torch.sin(z), torch.cos(z), zeros, zeros, zeros, ones], 1)
  rot = rot_z.reshape(b, 3, 3) @ rot_y.reshape(b, 3, 3) @ rot_x.reshape(b, 3, 3)
  return rot.permute(0, 2, 1)


def _d3d_color(face_texture, face_norm, gamma):
  import torch

  a = [np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0)]
  c = [1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi)]
  gamma = gamma.reshape([gamma.shape[0], 3, 9]) + torch.tensor([0.8] + [0.0] * 8).reshape(1, 1, 9)
  gamma = gamma.permute(0, 2, 1)
  n = face_norm
  y = torch.cat(
    [
      a[0] * c[0] * torch.ones_like(n[..., :1]),
      -a[1] * c[1] * n[..., 1:2],
      a[1] * c[1] * n[..., 2:],
      -a[1] * c[1] * n[..., :1],
      a[2] * c[2] * n[..., :1] * n[..., 1:2],
      -a[2] * c[2] * n[..., 1:2] * n[..., 2:],
      0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * n[..., 2:] ** 2 - 1),
      -a[2] * c[2] * n[..., :1] * n[..., 2:],
      0.5 * a[2] * c[2] * (n[..., :1] ** 2 - n[..., 1:2] ** 2),
    ],
    -1,
  )
  return torch.cat([y @ gamma[..., :1], y @ gamma[..., 1:2], y @ gamma[..., 2:]], -1) * face_texture


def _d3d_norm(face_shape, face_buf, point_buf):
  import torch
  import torch.nn.functional as F

  v1, v2, v3 = (face_shape[:, face_buf[:, k]] for k in range(3))
  face_norm = F.normalize(torch.cross(v1 - v2, v2 - v3, dim=-1), dim=-1, p=2)
  face_norm = torch.cat([face_norm, torch.zeros(face_norm.shape[0], 1, 3)], dim=1)
  return F.normalize(torch.sum(face_norm[:, point_buf], dim=2), dim=-1, p=2)


def _point_buf(triangles, num_vertices, width=8):
  """Deep3DFaceRecon's point_buf, 0-based with -1 padding: the triangles around each vertex."""
  buf = np.full((num_vertices, width), -1, np.int64)
  fill = np.zeros(num_vertices, np.int64)
  for t, tri in enumerate(np.asarray(triangles)):
    for v in tri:
      buf[v, fill[v]] = t
      fill[v] += 1
  assert fill.max() <= width
  return buf


# --- rasterizer: analytic cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("winding", [(0, 1, 2), (0, 2, 1)])
def test_single_triangle_covers_pixels_whose_centres_are_inside(winding):
  # Legs along x = 1 and y = 1, hypotenuse x + y = 8.2; pixel (i, j) has its centre at (j + 0.5, i + 0.5).
  screen = _screen_triangle([(1.0, 1.0), (7.2, 1.0), (1.0, 7.2)])[jnp.array(winding)]
  frags = rasterize(screen, TRI, (9, 10))
  i, j = np.mgrid[:9, :10]
  expected = (i >= 1) & (j >= 1) & (i + j <= 7)
  np.testing.assert_array_equal(np.asarray(frags.mask[..., 0]) > 0, expected)
  np.testing.assert_array_equal(np.asarray(frags.triangle_id), np.where(expected, 0, -1))
  assert expected.sum() == 21


def test_pixel_centres_on_an_edge_are_covered():
  frags = rasterize(_screen_triangle([(0.5, 0.5), (4.5, 0.5), (0.5, 4.5)]), TRI, (9, 10))
  i, j = np.mgrid[:9, :10]
  np.testing.assert_array_equal(np.asarray(frags.mask[..., 0]) > 0, i + j <= 4)


def test_triangles_larger_than_the_image_are_clipped_to_it():
  # Most of these triangles is off screen; their boxes are clipped, and their pixels beyond the first 4 go
  # through the chunked walk, 16 (triangle, pixel) pairs at a time.
  options = dict(first_pass=4, chunk=16)
  frags = rasterize(_screen_triangle([(-5.0, -5.0), (40.0, -5.0), (-5.0, 40.0)]), TRI, (9, 10), **options)
  assert bool(jnp.all(frags.mask > 0))
  frags = rasterize(_screen_triangle([(-5.0, -5.0), (10.2, -5.0), (-5.0, 10.2)]), TRI, (9, 10), **options)
  i, j = np.mgrid[:9, :10]
  np.testing.assert_array_equal(np.asarray(frags.mask[..., 0]) > 0, i + j <= 4)


def test_triangles_behind_the_camera_or_degenerate_are_dropped():
  behind = jnp.asarray([[1.0, 1.0, 5.0], [7.0, 1.0, -1.0], [1.0, 7.0, 5.0]])
  flat = _screen_triangle([(1.0, 1.0), (4.0, 4.0), (7.0, 7.0)])
  assert float(rasterize(jnp.stack([behind, flat]), TRI, (9, 10)).mask.sum()) == 0.0


def _reference_rasterize(screen, triangles, height, width):
  """Brute force in float64: every pixel against every triangle, barycentrics by solving for them."""
  ids = np.full((height, width), -1)
  best = np.full((height, width), np.inf)
  for t, tri in enumerate(np.asarray(triangles)):
    p = np.asarray(screen, np.float64)[tri]
    m = np.array([[p[1, 0] - p[0, 0], p[2, 0] - p[0, 0]], [p[1, 1] - p[0, 1], p[2, 1] - p[0, 1]]])
    for i in range(height):
      for j in range(width):
        b1, b2 = np.linalg.solve(m, [j + 0.5 - p[0, 0], i + 0.5 - p[0, 1]])
        b = np.array([1 - b1 - b2, b1, b2])
        depth = 1.0 / np.sum(b / p[:, 2])
        if np.all(b >= 0) and depth < best[i, j]:
          ids[i, j], best[i, j] = t, depth
  return ids, np.where(ids >= 0, best, 0.0)


def test_matches_brute_force_on_random_triangles_of_mixed_sizes():
  # Small and large triangles, with chunks of 16 pairs, so chunks straddle triangles and triangles straddle chunks.
  rng = np.random.default_rng(0)
  centres = rng.uniform(-2, 22, (40, 1, 2))
  sizes = np.where(rng.random((40, 1, 1)) < 0.7, 2.0, 12.0)
  xy = centres + rng.normal(size=(40, 3, 2)) * sizes
  screen = np.concatenate([xy, rng.uniform(2, 6, (40, 3, 1))], -1).reshape(-1, 3).astype(np.float32)
  triangles = np.arange(120).reshape(40, 3)
  frags = rasterize(jnp.asarray(screen), jnp.asarray(triangles), (16, 20), first_pass=2, chunk=16)
  ids, depth = _reference_rasterize(screen, triangles, 16, 20)
  assert len(set(ids.ravel())) > 15
  np.testing.assert_array_equal(np.asarray(frags.triangle_id), ids)
  np.testing.assert_allclose(np.asarray(frags.depth), depth, rtol=1e-5)


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins(near_first):
  near = [[1.0, 1.0, 3.0], [9.2, 1.0, 3.0], [1.0, 9.2, 3.0]]
  far = [[3.0, 3.0, 4.0], [11.2, 3.0, 4.0], [3.0, 11.2, 4.0]]  # shifted by 2 px: overlaps partly
  screen = jnp.asarray((near + far) if near_first else (far + near))
  triangles = jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32)
  frags = rasterize(screen, triangles, 12)
  near_id, far_id = (0, 1) if near_first else (1, 0)
  i, j = np.mgrid[:12, :12]
  in_near = (i >= 1) & (j >= 1) & (i + j <= 9)
  in_far = (i >= 3) & (j >= 3) & (i + j <= 13)
  assert (in_near & in_far).sum() > 5
  expected = np.where(in_near, near_id, np.where(in_far, far_id, -1))
  np.testing.assert_array_equal(np.asarray(frags.triangle_id), expected)
  color = interpolate(jnp.asarray([[1.0]] * 3 + [[2.0]] * 3), triangles, frags, background=-1.0)
  np.testing.assert_allclose(np.asarray(color[..., 0]), np.choose(expected + 1, [-1.0, 1.0, 2.0]), rtol=1e-6)


def test_interpenetrating_triangles_split_where_depths_cross():
  # Two triangles over the same pixels; one's depth grows with x, the other's falls: the nearer wins per pixel.
  a = jnp.asarray([[0.0, 0.0, 2.0], [16.0, 0.0, 6.0], [0.0, 16.0, 2.0], [16.0, 16.0, 6.0]])
  b = a.at[:, 2].set(jnp.array([6.0, 2.0, 6.0, 2.0]))
  screen = jnp.concatenate([a, b])
  triangles = jnp.array([[0, 1, 2], [1, 3, 2], [4, 5, 6], [5, 7, 6]], jnp.int32)
  frags = rasterize(screen, triangles, 16, perspective_correct=False)
  left = np.asarray(frags.triangle_id[:, :8]) < 2  # depth of a is 2 + x / 4: nearer for x < 8
  right = np.asarray(frags.triangle_id[:, 8:]) >= 2
  assert left.all() and right.all()
  x = np.arange(16) + 0.5
  np.testing.assert_allclose(np.asarray(frags.depth), np.broadcast_to(np.minimum(2 + x / 4, 6 - x / 4), (16, 16)), 1e-6)


def test_plane_facing_the_camera_projects_to_the_expected_rectangle():
  resolution, z, (x0, x1), (y0, y1) = 64, 0.5, (-0.5, 0.4), (0.1, 0.6)
  corners = jnp.asarray([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])  # counter-clockwise, facing +z
  camera = Camera.deep3d(resolution)
  frags = rasterize(camera.project(corners), jnp.array([[0, 1, 2], [0, 2, 3]]), resolution)
  focal, depth = 1015.0 * resolution / 224, 10.0 - z
  cols = resolution / 2 + focal * np.array([x0, x1]) / depth  # u
  rows = resolution - (resolution / 2 + focal * np.array([y1, y0]) / depth)  # H - v: top edge from y1
  centres = np.arange(resolution) + 0.5
  assert np.abs(centres[:, None] - np.concatenate([cols, rows])).min() > 1e-2  # no centre on an edge
  in_cols, in_rows = (centres >= cols[0]) & (centres <= cols[1]), (centres >= rows[0]) & (centres <= rows[1])
  expected = in_rows[:, None] & in_cols[None, :]
  np.testing.assert_array_equal(np.asarray(frags.mask[..., 0]) > 0, expected)
  assert expected.sum() > 100 and np.nonzero(in_rows)[0].max() < resolution / 2  # y > 0 is the upper half
  np.testing.assert_allclose(np.asarray(frags.depth)[expected], depth, rtol=1e-6)


def test_perspective_interpolation_of_a_linear_attribute_is_exact():
  # A tilted triangle; interpolating world positions must land on the ray through each pixel centre.
  world = jnp.asarray([[-0.8, -0.6, 1.5], [0.9, -0.4, -2.0], [0.1, 0.8, 0.3]])
  camera = Camera.deep3d(48)
  screen = camera.project(world)
  frags = rasterize(screen, TRI, 48)
  points = interpolate(world, TRI, frags)
  covered = np.asarray(frags.mask[..., 0]) > 0
  assert covered.sum() > 100
  reprojected = np.asarray(camera.project(points))[covered]
  i, j = np.nonzero(covered)
  np.testing.assert_allclose(reprojected[:, 0], j + 0.5, atol=2e-3)
  np.testing.assert_allclose(reprojected[:, 1], i + 0.5, atol=2e-3)
  np.testing.assert_allclose(np.asarray(frags.depth)[covered], 10.0 - np.asarray(points)[covered][:, 2], rtol=1e-5)
  normal = np.cross(world[1] - world[0], world[2] - world[0])
  np.testing.assert_allclose((np.asarray(points)[covered] - world[0]) @ normal, 0.0, atol=1e-5)
  # Screen-linear interpolation (orthographic use) reproduces screen-linear attributes exactly.
  frags = rasterize(screen, TRI, 48, perspective_correct=False)
  pixel = interpolate(screen[:, :2], TRI, frags)
  np.testing.assert_allclose(np.asarray(pixel)[covered], np.stack([j + 0.5, i + 0.5], -1), atol=1e-3)
  np.testing.assert_allclose(np.asarray(frags.barycentric.sum(-1))[covered], 1.0, rtol=1e-6)


def test_interpolation_is_differentiable_in_attributes_and_vertices():
  screen = _screen_triangle([(1.0, 1.0), (7.2, 1.0), (1.0, 7.2)])

  def loss(screen, color):
    return jnp.sum(interpolate(color, TRI, rasterize(screen, TRI, (9, 10))) * jnp.arange(9.0)[:, None, None])

  g_screen, g_color = jax.grad(loss, argnums=(0, 1))(screen, jnp.ones((3, 1)))
  assert np.all(np.isfinite(g_screen)) and np.abs(np.asarray(g_screen)[:, :2]).sum() > 0
  covered_per_row = rasterize(screen, TRI, (9, 10)).mask[..., 0].sum(-1)
  np.testing.assert_allclose(float(g_color.sum()), float(jnp.sum(jnp.arange(9.0) * covered_per_row)), rtol=1e-5)


def test_batched_leading_axes_match_one_by_one():
  screens = jnp.stack(
    [_screen_triangle([(1.0, 1.0), (7.2, 1.0), (1.0, 7.2)], d) for d in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0)]
  ).reshape(2, 3, 3, 3)
  screens = screens.at[1, :, :, 0].add(1.5)  # the second row of the batch moved right
  frags = rasterize(screens, TRI, (9, 10))
  assert frags.triangle_id.shape == (2, 3, 9, 10) and frags.mask.shape == (2, 3, 9, 10, 1)
  for a in range(2):
    for b in range(3):
      single = rasterize(screens[a, b], TRI, (9, 10))
      np.testing.assert_array_equal(np.asarray(frags.triangle_id[a, b]), np.asarray(single.triangle_id))
      np.testing.assert_allclose(np.asarray(frags.depth[a, b]), np.asarray(single.depth), rtol=1e-6)
  assert not np.array_equal(np.asarray(frags.mask[0, 0]), np.asarray(frags.mask[1, 0]))


# --- camera, rotation, lighting: Deep3DFaceRecon's conventions ---------------------------------------------


def test_camera_scales_deep3dfacerecon_intrinsics():
  camera = Camera.deep3d(256)
  assert (camera.focal, camera.cx, camera.cy) == pytest.approx((1015 * 256 / 224, 128.0, 128.0))
  column, row, depth = np.asarray(camera.project(jnp.asarray([0.3, 0.2, 1.0])))
  assert depth == pytest.approx(9.0)
  assert column == pytest.approx(128 + camera.focal * 0.3 / 9.0, rel=1e-6)
  assert row == pytest.approx(256 - (128 + camera.focal * 0.2 / 9.0), rel=1e-6)  # y up in the world, rows down


def test_rotation_matches_hand_computed_axes():
  point = jnp.array([1.0, 2.0, 3.0])
  quarter = math.pi / 2
  cases = {  # world = R_z R_y R_x p, applied by Deep3DFaceRecon as p @ M with M = R^T
    (quarter, 0.0, 0.0): [1.0, -3.0, 2.0],  # x-axis: y -> z
    (0.0, quarter, 0.0): [3.0, 2.0, -1.0],  # y-axis: z -> x
    (0.0, 0.0, quarter): [-2.0, 1.0, 3.0],  # z-axis: x -> y
    (quarter, 0.0, quarter): [3.0, 1.0, 2.0],  # x first, then z
  }
  for angles, expected in cases.items():
    np.testing.assert_allclose(np.asarray(point @ compute_rotation(jnp.asarray(angles))), expected, atol=1e-6)


def test_rotation_matches_deep3dfacerecon():
  import torch

  angles = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  ours = np.asarray(compute_rotation(jnp.asarray(angles)))
  np.testing.assert_allclose(ours, _d3d_rotation(torch.from_numpy(angles)).numpy(), atol=1e-6)
  np.testing.assert_allclose(ours @ np.swapaxes(ours, -1, -2), np.broadcast_to(np.eye(3), (5, 3, 3)), atol=1e-6)
  assert compute_rotation(jnp.zeros((2, 4, 3))).shape == (2, 4, 3, 3)


def test_sh_lighting_of_a_known_normal():
  up = jnp.array([[0.0, 0.0, 1.0]])
  ambient = 0.8 * math.pi / math.sqrt(4 * math.pi)  # init_lit 0.8 times a0 c0
  np.testing.assert_allclose(np.asarray(sh_irradiance(up, jnp.zeros(27))), [[ambient] * 3], rtol=1e-6)
  gamma = jnp.zeros(27).at[2].set(0.5).at[9 + 3].set(0.25)  # red band 2 (z), green band 3 (-x)
  a1c1 = 2 * math.pi / math.sqrt(3.0) * math.sqrt(3.0) / math.sqrt(4 * math.pi)
  np.testing.assert_allclose(np.asarray(sh_irradiance(up, gamma)), [[ambient + 0.5 * a1c1, ambient, ambient]], 1e-6)
  left = jnp.array([[-1.0, 0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(sh_irradiance(left, gamma))[0, 1], ambient + 0.25 * a1c1, rtol=1e-6)


def test_sh_color_matches_deep3dfacerecon():
  import torch

  rng = np.random.default_rng(1)
  normals = rng.normal(size=(2, 7, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  albedo, gamma = rng.random((2, 7, 3)).astype(np.float32), rng.normal(size=(2, 27)).astype(np.float32)
  ours = sh_color(jnp.asarray(albedo), jnp.asarray(normals), jnp.asarray(gamma))
  ref = _d3d_color(*(torch.from_numpy(a) for a in (albedo, normals, gamma)))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="27"):
    sh_irradiance(jnp.asarray(normals), jnp.zeros((2, 26)))


def test_normals_match_deep3dfacerecon_with_and_without_point_buf(model):
  import dataclasses

  import torch

  shape = compute_shape(model, jnp.asarray(_coeffs(2)[:, :80]), jnp.asarray(_coeffs(2, 1)[:, 80:144]))
  buf = _point_buf(model.triangles, model.num_vertices)
  with_buf = compute_normals(dataclasses.replace(model, point_buf=jnp.asarray(buf, jnp.int32)), shape)
  ref = _d3d_norm(torch.from_numpy(np.array(shape)), torch.from_numpy(np.array(model.triangles)).long(), buf)
  np.testing.assert_allclose(np.asarray(with_buf), ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(compute_normals(model, shape)), ref.numpy(), atol=1e-5)
  centre = int(np.argmax(np.asarray(model.mean_shape)[:, 2] - np.abs(np.asarray(model.mean_shape)[:, 0])))
  assert float(compute_normals(model, model.mean_shape)[centre, 2]) > 0.5  # counter-clockwise: towards the camera


def test_face_pipeline_matches_deep3dfacerecon(model):
  """Vertices, colours and landmarks of Deep3DFaceRecon's compute_for_render on the same model."""
  import torch

  coeffs = _coeffs(3)
  c = {k: torch.from_numpy(v) for k, v in coefficients.split(coeffs).items()}
  t = lambda a: torch.from_numpy(np.array(a))
  shape = (t(model.identity_basis) @ c["identity"].T + t(model.expression_basis) @ c["expression"].T).T
  shape = shape.reshape(3, -1, 3) + t(model.mean_shape)
  rot = _d3d_rotation(c["angle"])
  world = shape @ rot + c["translation"][:, None]
  texture = ((t(model.texture_basis) @ c["texture"].T).T.reshape(3, -1, 3) + t(model.mean_texture)) / 255.0
  buf = _point_buf(model.triangles, model.num_vertices)
  color = _d3d_color(texture, _d3d_norm(shape, t(model.triangles).long(), buf) @ rot, c["gamma"])
  cam = torch.cat([world[..., :2], 10.0 - world[..., 2:]], -1)  # to_camera
  proj = cam @ torch.tensor([[1015.0, 0, 112], [0, 1015.0, 112], [0, 0, 1]]).T  # persc_proj
  landmarks = (proj[..., :2] / proj[..., 2:])[:, np.array(model.keypoints)]

  geometry = geometry_jit(model, jnp.asarray(coeffs))
  np.testing.assert_allclose(np.asarray(geometry["vertices"]), world.numpy(), atol=1e-5)
  texture_ours = compute_texture(model, jnp.asarray(coeffs[:, 144:224]))
  np.testing.assert_allclose(np.asarray(texture_ours), texture.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(colors_jit(model, geometry)), color.clamp(0, 1).numpy(), atol=1e-5)
  ours = np.asarray(jax.jit(project_keypoints, static_argnums=2)(model, jnp.asarray(coeffs), 224))
  np.testing.assert_allclose(ours, np.stack([landmarks[..., 0], 224 - landmarks[..., 1]], -1), atol=1e-3)


# --- the render I_R -----------------------------------------------------------------------------------------


def _centroid(mask):
  rows, cols = np.nonzero(np.asarray(mask)[..., 0])
  return rows.mean(), cols.mean()


def test_synthetic_face_renders_centred_and_follows_translation(model):
  neutral = np.zeros((5, 257), np.float32)
  neutral[1:, 256] = -5.0  # 15 units from the camera, so that moved faces stay inside the image
  neutral[2, 254] = 0.5  # +x: right
  neutral[3, 255] = 0.5  # +y: up
  neutral[4, 256] = -3.0  # +z: towards the camera, larger
  images, mask = render_jit(model, neutral, 64)
  assert images.shape == (5, 64, 64, 3) and mask.shape == (5, 64, 64, 1)
  assert float(images.min()) >= 0 and float(images.max()) <= 1
  np.testing.assert_array_equal(np.asarray(images)[np.asarray(mask[..., 0]) == 0], 0.0)  # black background
  area = np.asarray(mask).sum(axis=(1, 2, 3))
  assert 0.2 * 64 * 64 < area[0] < 0.7 * 64 * 64
  row, col = _centroid(mask[0])
  assert abs(row - 32) < 3 and abs(col - 32) < 2  # the face's extent is centred; its mass a little off
  row, col = _centroid(mask[1])
  assert abs(row - 32) < 3 and abs(col - 32) < 2
  shift = 1015 * 64 / 224 * 0.5 / 15  # focal * t / distance, in pixels
  assert _centroid(mask[2])[1] - col == pytest.approx(shift, rel=0.1)
  assert row - _centroid(mask[3])[0] == pytest.approx(shift, rel=0.1)
  assert area[4] == pytest.approx(area[1] * (15 / 13) ** 2, rel=0.1)
  lit = np.asarray(images[0])[np.asarray(mask[0, ..., 0]) > 0]
  assert lit.mean() > 0.3 and lit.std() > 0.01  # shaded, not a flat silhouette


def test_render_is_batched_over_leading_axes(model):
  coeffs = _coeffs(4, seed=2, width=261).reshape(2, 2, 261)
  images, mask = render_jit(model, coeffs, 32)
  assert images.shape == (2, 2, 32, 32, 3) and mask.shape == (2, 2, 32, 32, 1)
  single, single_mask = render_jit(model, coeffs[1, 0], 32)
  np.testing.assert_allclose(np.asarray(images[1, 0]), np.asarray(single), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mask[1, 0]), np.asarray(single_mask))
  assert not np.array_equal(np.asarray(mask[0, 0]), np.asarray(mask[1, 0]))


def test_shadings_differ_and_unknown_shading_is_refused(model):
  geometry = geometry_jit(model, jnp.asarray(_coeffs(1)))
  sh, gray, lambert = (colors_jit(model, geometry, s) for s in ("sh", "gray", "lambert"))
  assert not np.allclose(np.asarray(sh), np.asarray(gray)) and not np.allclose(np.asarray(gray), np.asarray(lambert))
  with pytest.raises(ValueError, match="shading 'phong' unknown"):
    vertex_colors(model, geometry, "phong")


# --- coefficients, model files -------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [256, 258, 262])
def test_coefficient_width_error_names_got_and_accepted(width):
  with pytest.raises(ValueError, match=rf"{width} columns.*257.*261"):
    coefficients.split(jnp.zeros((1, width)))


def test_coefficients_split_join_round_trip():
  coeffs = jnp.arange(2 * 3 * 261, dtype=jnp.float32).reshape(2, 3, 261)
  groups = coefficients.split(coeffs)
  assert {k: v.shape[-1] for k, v in groups.items()} == coefficients.GROUP_WIDTHS
  assert groups["angle"][0, 0].tolist() == [224, 225, 226] and groups["gaze"][0, 0].tolist() == [257, 258, 259, 260]
  np.testing.assert_array_equal(np.asarray(coefficients.join(groups)), np.asarray(coeffs))
  without_gaze = {k: v for k, v in groups.items() if k != "gaze"}
  assert coefficients.join(without_gaze).shape == (2, 3, 257)
  with pytest.raises(ValueError, match="missing \\['expression'\\]"):
    coefficients.join({k: v for k, v in without_gaze.items() if k != "expression"})
  with pytest.raises(ValueError, match="'angle'.*expected last dimension 3"):
    coefficients.join({**without_gaze, "angle": jnp.zeros((2, 3, 4))})


def test_bfm_mat_loader_reads_deep3dfacerecon_layout(tmp_path, model):
  from scipy.io import savemat

  n = model.num_vertices
  offset = np.array([0.1, -0.2, 0.3], np.float32)  # an uncentred mean shape, as in the file
  buf = _point_buf(model.triangles, n)
  savemat(
    tmp_path / "BFM_model_front.mat",
    {
      "meanshape": (np.asarray(model.mean_shape) + offset).reshape(1, -1),
      "idBase": np.asarray(model.identity_basis),
      "exBase": np.asarray(model.expression_basis),
      "meantex": np.asarray(model.mean_texture).reshape(1, -1),
      "texBase": np.asarray(model.texture_basis),
      "tri": np.asarray(model.triangles, np.float64) + 1,  # 1-based, stored as doubles like the release file
      "point_buf": buf + 1,  # 0 = no triangle
      "keypoints": (np.asarray(model.keypoints) + 1)[:, None],
      "skinmask": np.ones((1, n)),
    },
  )
  loaded = load_bfm(tmp_path / "BFM_model_front.mat")
  np.testing.assert_allclose(np.asarray(loaded.mean_shape), np.asarray(model.mean_shape), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(loaded.triangles), np.asarray(model.triangles))
  np.testing.assert_array_equal(np.asarray(loaded.point_buf), buf)
  np.testing.assert_array_equal(np.asarray(loaded.keypoints), np.asarray(model.keypoints))
  np.testing.assert_array_equal(np.asarray(loaded.texture_basis), np.asarray(model.texture_basis))
  np.testing.assert_allclose(
    np.asarray(compute_normals(loaded, loaded.mean_shape)),
    np.asarray(compute_normals(model, model.mean_shape)),
    atol=1e-5,
  )
  raw = load_bfm(tmp_path / "BFM_model_front.mat", recenter=False)
  np.testing.assert_allclose(np.asarray(raw.mean_shape).mean(0), offset, atol=1e-5)


def test_bfm_mat_loader_errors_name_the_problem(tmp_path):
  from scipy.io import savemat

  with pytest.raises(CheckpointReadError, match="cannot read"):
    load_bfm(tmp_path / "missing.mat")
  (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
  with pytest.raises(CheckpointReadError, match="junk.mat"):
    load_bfm(tmp_path / "junk.mat")
  savemat(tmp_path / "partial.mat", {"meanshape": np.zeros((1, 9)), "tri": np.ones((1, 3))})
  with pytest.raises(CheckpointReadError, match="missing keys \\['idBase', 'exBase', 'meantex', 'texBase'\\]"):
    load_bfm(tmp_path / "partial.mat")
  savemat(
    tmp_path / "shapes.mat",
    {
      "meanshape": np.zeros((1, 9)),
      "idBase": np.zeros((9, 80)),
      "exBase": np.zeros((9, 63)),
      "meantex": np.zeros((1, 9)),
      "texBase": np.zeros((9, 80)),
      "tri": np.ones((1, 3)),
    },
  )
  with pytest.raises(CheckpointReadError, match="expression_basis has shape \\(9, 63\\); expected \\(9, 64\\)"):
    load_bfm(tmp_path / "shapes.mat")


def test_from_mesh_renders_a_plain_mesh():
  vertices = [[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]]
  mesh = from_mesh(vertices, [[0, 1, 2], [0, 2, 3]])
  images, mask = render_jit(mesh, np.zeros((1, 257), np.float32), 32)
  side = 1015 * 32 / 224 / 10  # 1 unit wide at distance 10
  assert float(mask.sum()) == pytest.approx(side**2, rel=0.1)
  facing = float(images[0, 16, 16, 0])
  assert facing == pytest.approx(200 / 255 * 0.8 * math.sqrt(math.pi) / 2, rel=1e-4)  # flat albedo, ambient SH
  with pytest.raises(ValueError, match="triangles index vertices 0..4"):
    from_mesh(vertices, [[0, 1, 4]])
