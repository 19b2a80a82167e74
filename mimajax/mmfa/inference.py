"""A trained MMFA generator for inference: loaded from a workdir or step folder (parameters + BatchNorm statistics,
eval mode), and the jitted pieces `animate` and `evaluate` drive it with.

  encode_source(crop, R_s)          -> Source: f_s (appearance volume), x_c, the source's Motion, f_exp_s
  motion(crops, R)                  -> the drivers' Motions (eq. 5 parameters) for the source's x_c, and f_exp
  render(source, motions)           -> frames: dense motion, warp, the multi-scale generator's finest output

Everything is batch-first; drivers run in chunks of `CHUNK` frames (one compiled shape).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import checkpointing
from mimajax.convert.state_dict import merge_params
from mimajax.face3d import coefficients as coefficient_layout
from mimajax.mmfa import keypoints
from mimajax.mmfa.model import MMFA

log = logging.getLogger("mimajax.mmfa")
GROUP = "generator"
CHUNK = 8  # driver frames per compiled call


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Source:
  """What the source contributes to every frame."""

  features: jax.Array  # f_s (1, D, H, W, C)
  canonical: jax.Array  # x_c (1, K, 3)
  motion: keypoints.Motion  # its own eq. 5 parameters
  expression: jax.Array  # f_exp (1, d)

  def keypoints(self) -> jax.Array:
    return keypoints.keypoints_from_motion(self.canonical, self.motion)


def rotations_from_rows(rows) -> jax.Array:
  """R (T, 3, 3) in the keypoint frame from coefficient rows (T, >= 257) (their Deep3DFaceRecon angles)."""
  rows = jnp.asarray(rows, jnp.float32)
  a, b = coefficient_layout.COEFFICIENT_SLICES["angle"]
  return keypoints.rotation_from_deep3d(rows[..., a:b])


def to_images(crops, resolution: int) -> jax.Array:
  """uint8 crops (T, h, w, 3) -> float images (T, R, R, 3) in [0, 1] at the model's resolution (antialiased)."""
  x = jnp.asarray(crops, jnp.float32) / 255.0
  if x.shape[1:3] != (resolution, resolution):
    x = jax.image.resize(x, (x.shape[0], resolution, resolution, 3), "linear", antialias=True)
  return x


