"""Driving motion for `mimajax animate` (MIMAFace "Motion Representation"): 3DMM rows from files, videos or edits.

Every driver becomes rows of coefficients in the Deep3DFaceRecon layout (`face3d.coefficients`, 257 or 261 with
the release's gaze). Readers (`read_driving`):

  .npy, .mat       coefficient files (mimajax.face3d.coefficient_files: Deep3DFaceRecon's `coeff`, its PyTorch port's
                   groups, SadTalker's audio-driven `coeff_3dmm`), the reader `mimajax prepare` uses too
  video            FaceMesh landmarks of its face crop (mimajax.faces.detection, as `prepare --crop detect`),
                   streamed; rows in the checkpoint's landmark face model (`with_motion`), fitted by
                   mimajax.faces.motion_fit as the dataset's motion extraction fits them

SadTalker rows only carry expression and pose; their other groups are zero and come from the source on blending.

Blending (`blend`) is the release's: `D3DFR_wrapper.forward_uncropped_tensor_FaceDrive_WithWarpmat_Reenact`
(models/D3DFR/D3DFR_ReconModel.py of MIMAFace2024/MIMAFace) builds
`coeffBlendSrcRef = [id_src, exp_drv, tex_src, angle_drv, gamma_src, trans_drv, gaze_drv]`, the rows infer_video.py
renders and feeds to MIA. The release has no relative mode; "relative" here is the FOMM/SadTalker convention
(SadTalker's `using_refpose`): source motion + (driving - driving[0]) for expression, angle, translation and gaze.

Edits (`apply_edits`), each `key=value`, applied to every row:
  yaw=+15, pitch=-10, roll=5   degrees added to the Euler angles (Deep3DFaceRecon's x = pitch, y = yaw, z = roll):
                               positive yaw turns the face towards the image's right, positive pitch tilts the
                               chin down, positive roll turns the face counter-clockwise on screen
  tx=+0.1, ty=-0.1, tz=0.5     added to the translation (model units, decimetres; the camera looks from z = 10)
  exp_scale=1.5                expression multiplied (0: neutral, > 1: exaggerated)
  exp_from=FILE[:FRAME]        expression of row FRAME (default 0) of another coefficient file or video, or of the
                               face in an image (PNG / JPEG: fitted on its face crop as the source's own row is)
  pose_from=FILE[:FRAME]       angle and translation from there; gaze_from=FILE[:FRAME] its gaze (261-wide files)
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mimajax import video_io
from mimajax.face3d.coefficient_files import check_coefficients, read_coefficients
from mimajax.face3d.coefficients import COEFFICIENT_SLICES, COEFFICIENT_WIDTHS, MOTION_GROUPS
from mimajax.face3d.landmark_model import NUM_LANDMARKS
from mimajax.faces import detection, motion_fit, tracking

PREVIEW_SIZE = 256  # side of the driving video's face crops kept for the side-by-side view
BLEND_MODES = ("absolute", "relative")
ANGLE_INDEX = {"pitch": 0, "yaw": 1, "roll": 2}
TRANSLATION_INDEX = {"tx": 0, "ty": 1, "tz": 2}
FROM_GROUPS = {"exp_from": ("expression",), "pose_from": ("angle", "translation"), "gaze_from": ("gaze",)}
EDIT_KEYS = (*ANGLE_INDEX, *TRANSLATION_INDEX, "exp_scale", *FROM_GROUPS)


@dataclasses.dataclass(frozen=True)
class Driving:
  """Driving rows, and what they came from."""

  coeffs: np.ndarray | None  # (T, 257 | 261) float32; None: a video before `with_motion`
  kind: str  # "coefficients" | "sadtalker" | "video"
  landmarks: np.ndarray | None = None  # a video's FaceMesh landmarks (T, 478, 3), 224-px face-crop pixels
  previews: np.ndarray | None = None  # a video's face crops (T, 256, 256, 3) uint8, for the side-by-side view
  fps: float | None = None  # a video's frame rate
  source: str = ""  # the file

  def __len__(self) -> int:
    return len(self.coeffs if self.coeffs is not None else self.landmarks)


def _slice(name: str) -> slice:
  return slice(*COEFFICIENT_SLICES[name])


crop_landmarks = tracking.crop_landmarks


def motion_from_landmarks(landmarks: np.ndarray, face_model) -> np.ndarray:
  """Landmarks (T, 478, 3) -> (T, 261) rows in `face_model`'s expression basis (the pipeline's pass 2: pose fit,
  projection on the checkpoint's expression PCA, gaze); the model must be the landmark morphable model."""
  if face_model.num_vertices != NUM_LANDMARKS:
    raise ValueError(
      f"motion from images needs the landmark face model (face_model.npz of `mimajax extract-motion`, "
      f"{NUM_LANDMARKS} vertices); this checkpoint's has {face_model.num_vertices}: pass coefficient files instead "
      "(--driving FILE.npy|.mat, --source-coefficients FILE)"
    )
  mean = np.asarray(face_model.mean_shape, np.float64).reshape(-1)
  return motion_fit.motion_coefficients(landmarks, mean, np.asarray(face_model.expression_basis, np.float64))


