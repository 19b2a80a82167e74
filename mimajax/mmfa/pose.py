"""R of eq. 5 outside training: from stored coefficient rows, or fitted to the face's landmarks.

The paper takes R from a pretrained head-pose network (Hopenet). Offline, the pose the data pipeline's motion
extraction stores per frame plays that role (`mimajax prepare`: the MediaPipe landmark fit of `faces.motion_fit`,
Deep3DFaceRecon's angle convention); for frames without rows (a portrait, a driving video) the same fit runs here.
"""

from __future__ import annotations

import numpy as np

from mimajax.faces import motion_fit, tracking
from mimajax.mmfa import keypoints
from mimajax.mmfa.inference import rotations_from_rows


def angles_of_crops(crops: np.ndarray, what: str = "the face crops") -> np.ndarray:
  """Deep3DFaceRecon angles (T, 3) (radians; x = pitch, y = yaw, z = roll) of aligned face crops (T, S, S, 3)."""
  crops = np.asarray(crops)
  landmarks = tracking.crop_landmarks(list(crops), crops.shape[1], what)
  return motion_fit.fit_pose(landmarks)["angle"].astype(np.float32)


def rotations(crops: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
  """R (T, 3, 3) in the keypoint frame: from the rows when given (the dataset's stored pose), else fitted."""
  if rows is not None:
    return np.asarray(rotations_from_rows(rows))
  return np.asarray(keypoints.rotation_from_deep3d(angles_of_crops(crops)))
