"""What a model family hands `mimajax serve` (the web page): a model loaded once, the controls it takes, and one
`animate(request)` that the page calls for every request.

The page (mimajax/web/) is family-neutral: it draws the drivers and controls a `ServedModel` declares, turns the
edit controls a user moved into the `KEY=VALUE` edits the family's `mimajax animate --edit` already parses (a
control left at its default is no edit), and writes the result files. A family builds its `ServedModel` from a
checkpoint with `Family.load_served`, once per server; every request reuses the loaded weights and the programs
jitted by the first one (each family's inference pads its batches to fixed shapes, so a new video length does not
compile again).

Bad input (no face, an unreadable video, a wrong coefficient file, too many frames) is a `ValueError` naming what
was wrong and what was expected; the page shows its message and keeps serving.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mimajax import video_io

# Ways a portrait can be driven: a video's frames, a coefficient file (.npy / .mat: Deep3DFaceRecon, SadTalker's
# audio-driven coeff_3dmm), or edits alone (the face moves from the source to the edit over `frames` frames).
DRIVERS = ("video", "coefficients", "edits")
CONTROL_KINDS = ("slider", "number", "checkbox", "choice", "image")
DEFAULT_MAX_FRAMES = 250  # 10 s at 25 fps: what one request may ask of a shared device
REQUEST_PREFIX = "request-"  # a request's folder under the server's temporary root


@dataclasses.dataclass(frozen=True)
class Control:
  """One input of the page: an edit (its `key` is the `--edit KEY=VALUE` key) or a sampler option."""

  key: str
  label: str
  kind: str  # one of CONTROL_KINDS; "image": an upload, passed on as the file's path
  default: Any = None
  minimum: float | None = None
  maximum: float | None = None
  step: float | None = None
  choices: Sequence[Any] = ()
  info: str = ""

  def __post_init__(self):
    if self.kind not in CONTROL_KINDS:
      raise ValueError(f"control {self.key!r}: kind {self.kind!r} is not one of {CONTROL_KINDS}")
    if self.kind == "choice" and self.default is not None and self.default not in self.choices:
      raise ValueError(f"control {self.key!r}: default {self.default!r} is not one of {list(self.choices)}")


@dataclasses.dataclass(frozen=True)
class Request:
  """One animation asked for on the page."""

  source: np.ndarray  # the portrait (H, W, 3) uint8 RGB
  driver: str  # one of DRIVERS
  driving: str | None = None  # the driver file (a video, or a coefficient file), for "video" / "coefficients"
  edits: tuple[str, ...] = ()  # `KEY=VALUE` strings, as `mimajax animate --edit` takes them
  frames: int | None = None  # the driver's first N frames, or the edit's length; None: the whole driver
  relative: bool = False  # the driver's change since its first frame, on the source's own motion
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # option controls by key
  seed: int = 0
  max_frames: int = DEFAULT_MAX_FRAMES  # the server's limit; a family checks a driver it reads against it
  workdir: Path | None = None  # where the family may write what it needs on the way (a fitted coefficient file)


@dataclasses.dataclass(frozen=True)
class Result:
  """What one request made: the frames, and what the model was given, for the page to show."""

  frames: np.ndarray  # (T, R, R, 3) uint8 at the model's resolution
  fps: float
  source_crop: np.ndarray  # (R, R, 3) uint8: the face crop the model saw
  columns: Sequence[np.ndarray]  # the side-by-side's columns, frames (T, ...) or stills: source | driver | ... | output
  model_input: np.ndarray | None = None  # (H, W, 3) uint8: what drives the model besides the source (I_R, keypoints)
  model_input_label: str = ""
  summary: str = ""  # one line for the page: frames, clips, fps


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """A trained model as `mimajax serve` runs it."""

  name: str  # family, checkpoint and step, for the page's title
  family: str
  resolution: int
  drivers: Sequence[str]  # the DRIVERS it accepts
  edit_controls: Sequence[Control]
  option_controls: Sequence[Control]
  # (request, progress(fraction in [0, 1], what)) -> Result; ValueError for bad input
  animate: Callable[[Request, Callable[[float, str], None]], Result]
  default_frames: int = 32  # an edit's length when the user names none
  notes: str = ""  # what the page says about this model (one paragraph of Markdown)

  def __post_init__(self):
    bad = [d for d in self.drivers if d not in DRIVERS]
    if bad or not self.drivers:
      raise ValueError(f"ServedModel {self.name!r}: drivers {list(self.drivers)} must be some of {DRIVERS}")


# ----------------------------------------------------------------------------- shared by the families and the page


def edit_strings(controls: Sequence[Control], values: Mapping[str, Any]) -> tuple[str, ...]:
  """The `KEY=VALUE` edits of the edit controls a user moved: a value equal to the control's default (or empty) is
  no edit, so an untouched page animates the driver as it is."""
  edits = []
  for control in controls:
    value = values.get(control.key)
    if value is None or value == "" or value is False:
      continue
    if control.kind in ("slider", "number"):
      value = float(value)
      if not math.isfinite(value):
        raise ValueError(f"{control.label}: {value} is not a finite number")
      if control.default is not None and math.isclose(value, float(control.default), abs_tol=1e-9):
        continue
      edits.append(f"{control.key}={value:g}")
    else:
      if control.default is not None and value == control.default:
        continue
      edits.append(f"{control.key}={value}")
  return tuple(edits)


def check_frames(frames: int | None, max_frames: int, *, driver_frames: int | None = None) -> int | None:
  """The frame count a request may have: ValueError when it asks for more than the server's `max_frames`, or
  leaves the length to a driver longer than that."""
  if frames is not None:
    if frames < 1:
      raise ValueError(f"frames must be >= 1; got {frames}")
    if frames > max_frames:
      raise ValueError(f"{frames} frames is too many: this server animates at most {max_frames} frames a request")
  elif driver_frames is not None and driver_frames > max_frames:
    raise ValueError(
      f"the driver has {driver_frames} frames, more than the {max_frames} this server animates a request: "
      f"set Frames to {max_frames} or fewer to use its beginning"
    )
  return frames


class RequestFiles:
  """A request's own folder under the server's temporary root: created for one request, removed with everything
  in it when the request ends (the page has copied its results by then)."""

  def __init__(self, root: str | Path | None = None):
    if root is not None:
      Path(root).mkdir(parents=True, exist_ok=True)
    self.path = Path(tempfile.mkdtemp(prefix=REQUEST_PREFIX, dir=root))

  def remove(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


def write_result(result: Result, folder: str | Path) -> tuple[Path, Path]:
  """The animation and its side-by-side as H.264 mp4s in `folder` (each appears only when complete)."""
  folder = Path(folder)
  out = video_io.write_mp4(folder / "animation.mp4", video_io.even_frames(result.frames), result.fps)
  height = result.frames.shape[1]
  sbs = video_io.even_frames(video_io.side_by_side(list(result.columns), height=height))
  side = video_io.write_mp4(folder / "side_by_side.mp4", sbs, result.fps)
  return out, side
