"""3DMM and renderer for MIMAFace's motion representation: coefficients, the BFM, a JAX rasterizer, I_R."""

from mimajax.face3d import coefficients
from mimajax.face3d.camera import Camera
from mimajax.face3d.landmark_model import (
  LANDMARK_KEYPOINTS,
  NUM_LANDMARKS,
  canonical_face_mesh,
  landmark_face_model,
  load_face_model,
  save_face_model,
)
from mimajax.face3d.lighting import lambert_color, sh_color, sh_irradiance
from mimajax.face3d.morphable_model import (
  MorphableModel,
  compute_normals,
  compute_rotation,
  compute_shape,
  compute_texture,
  from_mesh,
  load_bfm,
  transform,
)
from mimajax.face3d.rasterizer import Fragments, interpolate, rasterize
from mimajax.face3d.render import face_geometry, project_keypoints, render_coefficients, vertex_colors
from mimajax.face3d.synthetic import synthetic_model

__all__ = [
  "LANDMARK_KEYPOINTS",
  "NUM_LANDMARKS",
  "canonical_face_mesh",
  "landmark_face_model",
  "load_face_model",
  "save_face_model",
  "Camera",
  "Fragments",
  "MorphableModel",
  "coefficients",
  "compute_normals",
  "compute_rotation",
  "compute_shape",
  "compute_texture",
  "face_geometry",
  "from_mesh",
  "interpolate",
  "lambert_color",
  "load_bfm",
  "project_keypoints",
  "rasterize",
  "render_coefficients",
  "sh_color",
  "sh_irradiance",
  "synthetic_model",
  "transform",
  "vertex_colors",
]
