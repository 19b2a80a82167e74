"""Release-style 261-column coefficients from face crops: five points -> aligned crop -> Deep3DFaceRecon's network.

The estimator behind `mimajax extract-motion --estimator d3dfr` and animate's video drivers (`estimator=`). Per
frame of a face crop (prepare's crop, or animate's face crop) and its FaceMesh landmarks (224-px crop pixels, as the
landmark pass caches them):

  the crop resized to the release's 512 frame -> five points (mimajax.faces.alignment.five_points: iris centres
      for the release's MTCNN-like eyes, eye-corner means for Deep3DFaceRecon's dlib ones)
  release checkpoint (netG_epoch_25.pth, 261 outputs): release_warp to the 256 template, [-1, 1]
  Deep3DFaceRecon's (epoch_20.pth, 257 outputs): deep3d_align to 224, [0, 1]; its rows get FaceMesh's iris gaze
      (mimajax.faces.motion_fit.gaze) as columns 257:261, the network having none
  -> ReconNet (mimajax.face3d.d3dfr) in batches -> rows (T, 261) and the frame -> crop matrices (T, 2, 3)

The rows describe the face in the aligned crop's camera (BFM09 at 256 px, focal 1015 * 256 / 224, as the release
renders them), not in the frame: a render of them lands on the frame after `alignment.warp_back` with the inverse
matrix, which is what the release does (so the matrices are kept beside the rows).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from mimajax.face3d import d3dfr
from mimajax.face3d.coefficients import COEFFICIENT_WIDTHS
from mimajax.faces import alignment, motion_fit

FRAME = alignment.RELEASE_FRAME
LANDMARK_SIDE = 224  # motion_fit.to_fit_pixels: the landmark cache's crop size


class D3DFRMotion:
  """A loaded ReconNet and its alignment: `__call__(crops, landmarks)` -> (rows (T, 261), matrices (T, 2, 3))."""

  def __init__(self, weights: str | os.PathLike, *, variant: str | None = None, batch: int = 16,
               blocks=d3dfr.RESNET50_BLOCKS):  # fmt: skip
    import jax
    from flax import nnx

    self.net = d3dfr.load_d3dfr(weights, variant, blocks)
    self.variant, self.batch, self.weights = self.net.variant, batch, os.fspath(weights)
    graphdef, state = nnx.split(self.net)
    self._state = state
    self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(d3dfr.normalise(x, self.variant)))

  def align(self, crop: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One face crop (S, S, 3) uint8 and its landmarks (478, 3) in 224-px crop pixels -> (network input, frame ->
    input matrix in the 512 frame's index coordinates)."""
    import cv2

    frame = cv2.resize(np.asarray(crop, np.uint8), (FRAME, FRAME), interpolation=cv2.INTER_LINEAR)
    scaled = np.asarray(landmarks) * (FRAME / LANDMARK_SIDE)
    if self.variant == "release":
      matrix = alignment.release_warp(alignment.five_points(scaled, eyes="iris"))
      return alignment.warp(frame, matrix, alignment.RELEASE_SIZE), matrix
    aligned = alignment.deep3d_align(frame, alignment.five_points(scaled))
    return aligned.image, aligned.matrix

  def _run(self, inputs: list[np.ndarray]) -> np.ndarray:
    x = np.stack(inputs)
    n = len(x)
    if n < self.batch:  # one compiled shape: the last batch padded
      x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), x.dtype)])
    return np.asarray(self._forward(self._state, x))[:n]

  def __call__(self, crops: Iterable[np.ndarray], landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    landmarks = np.asarray(landmarks)
    outs, matrices, pending = [], [], []
    for i, crop in enumerate(crops):
      if i >= len(landmarks):
        break
      image, matrix = self.align(crop, landmarks[i])
      pending.append(image)
      matrices.append(matrix)
      if len(pending) == self.batch:
        outs.append(self._run(pending))
        pending = []
    if pending:
      outs.append(self._run(pending))
    if len(matrices) != len(landmarks):
      raise ValueError(f"D3DFR: {len(matrices)} frames decoded for {len(landmarks)} rows of landmarks")
    rows = np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, COEFFICIENT_WIDTHS[0]), np.float32)
    if rows.shape[1] == COEFFICIENT_WIDTHS[0]:  # Deep3DFaceRecon's 257: gaze from FaceMesh's irises
      gaze = motion_fit.gaze(motion_fit.fit_pose(landmarks)["shape"]).astype(np.float32)
      rows = np.concatenate([rows, gaze], axis=1)
    return rows, np.stack(matrices).astype(np.float32) if matrices else np.zeros((0, 2, 3), np.float32)

  def rows(self, crops: Iterable[np.ndarray], landmarks: np.ndarray) -> np.ndarray:
    """Only the rows: the `estimator` of mimajax.mimaface.driving.read_video_driver."""
    return self(crops, landmarks)[0]
