"""Files of 3DMM coefficient rows: the one reader for the dataset (`mimajax prepare`) and the drivers (`animate`).

Rows are in the Deep3DFaceRecon layout (`face3d.coefficients`, 257 columns, or 261 with the release's gaze), one per
video frame. `read_coefficients` takes:

  .npy             (T, 257 | 261), or one row (257 | 261,); (T, 70 | 73) rows are read as SadTalker's
  .mat `coeff`     (T, 257 | 261): Deep3DFaceRecon (TF) and `mimajax prepare`'s layout
  .mat `id`, `exp`, `tex`, `angle`, `gamma`, `trans` [, `gaze`]: Deep3DFaceRecon_pytorch's `save_coeff` groups
  .mat `coeff_3dmm` SadTalker (OpenTalker/SadTalker): (T, 70) = expression 64 | angle 3 | translation 3 from audio
                   (src/test_audio2coeff.py `Audio2Coeff.generate`), or (T, 73) from its CropAndExtract
                   (src/utils/preprocess.py; + 3 crop parameters, dropped). This is how audio drives the model.

SadTalker rows only carry expression and pose; their other groups are zero (a driver's blend takes them from the
source). A training dataset needs every group of every frame, so `training_rows=True` (prepare) takes only
(frames, 257 | 261) rows from a .npy or a .mat `coeff`, as Deep3DFaceRecon writes them.

Every refusal is a CoefficientError (a ValueError) naming the file and what was expected; its `reason` is one of
ERROR_REASONS, which prepare turns into its skip reasons.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mimajax.face3d import coefficients as coefficient_layout
from mimajax.face3d.coefficients import BASE_WIDTH, COEFFICIENT_SLICES, COEFFICIENT_WIDTHS

SADTALKER_WIDTHS = (70, 73)  # expression 64 | angle 3 | translation 3 [| crop parameters 3]
D3DFR_PYTORCH_KEYS = {"id": "identity", "exp": "expression", "tex": "texture", "angle": "angle", "gamma": "gamma",
                      "trans": "translation", "gaze": "gaze"}  # fmt: skip
ERROR_REASONS = (
  "unreadable",  # missing, not a .npy / .mat, undecodable, or none of the layouts
  "shape",  # not (frames, 257 | 261) (or not the width asked for)
  "non_finite",  # NaN or inf anywhere
)
_WIDTH_NAMES = {257: "(frames, 257) in Deep3DFaceRecon's layout", 261: "(frames, 261) with the release's gaze"}
_TRAINING_WIDTHS = f"{_WIDTH_NAMES[257]} or {_WIDTH_NAMES[261]}"
_DRIVER_WIDTHS = (
  f"{_WIDTH_NAMES[257]}, {_WIDTH_NAMES[261]}, or SadTalker's (frames, 70 | 73) (expression 64 | angle 3 | "
  "translation 3)"
)


class CoefficientError(ValueError):
  """Coefficients that cannot be used; `reason` is one of ERROR_REASONS, the message says what and why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _check(coeffs, what: str, width: int | None, driver: bool) -> np.ndarray:
  """driver: a single row is one frame, and no rows is an error; else (training rows) exactly (frames, W), where the
  caller checks the frame count against its video."""
  try:
    coeffs = np.asarray(coeffs, np.float32)
  except (TypeError, ValueError) as e:
    raise CoefficientError("unreadable", f"{what}: not an array of numbers ({e})") from None
  widths = COEFFICIENT_WIDTHS if width is None else (width,)
  if width is not None:
    expected = _WIDTH_NAMES.get(width, f"(frames, {width})")
  else:
    expected = _DRIVER_WIDTHS if driver else _TRAINING_WIDTHS
  if driver and coeffs.ndim in (1, 2) and len(coeffs) == 0:
    raise CoefficientError(
      "shape", f"{what}: 0 rows (an empty array of shape {coeffs.shape}); expected at least one frame, {expected}"
    )
  if coeffs.ndim == 1 and driver:
    coeffs = coeffs[None]
  if coeffs.ndim != 2 or coeffs.shape[1] not in widths:
    raise CoefficientError("shape", f"{what}: coefficients of shape {coeffs.shape}; expected {expected}")
  if not np.isfinite(coeffs).all():
    rows = np.unique(np.nonzero(~np.isfinite(coeffs))[0])
    raise CoefficientError(
      "non_finite", f"{what}: non-finite values (NaN or inf) in {len(rows)} rows (first: {rows[:5].tolist()})"
    )
  return coeffs


