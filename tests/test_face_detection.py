"""The face detectors of mimajax.faces.detection: BlazeFace's decoding (anchors, weighted suppression), its framing
against Haar's, and the detection rates of `python -m mimajax.faces.detection_eval` with bounds."""

import numpy as np
import pytest

from mimajax.faces import blazeface, detection, detection_eval


def test_anchor_grids_are_mediapipes():
  short = blazeface.ssd_anchors(128, blazeface.VARIANTS["short"].anchors)
  full = blazeface.ssd_anchors(192, blazeface.VARIANTS["full"].anchors)
  assert short.shape == (896, 2) and full.shape == (2304, 2)
  # The full-range grid: 48 x 48 cells of stride 4, one anchor each, row-major, centres at (i + 0.5) / 48.
  np.testing.assert_allclose(full[1], [1.5 / 48, 0.5 / 48])
  np.testing.assert_allclose(full[48], [0.5 / 48, 1.5 / 48])
  # The short-range grid: 16 x 16 cells with 2 anchors, then 8 x 8 with 6.
  np.testing.assert_allclose(short[:2], [[0.5 / 16, 0.5 / 16]] * 2)
  np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])


def test_weighted_nms_averages_a_group_and_keeps_separate_faces():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
  keypoints = np.zeros((3, 6, 2))
  keypoints[1] += 3.0
  scores = np.array([0.9, 0.6, 0.7])
  faces = blazeface.weighted_nms(boxes, keypoints, scores)
  assert [f.score for f in faces] == [0.9, 0.7]
  w = np.array([0.9, 0.6]) / 1.5  # the group of the best: its two overlapping boxes, score-weighted
  np.testing.assert_allclose(faces[0].box, w @ boxes[:2])
  np.testing.assert_allclose(faces[0].keypoints, np.full((6, 2), 3.0 * w[1]))
  np.testing.assert_allclose(faces[1].box, boxes[2])


def test_tiles_cover_the_image_half_a_tile_apart():
  rois = blazeface.tile_rois(1440, 1080)
  side = 540
  assert {r.size for r in rois} == {side}
  xs, ys = sorted({r.cx for r in rois}), sorted({r.cy for r in rois})
  assert xs[0] == side / 2 and xs[-1] == 1440 - side / 2 and ys[0] == side / 2 and ys[-1] == 1080 - side / 2
  assert max(np.diff(xs)) <= side / 2 and max(np.diff(ys)) <= side / 2


def test_blazeface_frames_a_portrait_as_haar_does():
  """The calibrated BlazeFace box (BLAZEFACE_SHIFT_Y) overlaps the Haar box that framed the data: IoU >= 0.8."""
  for name, image in detection_eval.portraits().items():
    boxes = [detection.image_face_box(image, detector=d) for d in ("blazeface", "haar")]
    (xa, ya, sa), (xb, yb, sb) = boxes
    inter = max(0, min(xa + sa, xb + sb) - max(xa, xb)) * max(0, min(ya + sa, yb + sb) - max(ya, yb))
    assert inter / (sa * sa + sb * sb - inter) >= 0.8, (name, boxes)


def test_several_faces_are_ranked_largest_first():
  import cv2

  image = detection_eval.portraits()["astronaut"]
  small = cv2.resize(image, (384, 384), interpolation=cv2.INTER_AREA)
  both = np.zeros((512, 1024, 3), np.uint8)
  both[:, 512:] = image
  both[64:448, 64:448] = small
  faces = detection.faces(both)
  assert len(faces) == 2 and faces[0][0] > 512 > faces[1][0], faces  # the full-size face first
  assert detection.largest_face(both, face_index=1) == faces[1]
  assert detection.largest_face(both, face_index=2) is None
  with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
    detection.faces(both, "mtcnn")


def test_auto_falls_back_to_haar_without_mediapipes_models(monkeypatch, caplog):
  from mimajax.faces import tflite_models

  image = detection_eval.portraits()["astronaut"]

  def unavailable(rgb):
    raise tflite_models.LandmarkerUnavailable("no models here")

  monkeypatch.setattr(detection, "_blazeface_faces", unavailable)
  monkeypatch.setattr(detection._local, "warned", False, raising=False)
  assert detection.faces(image) == detection.faces(image, "haar") != []
  assert "no models here; using the Haar cascade alone" in caplog.text
  with pytest.raises(tflite_models.LandmarkerUnavailable):
    detection.faces(image, "blazeface")
  with pytest.raises(ValueError, match="face_index=-1"):
    detection.largest_face(image, face_index=-1)


def test_detection_rates_have_bounds():
  """On 25 LFW faces and the portraits: the figures of the module docstring of detection_eval, with bounds."""
  r = detection_eval.rates(limit=25)
  auto, blaze, haar = r["auto"], r["blazeface"], r["haar"]
  # Whole heads: BlazeFace finds every portrait at 1/20 of the frame and turned by 30 degrees; Haar cannot.
  assert blaze["portrait"] == blaze["portrait-small"] == blaze["portrait-rot"] == 1.0
  assert haar["portrait-small"] == 0.0 and haar["portrait-rot"] <= 0.5
  # Tight LFW crops: Haar's ground, where BlazeFace finds under half; auto falls back to Haar and keeps both.
  assert haar["lfw"] >= 0.9 and blaze["lfw"] < 0.7 and auto["lfw"] >= haar["lfw"]
  assert auto["rot+30"] > haar["rot+30"] and auto["rot-30"] > haar["rot-30"]
  assert max(d["non-face"] for d in r.values()) <= 0.05
