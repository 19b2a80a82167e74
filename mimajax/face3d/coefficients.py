"""3DMM coefficient layout (MIMAFace's motion intermediate, section "Motion Representation"): Deep3DFaceRecon's 257.

Columns of one row of coefficients (`models/bfm.py` `split_coeff` in sicxu/Deep3DFaceRecon_pytorch):

  identity    0:80    shape basis weights (alpha)
  expression  80:144  expression basis weights (beta)
  texture     144:224 albedo basis weights (delta)
  angle       224:227 Euler angles (x, y, z) in radians
  gamma       227:254 spherical-harmonics lighting, 9 bands x RGB, stored as (3, 9): all R bands first
  translation 254:257 (x, y, z) in model units, before the camera's z -> 10 - z
  gaze        257:261 the MIMAFace release's 4 gaze values (its D3DFR net outputs 257 + 4), absent from 257-wide rows

This module is the canonical home of the layout; MIA and the data pipeline use it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

COEFFICIENT_SLICES = {
  "identity": (0, 80),
  "expression": (80, 144),
  "texture": (144, 224),
  "angle": (224, 227),
  "gamma": (227, 254),
  "translation": (254, 257),
  "gaze": (257, 261),
}
# What a driving row contributes when it animates a source (the rest, identity, texture and lighting, is the
# source's): `mimajax animate`'s blend and the release's source-blended training rows.
MOTION_GROUPS = ("expression", "angle", "translation", "gaze")
COEFFICIENT_WIDTHS = (257, 261)  # Deep3DFaceRecon; the MIMAFace release with gaze
BASE_WIDTH = 257
GROUP_WIDTHS = {name: b - a for name, (a, b) in COEFFICIENT_SLICES.items()}


def split(coeffs: jax.Array) -> dict[str, jax.Array]:
  """(..., 257 | 261) coefficients -> {group: (..., width)}; "gaze" only for 261 columns."""
  width = coeffs.shape[-1]
  if width not in COEFFICIENT_WIDTHS:
    raise ValueError(
      f"3DMM coefficients have {width} columns (shape {tuple(coeffs.shape)}); expected 257 "
      "(Deep3DFaceRecon: id, exp, tex, angle, gamma, trans) or 261 (the release's, with gaze at 257:261)"
    )
  return {name: coeffs[..., a:b] for name, (a, b) in COEFFICIENT_SLICES.items() if b <= width}


def join(groups: Mapping[str, jax.Array]) -> jax.Array:
  """{group: (..., width)} -> (..., 257), or (..., 261) when "gaze" is given; the inverse of `split`."""
  names = [n for n in COEFFICIENT_SLICES if n != "gaze" or "gaze" in groups]
  missing = [n for n in names if n not in groups]
  unknown = sorted(set(groups) - set(COEFFICIENT_SLICES))
  if missing or unknown:
    raise ValueError(
      f"3DMM coefficient groups: missing {missing}, unknown {unknown}; expected {list(COEFFICIENT_SLICES)} "
      "(gaze optional)"
    )
  parts = [jnp.asarray(groups[n]) for n in names]
  for name, part in zip(names, parts):
    if part.ndim == 0 or part.shape[-1] != GROUP_WIDTHS[name]:
      raise ValueError(
        f"3DMM coefficient group {name!r} has shape {tuple(part.shape)}; expected last dimension {GROUP_WIDTHS[name]}"
      )
  lead = jnp.broadcast_shapes(*(p.shape[:-1] for p in parts))
  return jnp.concatenate([jnp.broadcast_to(p, lead + p.shape[-1:]) for p in parts], axis=-1)


def zeros(*lead: int, gaze: bool = False) -> jax.Array:
  """Neutral coefficients (mean shape, mean albedo, frontal, ambient light, at the origin): (*lead, 257 | 261)."""
  return jnp.zeros((*lead, COEFFICIENT_WIDTHS[int(gaze)]), jnp.float32)
