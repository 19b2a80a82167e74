"""MMFA as `mimajax evaluate` drives it (a families.Animator): dataset face crops in, frames out.

The evaluator hands over face crops as `mimajax prepare` wrote them, with their coefficient rows when the data has
them. The crops go to the networks as they are (resized to the model's resolution). R of eq. 5 comes from the rows'
stored head pose (the model's "dataset" rotation, as in training); without rows, from the landmark pose fit of the
crops (`faces.motion_fit`, the same fit that wrote the rows). Motion is absolute, the paper's: the driver's
R, s, t and expression code on the source's canonical keypoints, for same- and cross-identity pairs alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mimajax import families
from mimajax.mmfa import pose
from mimajax.mmfa.inference import load_inference


def load_animator(path: Path, options: Mapping[str, Any]) -> families.Animator:
  """options: use_ema (default True); `relative` (default False) for face-vid2vid's relative motion."""
  inference = load_inference(path, use_ema=options.get("use_ema", True))
  relative = bool(options.get("relative", False))

  def run(source, source_row, driver, driver_rows, seed: int) -> np.ndarray:
    del seed  # deterministic
    r_source = pose.rotations(np.asarray(source)[None], None if source_row is None else np.asarray(source_row)[None])
    r_driver = pose.rotations(np.asarray(driver), driver_rows)
    return inference.animate(source, r_source[0], driver, r_driver, relative=relative)

  step = inference.step_dir.name if inference.step_dir is not None else "?"
  name = f"mmfa step {step} ({path})"
  return families.Animator(name, inference.resolution, run, inference.config.data.get("path"))
