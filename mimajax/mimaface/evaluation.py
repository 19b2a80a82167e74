"""MIMAFace as `mimajax evaluate` drives it (a families.Animator): dataset crops and their 3DMM rows in, frames out.

The evaluator hands over face crops as `mimajax prepare` wrote them, with their 3DMM rows; the source crop is the
model's input as it is (resized to the model's resolution, no face detection: it is already the aligned crop), and
the driver's rows are blended with the source's own row the way `mimajax animate` blends them ("absolute": the
driver's pose, expression and gaze on the source's identity, texture and light), then sampled clip by clip with ICA
and decoded. The sampler is the checkpoint's own (`Inference.sampler`) unless the options override its steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mimajax import families
from mimajax.faces import detection
from mimajax.mimaface import animate, driving
from mimajax.mimaface.inference import load_inference
from mimajax.mimaface.sampling import ClipSampler


def _describe(path: Path, inference) -> str:
  config = inference.config
  stage = f"stage {config.stage}" if config is not None and "stage" in config else "export/release"
  return f"mimaface {stage} ({path})"


def load_animator(path: Path, options: Mapping[str, Any]) -> families.Animator:
  """options: steps (sampler steps; default the checkpoint's), use_ema (default True), vae_dir, face_model."""
  inference = load_inference(path, use_ema=options.get("use_ema", True), vae_dir=options.get("vae_dir"),
                             face_model_path=options.get("face_model"))  # fmt: skip
  config = inference.sampler
  if options.get("steps"):
    config = dataclasses.replace(config, num_inference_steps=int(options["steps"]))
  sampler = ClipSampler(inference.model, inference.schedule, config)
  video = inference.model.config.video
  width = animate.model_coefficient_width(inference)
  res = inference.resolution
  release = inference.model.config.mia.variant == "release"

  def run(source, source_row, driver, driver_rows, seed: int) -> np.ndarray:
    if source_row is None or driver_rows is None:
      raise ValueError("MIMAFace is driven by 3DMM rows: the evaluation data must hold coefficients")
    crop = detection.crop_and_resize(source, None, res)  # the centre square: it is already the aligned crop
    # a release MIA's CurricularFace input, from the crop it animates (as `mimajax animate` computes it)
    features = animate.release_face_features(inference, crop) if release else None
    motion = driving.fit_width(driving.blend(np.asarray(source_row)[None], driver_rows, "absolute"), width)
    f = inference.num_frames if video else min(animate.IMAGE_BATCH, len(motion))
    k = inference.ica_frames if video else 0
    latents, _ = animate.sample_latents(inference, crop, motion, sampler=sampler, clip_frames=f, ica_frames=k,
                                        seed=seed, progress=False, face_features=features)  # fmt: skip
    return np.concatenate(list(animate.iter_frames(inference, latents, f)))

  data = getattr(inference.config, "data", None) if inference.config is not None else None
  return families.Animator(_describe(Path(path), inference), res, run, data.get("path") if data else None)
