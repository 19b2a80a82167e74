"""The release MIA's face feature (mimajax.mimaface.face_features) against a transcription of the release's code.

The reference follows MIMAFace2024/MIMAFace step by step with the libraries it uses: the 5-point similarity of
`dataset/face_util.get_affine_transform` (its 4x4 normal equations, solved with cv2.solve(DECOMP_SVD)); the warp of
`kornia.geometry.warp_affine` as kornia computes it (pixel matrix -> normalised coordinates, inverted, F.affine_grid
+ F.grid_sample with align_corners=True and zero padding; kornia itself is not a dependency, so its few torch ops are
written out); `CurricularFaceOurCrop.deep_features` (F.interpolate to 256, [:224, 16:240], F.interpolate to 112); an
IR net with the release's module names (mimajax.parity.identity's twin, random weights and BatchNorm statistics)
saved as CurricularFace_Backbone.pth and read back through our loader. Input: scikit-image's astronaut (a real
portrait), cropped as `mimajax animate` crops a source, its five points from FaceMesh, shared by both sides (the
release's MTCNN is not available; the check is about everything after the points). torch is imported only here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mimajax.metrics import ir101
from mimajax.parity.common import nchw, rel_err
from mimajax.parity.identity import SIZES, reference_ir

FRAME = 512  # the release's test_image_size: the frame the MIA's source is


def release_alignment(points: np.ndarray, template: np.ndarray) -> np.ndarray:
  """face_util.get_affine_transform: the similarity [[a, -b, tx], [b, a, ty]] from the normal equations."""
  import cv2

  a = np.zeros((4, 4))
  b = np.zeros(4)
  for (x, y), (u, v) in zip(points, template):
    a[0, 0] += x * x + y * y
    a[0, 2] += x
    a[0, 3] += y
    b += [x * u + y * v, x * v - y * u, u, v]
  a[1, 1] = a[0, 0]
  a[2, 1] = a[1, 2] = -a[0, 3]
  a[3, 1] = a[1, 3] = a[2, 0] = a[0, 2]
  a[2, 2] = a[3, 3] = len(points)
  a[3, 0] = a[0, 3]
  _, s = cv2.solve(a, b, flags=cv2.DECOMP_SVD)
  s = s.reshape(-1)
  return np.array([[s[0], -s[1], s[2]], [s[1], s[0], s[3]]])


def kornia_warp_affine(src, matrix, dsize: tuple[int, int]):
  """kornia.geometry.warp_affine(src, M, dsize) with its defaults (bilinear, zeros, align_corners=True)."""
  import torch
  import torch.nn.functional as F

  b, c, h, w = src.shape

  def pixel_to_normalised(height, width):  # kornia's normal_transform_pixel: [0, side - 1] -> [-1, 1]
    return torch.tensor([[2.0 / (width - 1), 0.0, -1.0], [0.0, 2.0 / (height - 1), -1.0], [0.0, 0.0, 1.0]])

  m3 = torch.cat([matrix, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(b, 1, 3)], dim=1)
  dst_norm_src_norm = pixel_to_normalised(*dsize) @ m3 @ torch.inverse(pixel_to_normalised(h, w))
  src_norm_dst_norm = torch.inverse(dst_norm_src_norm)
  grid = F.affine_grid(src_norm_dst_norm[:, :2], [b, c, dsize[0], dsize[1]], align_corners=True)
  return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def release_deep_features(net, im):
  """CurricularFaceOurCrop.deep_features: [-1, 1] NCHW frame -> (N, 25088)."""
  import torch
  import torch.nn.functional as F

  if im.size(2) != 256:
    im = F.interpolate(im, size=[256, 256], mode="bilinear")
  x = F.interpolate(im[:, :, :224, 16:240], size=[112, 112], mode="bilinear")
  return torch.flatten(net(x)[1], 1)  # the twin returns (embedding, body output flattened)


def portrait_frame() -> tuple[np.ndarray, np.ndarray]:
  """The astronaut cropped to FRAME px as `mimajax animate` crops a source, and its five points."""
  import skimage.data

  from mimajax.mimaface import animate, face_features

  frame = animate.crop_source(skimage.data.astronaut(), FRAME)
  return frame, face_features.detect_five_points(frame)


def face_features_parity(
  size: str = "tiny", pretrained: str | None = None, seed: int = 0, log: Callable[[str], None] = print, **kw
) -> float:
  """Our alignment + warp + crop + IR deep_features vs the release's, on a real portrait: rel L2 of the 25088 values
  (and of the IR input). size "tiny": one IR unit per stage; "sd15"/"full": IR-101; `pretrained`: a real
  CurricularFace_Backbone.pth in both."""
  import torch

  from mimajax.mimaface import face_features

  frame, points = portrait_frame()
  units = ir101.IR101_UNITS if pretrained else SIZES[size]
  with tempfile.TemporaryDirectory() as tmp:
    reference, path = reference_ir(units, pretrained, Path(tmp), seed)
    ours_net = face_features.FaceFeatures(path)
    t0 = time.perf_counter()
    x = face_features.network_input(frame, points)
    ours = ours_net.deep_features(x)
    t_jax = time.perf_counter() - t0
  log(f"face_features parity: units {list(units)}, {'weights ' + str(path) if pretrained else 'random weights'}; "
      f"astronaut at {FRAME} px, points {np.round(points, 1).tolist()}")  # fmt: skip

  matrix = release_alignment(points, face_features.TEMPLATE_256)
  log(f"  alignment matrix vs the release's normal equations: max |diff| "
      f"{np.abs(matrix - face_features.similarity_transform(points)).max():.2e}")  # fmt: skip
  with torch.no_grad():
    t0 = time.perf_counter()
    src = (torch.from_numpy(nchw(frame[None].astype(np.float32))) / 255.0 - 0.5) / 0.5  # the release's pil2tensor
    warped = kornia_warp_affine(src, torch.tensor(matrix, dtype=torch.float32)[None], (FRAME, FRAME))
    crop = torch.nn.functional.interpolate(warped, size=[256, 256], mode="bilinear")
    ref_x = torch.nn.functional.interpolate(crop[:, :, :224, 16:240], size=[112, 112], mode="bilinear")
    ref = release_deep_features(reference, warped).numpy()
    t_torch = time.perf_counter() - t0
  input_err = rel_err(np.asarray(x), np.moveaxis(ref_x.numpy(), 1, -1))
  err = rel_err(ours, ref)
  log(f"  IR input (1, 112, 112, 3)  rel_err={input_err:.3e}")
  log(f"  deep_features {ours.shape}  rel_err={err:.3e}")
  log(f"  torch {t_torch:.1f}s, jax load+compile+forward {t_jax:.1f}s")
  return max(err, input_err)
