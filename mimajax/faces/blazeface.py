"""MediaPipe's BlazeFace face detectors, run from the .tflite files in the mediapipe wheel: every face of an image.

Two models, each an SSD with fixed-size anchors whose regressors give a box and six keypoints per anchor:

  short   face_detection_short_range.tflite  128 px, strides 8 (2 anchors) and 16 (6 anchors): 896 anchors, faces
          within ~2 m of a phone camera. FaceMesh's own detector: the landmarker (landmarks.py) starts from it.
  full    face_detection_full_range_sparse.tflite  192 px, stride 4, one anchor per cell: 2304 anchors, faces up
          to ~5 m, small and turned ones. The dataset's and inference's face box (detection.py) comes from it.

Pre- and post-processing as MediaPipe's face_detection graphs: the frame letterboxed (zero padded, centred) to the
model's square input in [-1, 1]; sigmoid scores clipped at +-100 and thresholded (0.5 short, 0.6 full); weighted
non-maximum suppression at IoU 0.3 (the boxes of one group averaged by score).

`detect_faces` adds what a frame-level letterbox cannot see: a face of 1/20 of a frame's shorter side is ~10 px in
the 192-px input, under the smallest face the model was trained on. When the whole frame shows no face, the frame is
searched again in overlapping tiles of half its shorter side (half a tile apart, so every face up to a quarter of
the shorter side lies wholly inside one), each tile letterboxed on its own, and the tiles' faces are merged by the
same suppression. Tiles run only on frames with no face found, so a talking-head frame costs one inference (and a
small face beside a large one is not listed: the crop is built around the largest).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mimajax.faces import tflite_models as lm

NMS_IOU = 0.3  # MediaPipe's NonMaxSuppressionCalculator min_suppression_threshold (WEIGHTED)
TILE_FRACTION = 0.5  # tile side / the image's shorter side (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Variant:
  model: str  # key of tflite_models.MODELS
  size: int  # input side
  anchors: tuple[tuple[int, int], ...]  # (stride, anchors per cell) per feature map
  threshold: float  # min_score_thresh of its MediaPipe graph


VARIANTS = {
  "short": Variant("detector", 128, ((8, 2), (16, 6)), 0.5),
  "full": Variant("full_detector", 192, ((4, 1),), 0.6),
}


@dataclasses.dataclass(frozen=True)
class Detection:
  box: np.ndarray  # (4,) x0, y0, x1, y1 in image pixels
  keypoints: np.ndarray  # (6, 2): eye at image left, other eye, nose tip, mouth, ear at image left, other ear
  score: float

  @property
  def side(self) -> float:
    return float((self.box[2:] - self.box[:2]).max())

  @property
  def area(self) -> float:
    return float(np.prod(self.box[2:] - self.box[:2]))


def ssd_anchors(size: int, layers: tuple[tuple[int, int], ...]) -> np.ndarray:
  """Anchor centres (A, 2) in [0, 1], row-major per feature map, `count` anchors per cell (fixed anchor size)."""
  anchors = []
  for stride, count in layers:
    g = size // stride
    y, x = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    centres = np.stack([(x + 0.5) / g, (y + 0.5) / g], -1).reshape(-1, 1, 2)
    anchors.append(np.repeat(centres, count, axis=1).reshape(-1, 2))
  return np.concatenate(anchors)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one (4,) box with (N, 4) boxes, corners (x0, y0, x1, y1)."""
  lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
  return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> list[Detection]:
  """MediaPipe's weighted suppression: the best remaining candidate and every candidate overlapping it by more
  than NMS_IOU form one face, their boxes and keypoints averaged by score; repeated until none is left. The face
  keeps its best candidate's score. Most confident first."""
  out, left = [], np.argsort(-scores, kind="stable")
  while left.size:
    best = left[0]
    group = left[iou(boxes[best], boxes[left]) > NMS_IOU]
    group = group if group.size else left[:1]
    w = scores[group] / scores[group].sum()
    out.append(Detection((w[:, None] * boxes[group]).sum(0), (w[:, None, None] * keypoints[group]).sum(0),
                         float(scores[best])))  # fmt: skip
    left = left[~np.isin(left, group)]
  return out


class BlazeFace:
  """One BlazeFace model: `candidates` of a square region, `detect` every face of an image, most confident first."""

  def __init__(self, variant: str = "full", num_threads: int = 1):
    if variant not in VARIANTS:
      raise ValueError(f"unknown BlazeFace variant {variant!r}; expected one of {sorted(VARIANTS)}")
    self.variant = VARIANTS[variant]
    self.anchors = ssd_anchors(self.variant.size, self.variant.anchors)
    n = self.anchors.shape[0]
    self.model = lm._TFLiteModel(self.variant.model, (n * 16, n), num_threads)  # regressors, logits
    self.size = self.model.size

  def candidates(self, image: np.ndarray, roi: lm.Roi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every anchor over the threshold in a square (unrotated) region of the image, letterboxed with zeros:
    boxes (N, 4) and keypoints (N, 6, 2) in image pixels, scores (N,)."""
    size = self.size
    raw, logits = self.model(lm.crop(image, roi, size, zero_border=True).astype(np.float32) / 127.5 - 1.0)
    raw = raw.reshape(-1, 16)
    scores = 1 / (1 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    keep = scores >= self.variant.threshold
    raw, scores, anchors = raw[keep].astype(np.float64) / size, scores[keep], self.anchors[keep]
    centre, half = raw[:, :2] + anchors, raw[:, 2:4] / 2
    scale = roi.size / size  # model pixels -> image pixels (the region is unrotated)
    origin = np.array([roi.cx, roi.cy]) - roi.size / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1) * size * scale + np.tile(origin, 2)
    keypoints = (raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None]) * size * scale + origin
    return boxes, keypoints, scores

  def detect(self, image: np.ndarray, tiles: bool = True) -> list[Detection]:
    """Every face in an RGB image, most confident first: the whole frame, then, if it shows none and `tiles`, the
    frame's overlapping tiles (the module docstring)."""
    h, w = image.shape[:2]
    found = weighted_nms(*self.candidates(image, lm.Roi(w / 2, h / 2, max(h, w))))
    if found or not tiles:
      return found
    parts = [self.candidates(image, roi) for roi in tile_rois(w, h)]
    boxes, keypoints, scores = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return weighted_nms(boxes, keypoints, scores)


def tile_rois(w: int, h: int, fraction: float = TILE_FRACTION) -> list[lm.Roi]:
  """Square tiles of `fraction` x the shorter side covering a w x h image, neighbours half a tile apart."""
  side = fraction * min(w, h)
  centres = lambda n: np.linspace(side / 2, n - side / 2, max(1, math.ceil((n - side) / (side / 2)) + 1))  # noqa: E731
  return [lm.Roi(float(x), float(y), side) for y in centres(h) for x in centres(w)]