class Inference:
  """An MMFA generator in eval mode and its jitted pieces."""

  def __init__(self, model: MMFA, config: Any, step_dir: Path | None = None):
    model.eval()  # BatchNorm on running statistics, the discriminator's spectral norm not stepped
    self.model, self.config, self.step_dir = model, config, step_dir
    self.resolution = int(config.data.resolution)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode_source(state, image, rotation):
      m = nnx.merge(graphdef, state)
      x_c = m.canonical(image)
      motion, f_exp = m.motion(image, rotation, x_c)
      return Source(m.features(image), x_c, motion, f_exp)

    @jax.jit
    def encode(state, images):
      m = nnx.merge(graphdef, state)
      head = m.head_estimator(images)
      f_exp = m.expression_encoder(images)
      return head, f_exp

    @jax.jit
    def motion_from_code(state, f_exp, head, rotations, canonical):
      m = nnx.merge(graphdef, state)
      canonical = jnp.broadcast_to(canonical, (len(f_exp),) + canonical.shape[1:])
      return m.motion_from_code(f_exp, head, rotations, canonical)

    @jax.jit
    def render(state, source: Source, motions: keypoints.Motion):
      m = nnx.merge(graphdef, state)
      n = motions.rotation.shape[0]
      canonical = jnp.broadcast_to(source.canonical, (n,) + source.canonical.shape[1:])
      kp_driving = keypoints.keypoints_from_motion(canonical, motions)
      kp_source = jnp.broadcast_to(source.keypoints(), kp_driving.shape)
      features = jnp.broadcast_to(source.features, (n,) + source.features.shape[1:])
      return m.generate(features, kp_source, kp_driving)["prediction"]

    self._state = state
    self._encode_source, self._encode, self._motion_from_code, self._render = (
      encode_source, encode, motion_from_code, render,
    )  # fmt: skip

  # ------------------------------------------------------------------------------------------------ pieces
  def encode_source(self, crop: np.ndarray, rotation) -> Source:
    image = to_images(np.asarray(crop)[None], self.resolution)
    return self._encode_source(self._state, image, jnp.asarray(rotation, jnp.float32).reshape(1, 3, 3))

  def codes(self, crops: np.ndarray) -> tuple[dict, jax.Array]:
    """The drivers' head outputs (s, t, pose bins) and expression codes f_exp, chunk by chunk."""
    heads, codes = [], []
    for i in range(0, len(crops), CHUNK):
      images = _pad(to_images(np.asarray(crops[i : i + CHUNK]), self.resolution), CHUNK)
      head, f_exp = self._encode(self._state, images)
      n = min(CHUNK, len(crops) - i)
      heads.append(jax.tree.map(lambda x, n=n: x[:n], head))
      codes.append(f_exp[:n])
    return jax.tree.map(lambda *x: jnp.concatenate(x), *heads), jnp.concatenate(codes)

  def motions(self, source: Source, f_exp: jax.Array, head: dict, rotations: jax.Array) -> keypoints.Motion:
    """eq. 4-5 parameters of each driver frame for the source's canonical keypoints."""
    out = []
    for i in range(0, len(f_exp), CHUNK):
      n = min(CHUNK, len(f_exp) - i)
      sl = lambda x, i=i: _pad(x[i : i + CHUNK], CHUNK)
      m = self._motion_from_code(self._state, sl(f_exp), jax.tree.map(sl, head), sl(rotations), source.canonical)
      out.append(jax.tree.map(lambda x, n=n: x[:n], m))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *out)

  def render(self, source: Source, motions: keypoints.Motion) -> np.ndarray:
    """Frames (T, R, R, 3) uint8 for the given motions."""
    frames = []
    total = motions.rotation.shape[0]
    for i in range(0, total, CHUNK):
      n = min(CHUNK, total - i)
      chunk = jax.tree.map(lambda x, i=i: _pad(x[i : i + CHUNK], CHUNK), motions)
      frames.append(np.asarray(self._render(self._state, source, chunk))[:n])
    return (np.clip(np.concatenate(frames), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

  def animate(self, source_crop: np.ndarray, source_rotation, driver_crops: np.ndarray, driver_rotations, *,
              relative: bool = False) -> np.ndarray:  # fmt: skip
    """The source driven by every driver frame: absolute (the paper's: the driver's R, s, t and expression on the
    source's canonical keypoints) or relative (the driver's change since its first frame, `relative_motion`)."""
    source = self.encode_source(source_crop, source_rotation)
    head, f_exp = self.codes(driver_crops)
    motions = self.motions(source, f_exp, head, jnp.asarray(driver_rotations, jnp.float32))
    return self.render(source, relative_to_first(source, motions) if relative else motions)


def relative_to_first(source: Source, motions: keypoints.Motion) -> keypoints.Motion:
  """Each driver frame's change since the first frame, applied to the source's own parameters."""
  first = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), motions)
  own = jax.tree.map(lambda x: jnp.broadcast_to(x, first.rotation.shape[:1] + x.shape[1:]), source.motion)
  return keypoints.relative_motion(own, motions, first)


def _pad(x: jax.Array, n: int) -> jax.Array:
  """`x` padded along its first axis to `n` rows by repeating its last row (one compiled shape per chunk)."""
  if x.shape[0] == n:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], n - x.shape[0], axis=0)])


def load_inference(path: str | Path, *, use_ema: bool = True) -> Inference:
  """An MMFA workdir (its newest intact step) or step folder, strictly: every parameter and BatchNorm statistic
  of the generator, with its shape, or a CheckpointKeyError listing what differs."""
  path = Path(path)
  config = checkpointing.read_config(path if (path / checkpointing.CONFIG_FILE).is_file() else path.parent.parent)
  step_dir, flat = checkpointing.intact_params(path, GROUP, ema=use_ema, buffers=True)
  abstract = nnx.eval_shape(lambda: MMFA(config.model, rngs=nnx.Rngs(0)))
  model = merge_params(abstract, flat, where=f"the MMFA generator of {step_dir}")
  log.info("MMFA generator from %s", step_dir)
  return Inference(model, config, step_dir)