def check_coefficients(coeffs, what: str, *, width: int | None = None) -> np.ndarray:
  """(T, 257 | 261) finite float32 rows (a single row becomes (1, W)), or only `width` columns; CoefficientError
  naming `what` otherwise."""
  return _check(coeffs, what, width, driver=True)


def from_sadtalker(rows, what: str = "SadTalker coefficients") -> np.ndarray:
  """SadTalker's (T, 70 | 73) exp | angle | trans [| crop] -> (T, 257) with identity, texture and lighting zero."""
  rows = np.asarray(rows, np.float32)
  if rows.ndim != 2 or rows.shape[1] not in SADTALKER_WIDTHS:
    raise CoefficientError(
      "shape", f"{what}: shape {rows.shape}; SadTalker's coeff_3dmm is (frames, 70) or (frames, 73)"
    )
  out = np.zeros((len(rows), BASE_WIDTH), np.float32)
  out[:, slice(*COEFFICIENT_SLICES["expression"])] = rows[:, 0:64]
  out[:, slice(*COEFFICIENT_SLICES["angle"])] = rows[:, 64:67]
  out[:, slice(*COEFFICIENT_SLICES["translation"])] = rows[:, 67:70]
  return out


def _read_mat(path: Path, training_rows: bool) -> tuple[np.ndarray, str]:
  import scipy.io

  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # noqa: BLE001  (scipy raises several types for a file that is not a .mat)
    raise CoefficientError("unreadable", f"{path} is not a readable MATLAB .mat file ({type(e).__name__}: {e})") from e
  keys = sorted(k for k in mat if not k.startswith("__"))
  if "coeff" in mat:
    return mat["coeff"], "coefficients"
  if training_rows:
    raise CoefficientError(
      "unreadable", f"{path} has no 'coeff' (keys {keys}); expected Deep3DFaceRecon's rows, frames x 257|261"
    )
  if "coeff_3dmm" in mat:
    return from_sadtalker(np.atleast_2d(mat["coeff_3dmm"]), f"{path}: coeff_3dmm"), "sadtalker"
  if all(k in mat for k in ("id", "exp", "tex", "angle", "gamma", "trans")):
    groups = {name: np.atleast_2d(mat[k]) for k, name in D3DFR_PYTORCH_KEYS.items() if k in mat}
    try:  # checks every group's width; the frames must agree
      return np.asarray(coefficient_layout.join(groups)), "coefficients"
    except (ValueError, TypeError) as e:
      raise CoefficientError("shape", f"{path}: Deep3DFaceRecon_pytorch groups do not fit the layout: {e}") from None
  raise CoefficientError(
    "unreadable",
    f"{path} has none of the coefficient layouts (keys {keys}); expected 'coeff' (Deep3DFaceRecon, frames x 257|261), "
    "'coeff_3dmm' (SadTalker, frames x 70|73) or 'id', 'exp', 'tex', 'angle', 'gamma', 'trans' (D3DFR_pytorch)",
  )


def read_coefficients(path: str | os.PathLike, *, width: int | None = None,
                      training_rows: bool = False) -> tuple[np.ndarray, str]:  # fmt: skip
  """(rows (T, 257 | 261) float32, kind "coefficients" | "sadtalker") of a .npy or .mat file (module docstring).

  width: only rows of that many columns. training_rows: only Deep3DFaceRecon's (frames, 257 | 261) rows (a .npy or a
  .mat `coeff`): no single rows, SadTalker rows or D3DFR_pytorch groups. CoefficientError if the file is unusable.
  """
  path = Path(path)
  if not path.exists() or path.is_dir():  # not is_file(): a named pipe is read like a file
    raise CoefficientError("unreadable", f"coefficient file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".mat":
    rows, kind = _read_mat(path, training_rows)
  elif suffix == ".npy":
    try:
      rows = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (any loader error means the same thing: unusable file)
      raise CoefficientError("unreadable", f"{path} is not a readable .npy array ({type(e).__name__}: {e})") from e
    kind = "coefficients"
    if not training_rows and rows.ndim == 2 and rows.shape[1] in SADTALKER_WIDTHS:
      rows, kind = from_sadtalker(rows, str(path)), "sadtalker"
  else:
    raise CoefficientError(
      "unreadable", f"coefficient file {path}: unknown extension {suffix!r}; expected .npy or .mat"
    )
  return _check(rows, str(path), width, driver=not training_rows), kind
