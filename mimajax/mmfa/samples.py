"""Training samples of MMFA: samples/step_XXXXXXX.png, per row

  source (its keypoints drawn) | driver (its keypoints) | generated | canonical keypoints x_c (on grey)

with the generator's current parameters (the EMA copy when kept) and BatchNorm statistics, in eval mode. The
keypoints are drawn projected to the image plane (assumption 2), one colour per keypoint in every column, so a
keypoint's meaning can be followed from the canonical face to the source and the driver.
"""

from __future__ import annotations

import colorsys
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from mimajax import video_io

log = logging.getLogger("mimajax.train")


def palette(k: int) -> list[tuple[int, int, int]]:
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.9, 1.0)) for i in range(k)]


def draw_keypoints(image: np.ndarray, points: np.ndarray, radius: int = 2) -> np.ndarray:
  """uint8 image (H, W, 3) with 2-D points (K, 2+) in [-1, 1] (x right, y down) drawn as coloured dots."""
  h, w = image.shape[:2]
  canvas = Image.fromarray(np.ascontiguousarray(image))
  draw = ImageDraw.Draw(canvas)
  for (x, y), colour in zip(np.asarray(points)[:, :2], palette(len(points))):
    px, py = (x + 1) * w / 2 - 0.5, (y + 1) * h / 2 - 0.5  # align_corners=False pixel centres
    draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour)
  return np.asarray(canvas)


class SampleWriter:
  """Runs the generator on the first `config.sample.count` pairs of the host batch and writes the grid."""

  def __init__(self, config, generator, prepare=None, group: str = "generator"):
    self.config, self.group, self.prepare = config, group, prepare
    self.graphdef = nnx.graphdef(generator)
    self.rest = nnx.state(generator, nnx.Not(nnx.Param))
    self._forward = None

  def __call__(self, workdir: Path, step: int, params: dict, frozen, host_batch: dict, buffers=None) -> Path:
    n = min(self.config.sample.count, len(host_batch["frames"]))
    local = {k: np.asarray(v[:n]) for k, v in host_batch.items() if k in ("frames", "source_frame", "motion",
                                                                          "source_motion")}  # fmt: skip
    rest = (buffers or {}).get(self.group, self.rest)
    if self._forward is None:
      graphdef, prepare = self.graphdef, self.prepare

      @jax.jit
      def forward(params, rest, frozen, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        b = prepare(frozen, batch)
        out = model(b["source"], b["driver"], b["source_rotation"], b["driver_rotation"])
        return out["prediction"], out["kp_source"], out["kp_driving"], out["canonical"]

      self._forward = forward
    generated, kp_source, kp_driving, canonical = (np.asarray(x) for x in
                                                   self._forward(params[self.group], rest, frozen, local))  # fmt: skip
    size = generated.shape[1]
    resize = lambda im: np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    rows = []
    for i in range(n):
      grey = np.full((size, size, 3), 96, np.uint8)
      rows.append(np.concatenate([
        draw_keypoints(resize(local["source_frame"][i]), kp_source[i]),
        draw_keypoints(resize(local["frames"][i]), kp_driving[i]),
        video_io.to_uint8(generated[i]),
        draw_keypoints(grey, canonical[i]),
      ], axis=1))  # fmt: skip
    path = Path(workdir) / "samples" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_image(path, np.concatenate(rows, axis=0))
    log.info("samples: %s", path)
    return path
