"""Pixels and coefficients -> the model's inputs: the one path shared by training, sampling and export.

  frames (B, [F,] H, W, 3) uint8 or [0, 1]   -> `encode_frames`   -> scaled VAE latents (B, [F,] H/s, W/s, 4)
  coefficients (B, [F,] 257 | 261)           -> `render_latents`  -> I_R rendered, VAE-encoded the same way
  source frame (B, H', W', 3)                -> `clip_source`     -> [0, 1] at CLIP's resolution (224)
(s = `vae_scale(vae)` pixels per latent: 8 for SD's VAE.)

The render condition I_R is drawn by the JAX rasterizer at the frames' resolution and encoded with the
(frozen) VAE posterior mean, as the release encodes its renders; target frames are encoded the same way
(the mean: the noise the diffusion objective adds dominates the posterior's std). Every function works on
any leading axes and is jittable; the VAE sees one flat batch, so a clip of F frames is F images.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mimajax.face3d.coefficients import COEFFICIENT_SLICES, MOTION_GROUPS
from mimajax.face3d.morphable_model import MorphableModel
from mimajax.face3d.render import render_coefficients
from mimajax.models.vae import AutoencoderKL


def vae_scale(vae: AutoencoderKL) -> int:
  """Pixels per latent: 8 for SD's VAE (one downsampling per block but the last)."""
  return 2 ** (len(vae.config.block_out_channels) - 1)


def to_unit(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _flat_images(images: jax.Array, what: str) -> tuple[jax.Array, tuple[int, ...]]:
  if images.ndim < 4 or images.shape[-1] != 3:
    raise ValueError(f"{what}: expected images (B, [F,] H, W, 3); got shape {images.shape}")
  lead = images.shape[:-3]
  return images.reshape((-1,) + images.shape[-3:]), lead


def encode_frames(vae: AutoencoderKL, frames: jax.Array) -> jax.Array:
  """Frames (..., H, W, 3) uint8 or [0, 1] -> scaled latents (..., H/8, W/8, 4) (posterior mean)."""
  flat, lead = _flat_images(frames, "encode_frames")
  latents = vae.encode_latents(to_unit(flat) * 2.0 - 1.0)
  return latents.reshape(lead + latents.shape[1:])


def decode_frames(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """Scaled latents (..., h, w, 4) -> frames (..., 8h, 8w, 3) in [0, 1] (clipped)."""
  lead = latents.shape[:-3]
  images = vae.decode_latents(latents.reshape((-1,) + latents.shape[-3:]))
  return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0).reshape(lead + images.shape[1:])


def render_images(face_model: MorphableModel, coeffs: jax.Array, resolution: int, shading: str = "sh") -> jax.Array:
  """Coefficients (..., D) -> I_R (..., resolution, resolution, 3) in [0, 1], black background."""
  images, _ = render_coefficients(face_model, coeffs, resolution, shading=shading)
  return images


def render_latents(vae: AutoencoderKL, face_model: MorphableModel, coeffs: jax.Array, resolution: int,
                   shading: str = "sh") -> jax.Array:  # fmt: skip
  """Coefficients (..., D) -> scaled VAE latents of their render (..., resolution/8, resolution/8, 4)."""
  return encode_frames(vae, render_images(face_model, coeffs, resolution, shading))


def clip_source(source: jax.Array, size: int) -> jax.Array:
  """Source portraits (B, H, W, 3) uint8 or [0, 1] -> (B, size, size, 3) in [0, 1] (antialiased resize)."""
  if source.ndim != 4 or source.shape[-1] != 3:
    raise ValueError(f"clip_source: expected (B, H, W, 3) source images; got shape {source.shape}")
  images = to_unit(source)
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)
  return jnp.clip(images, 0.0, 1.0)


def blend_with_source(source: jax.Array, rows: jax.Array) -> jax.Array:
  """Source rows (B, W) and target rows (B, W) or (B, F, W) -> the targets' expression, pose and gaze on the
  sources' identity, texture and lighting (jittable; the in-step twin of mimaface.driving.blend's "absolute")."""
  src = source[:, None] if rows.ndim == 3 else source
  out = jnp.broadcast_to(src, rows.shape)
  for name in MOTION_GROUPS:
    lo, hi = COEFFICIENT_SLICES[name]
    if hi <= rows.shape[-1]:
      out = out.at[..., lo:hi].set(rows[..., lo:hi])
  return out


def model_batch(
  vae: AutoencoderKL,
  face_model: MorphableModel,
  batch: Mapping[str, Any],
  *,
  clip_size: int,
  coefficient_dim: int | None = None,
  shading: str = "sh",
  blend_source: bool = False,
) -> dict[str, jax.Array]:
  """A loader batch (frames, source_frame, motion, identity[, latents, render_latents]) -> a MIMAFace batch.

  blend_source (the release's training): the rows MIA reads and the renderer draws are the source frame's identity,
  texture and lighting with each target frame's expression, pose and gaze (`blend_with_source`; needs the batch's
  `source_motion`), as `mimajax animate` blends a driver into a portrait.

  Precomputed `latents` / `render_latents` in the loader batch are used as they are; otherwise frames
  and coefficients are encoded here, inside the step (the VAE and the renderer are frozen: no gradients).
  """
  missing = [k for k in ("source_frame", "motion", "identity") if k not in batch]
  if "latents" not in batch and "frames" not in batch:
    missing.append("frames (or latents)")
  if missing:
    raise ValueError(f"the training batch lacks {missing}; it has {sorted(batch)}")
  motion = jnp.asarray(batch["motion"], jnp.float32)
  if blend_source:
    if "source_motion" not in batch:
      raise ValueError(f"blend_source needs the batch's source_motion; it has {sorted(batch)}")
    motion = blend_with_source(jnp.asarray(batch["source_motion"], jnp.float32), motion)
  if coefficient_dim is not None:
    motion = motion[..., :coefficient_dim]
  if "latents" in batch:
    latents = batch["latents"]
  else:
    latents = encode_frames(vae, batch["frames"])
  if "render_latents" in batch:
    renders = batch["render_latents"]
  else:
    resolution = latents.shape[-2] * vae_scale(vae)
    renders = render_latents(vae, face_model, motion if blend_source else batch["motion"], resolution, shading)
  out = dict(
    source=clip_source(batch["source_frame"], clip_size),
    motion=motion,
    latents=jax.lax.stop_gradient(latents),
    render_latents=jax.lax.stop_gradient(renders),
    identity=jnp.asarray(batch["identity"], jnp.int32),
  )
  if "face_features" in batch:
    out["face_features"] = batch["face_features"]
  return out