def read_video_driver(path, *, max_frames: int | None = None, previews: bool = False, estimator=None) -> Driving:
  """A driving video, streamed twice (face crop, then FaceMesh landmarks): memory does not grow with its pixels.

  `estimator`: None for rows from the landmarks later (`with_motion`), or a callable (crops, landmarks) -> rows
  (T, 261) that computes them now from a third pass over the crops (mimajax.faces.d3dfr_motion.D3DFRMotion.rows).
  """
  box, stream = tracking.video_crops(path, max_frames)
  kept = []

  def crops(keep: bool = previews):
    for crop in stream():
      if keep:
        kept.append(detection.crop_and_resize(crop, None, PREVIEW_SIZE))
      yield crop

  landmarks = crop_landmarks(crops(), box[2], f"the driving video {path}")
  _warn_if_partly_decoded(path, len(landmarks), max_frames)
  coeffs = None if estimator is None else check_coefficients(estimator(crops(False), landmarks), str(path))
  return Driving(coeffs, "video", landmarks=landmarks, previews=np.stack(kept) if previews else None,
                 fps=video_io.video_fps(path), source=str(path))  # fmt: skip


def _warn_if_partly_decoded(path, decoded: int, max_frames: int | None) -> None:
  """A warning on stderr when a driving video decodes fewer frames than its container declares (a truncated or
  corrupt file): the animation is driven by the frames that decoded, and is that much shorter."""
  declared = video_io.declared_frames(path)
  if declared is None:
    return
  wanted = min(declared, max_frames) if max_frames else declared
  if decoded < wanted - 1:  # the declared count is a rounded duration x fps: off by one is no loss
    message = (
      f"mimajax animate: warning: the driving video {path} decoded only {decoded} of the {declared} frames its "
      f"container declares (truncated or corrupt?); driving with those {decoded}"
    )
    print(message, file=sys.stderr, flush=True)


def read_driving(path: str | os.PathLike, *, max_frames: int | None = None, previews: bool = False) -> Driving:
  """A driver file -> Driving; a video's rows come with `with_motion` (they need the checkpoint's face model)."""
  path = Path(path)
  if video_io.is_video(path):
    return read_video_driver(path, max_frames=max_frames, previews=previews)
  if path.suffix.lower() not in (".npy", ".mat"):
    raise ValueError(
      f"driver {path}: unknown kind {path.suffix!r}; expected a video ({', '.join(video_io.VIDEO_EXTENSIONS)}) or "
      "a coefficient file (.npy, .mat)"
    )
  coeffs, kind = read_coefficients(path)
  return Driving(coeffs[:max_frames] if max_frames else coeffs, kind, source=str(path))


def with_motion(drv: Driving, face_model) -> Driving:
  """A video Driving with its rows (from its landmarks, in `face_model`'s basis); other drivers as they are."""
  if drv.coeffs is not None:
    return drv
  return dataclasses.replace(drv, coeffs=motion_from_landmarks(drv.landmarks, face_model))


def source_motion(crop: np.ndarray, face_model) -> np.ndarray:
  """The source's own coefficients (1, 261) from its aligned face crop."""
  crop = np.asarray(crop)
  return motion_from_landmarks(crop_landmarks([crop], crop.shape[0], "the source crop"), face_model)


def fit_width(coeffs: np.ndarray, width: int | None) -> np.ndarray:
  """Rows to `width` columns: 261 -> 257 drops the gaze, 257 -> 261 appends a zero (straight-ahead) gaze."""
  coeffs = np.asarray(coeffs, np.float32)
  if width is None or coeffs.shape[-1] == width:
    return coeffs
  if width not in COEFFICIENT_WIDTHS:
    raise ValueError(f"coefficient width {width}; expected one of {COEFFICIENT_WIDTHS}")
  if width < coeffs.shape[-1]:
    return coeffs[..., :width]
  return np.concatenate([coeffs, np.zeros(coeffs.shape[:-1] + (width - coeffs.shape[-1],), np.float32)], axis=-1)


def blend(source, driving, mode: str = "absolute") -> np.ndarray:
  """Source identity/texture/lighting with the driver's expression/pose/gaze -> (T, 257 | 261).

  source: one row (257 | 261) or (1, W); driving: (T, 257 | 261). "absolute": the driver's motion as it is (the
  release); "relative": the source's motion plus the driver's change since its first frame. Gaze: the driver's when
  it has one (261 columns), else the source's; a missing source gaze counts as zero.
  """
  if mode not in BLEND_MODES:
    raise ValueError(f"blend mode {mode!r}; expected one of {BLEND_MODES}")
  source = check_coefficients(source, "source coefficients")
  if len(source) != 1:
    raise ValueError(f"source coefficients: one row expected; got {len(source)}")
  driving = check_coefficients(driving, "driving coefficients")
  width = max(source.shape[1], driving.shape[1])
  given = [n for n in MOTION_GROUPS if COEFFICIENT_SLICES[n][1] <= driving.shape[1]]  # a 257-wide driver: no gaze
  source, driving = fit_width(source, width), fit_width(driving, width)
  out = np.repeat(source, len(driving), axis=0)
  for name in given:
    s = _slice(name)
    out[:, s] = driving[:, s] if mode == "absolute" else source[:, s] + (driving[:, s] - driving[:1, s])
  return out


def parse_frame_spec(spec: str) -> tuple[str, int]:
  """ "file.npy:12" -> ("file.npy", 12); "file.npy" -> ("file.npy", 0)."""
  match = re.fullmatch(r"(.+?):(\d+)", spec)
  if match and not Path(spec).exists():
    return match.group(1), int(match.group(2))
  return spec, 0


def parse_edits(edits: str | Sequence[str]) -> list[tuple[str, str]]:
  """`["yaw=+15", "pitch=-10,roll=5"]` (commas also separate) -> [(key, value), ...], keys checked."""
  if isinstance(edits, str):
    edits = [edits]
  parsed = []
  for item in (part.strip() for edit in edits for part in edit.split(",")):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key, value = key.strip().lower(), value.strip()
    if not sep or not value:
      raise ValueError(f"edit {item!r}: expected key=value, e.g. yaw=+15 or exp_from=other.npy:12")
    if key not in EDIT_KEYS:
      raise ValueError(f"edit {item!r}: unknown key {key!r}; expected one of {list(EDIT_KEYS)}")
    parsed.append((key, value))
  return parsed


def _number(key: str, value: str) -> float:
  try:
    x = float(value)
  except ValueError:
    raise ValueError(f"edit {key}={value}: {value!r} is not a number") from None
  if not np.isfinite(x):
    raise ValueError(f"edit {key}={value}: the value must be finite")
  return x


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_FIT_RESOLUTION = 256  # the face crop FaceMesh fits an image's row on (as the source's, in animate)


def _image_row(key: str, path: str, face_model) -> np.ndarray:
  """The coefficients of the face in an image, fitted as the source's are (FaceMesh on its face crop)."""
  if face_model is None:
    raise ValueError(f"edit {key}={path}: rows from an image need the checkpoint's face model")
  image = video_io.read_image(path)
  box = detection.image_face_box(image)
  if box is None:
    raise ValueError(f"edit {key}={path}: no face found in that image ({image.shape[1]}x{image.shape[0]})")
  return source_motion(detection.crop_and_resize(image, box, IMAGE_FIT_RESOLUTION), face_model)[0]


def _row_from(key: str, spec: str, face_model=None) -> np.ndarray:
  if Path(spec).suffix.lower() in IMAGE_EXTENSIONS:
    return _image_row(key, spec, face_model)
  path, frame = parse_frame_spec(spec)
  driving = read_driving(path, max_frames=frame + 1)
  if driving.coeffs is None:
    if face_model is None:
      raise ValueError(f"edit {key}={spec}: rows from a video need the checkpoint's face model")
    driving = with_motion(driving, face_model)
  if frame >= len(driving.coeffs):
    raise ValueError(f"edit {key}={spec}: frame {frame} is out of range; {path} has {len(driving.coeffs)} rows")
  return driving.coeffs[frame]


def apply_edits(coeffs, edits: str | Sequence[str], *, face_model=None) -> np.ndarray:
  """Rows (T, 257 | 261) with the edits (see the module docstring) applied to every row."""
  out = check_coefficients(coeffs, "coefficients to edit").copy()
  for key, value in parse_edits(edits):
    if key in ANGLE_INDEX:
      out[:, COEFFICIENT_SLICES["angle"][0] + ANGLE_INDEX[key]] += np.deg2rad(_number(key, value))
    elif key in TRANSLATION_INDEX:
      out[:, COEFFICIENT_SLICES["translation"][0] + TRANSLATION_INDEX[key]] += _number(key, value)
    elif key == "exp_scale":
      out[:, _slice("expression")] *= _number(key, value)
    else:
      row = _row_from(key, value, face_model)
      for name in FROM_GROUPS[key]:
        if COEFFICIENT_SLICES[name][1] > row.shape[0]:
          raise ValueError(f"edit {key}={value}: that file has no {name} (257 columns; gaze needs 261)")
        if COEFFICIENT_SLICES[name][1] > out.shape[1]:
          out = fit_width(out, row.shape[0])
        out[:, _slice(name)] = row[_slice(name)]
  return out


def edit_sequence(source, edits: str | Sequence[str], frames: int, *, ramp: bool = True, face_model=None) -> np.ndarray:
  """(frames, W) rows for an edit-driven video: from the source's own coefficients to the edited ones.

  ramp: linear from the unedited source (first frame) to the full edit (last frame); otherwise the edit held.
  """
  if frames < 1:
    raise ValueError(f"an edit-driven video needs frames >= 1; got {frames}")
  source = check_coefficients(source, "source coefficients")[:1]
  edited = apply_edits(source, edits, face_model=face_model)
  source = fit_width(source, edited.shape[1])
  weight = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None] if ramp and frames > 1 else np.ones((frames, 1))
  return (source + weight * (edited - source)).astype(np.float32)
