"""MIMAFace for `mimajax serve`: the model, VAE and face model loaded once, driven by a video, a coefficient file
(Deep3DFaceRecon or SadTalker's audio-driven coeff_3dmm) or edits, through the same `generate_animation` as
`mimajax animate`.

The clip sampler's tqdm bar (one step per clip) is the page's progress bar. The page shows the 3DMM render I_R of
the first frame: the rows the model was given, drawn as it sees them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from mimajax import serving, video_io
from mimajax.mimaface import animate, driving
from mimajax.mimaface.inference import load_inference
from mimajax.mimaface.sampling import SCHEDULERS

EDITS = (
  serving.Control("yaw", "Yaw (degrees)", "slider", 0.0, -45.0, 45.0, 1.0, "positive turns the face to the right"),
  serving.Control("pitch", "Pitch (degrees)", "slider", 0.0, -30.0, 30.0, 1.0, "positive tilts the chin down"),
  serving.Control("roll", "Roll (degrees)", "slider", 0.0, -30.0, 30.0, 1.0),
  serving.Control("exp_scale", "Expression scale", "slider", 1.0, 0.0, 2.0, 0.05, "0: neutral, > 1: exaggerated"),
  serving.Control("exp_from", "Expression from this face", "image", info="its FaceMesh-fitted expression"),
)


def _options(sampler) -> tuple[serving.Control, ...]:
  return (
    serving.Control("steps", "Sampler steps", "number", int(sampler.num_inference_steps), 1, 200, 1),
    serving.Control(
      "guidance",
      "Guidance",
      "slider",
      float(sampler.guidance_scale),
      1.0,
      10.0,
      0.1,
      "classifier-free guidance; 1: none",
    ),  # fmt: skip
    serving.Control("scheduler", "Scheduler", "choice", sampler.scheduler, choices=tuple(SCHEDULERS)),
  )


def load_served(path: str | Path, options: Mapping[str, Any]) -> serving.ServedModel:
  """A MIMAFace workdir, step, export or release folder; options: no_ema, vae (folder), face_model (file)."""
  inference = load_inference(path, use_ema=not options.get("no_ema"), vae_dir=options.get("vae"),
                             face_model_path=options.get("face_model"))  # fmt: skip
  if inference.model.config.mia.variant == "release" and inference.face_features is None:
    raise ValueError(f"{path}: this release MIA needs the source's face features and the folder has no CurricularFace "
                     "weights to compute them")  # fmt: skip
  res = inference.resolution

  def run(request: serving.Request, progress) -> serving.Result:
    image = video_io.as_rgb(request.source, "the source image")
    box = animate.find_face(image)  # no face: the message, before anything else runs
    drv = None
    if request.driver in ("video", "coefficients"):
      if not request.driving:
        raise ValueError(f"no driving {'video' if request.driver == 'video' else 'coefficient file'}: upload one, "
                         "or choose to drive with edits only")  # fmt: skip
      if request.driver == "coefficients" and video_io.is_video(request.driving):
        raise ValueError(f"{Path(request.driving).name} is a video; a coefficient file is a .npy or .mat")
      progress(0.02, "reading the driver")
      drv = driving.read_driving(request.driving, max_frames=request.frames, previews=request.driver == "video")
      serving.check_frames(None, request.max_frames, driver_frames=len(drv))
    elif request.driver != "edits":
      raise ValueError(f"unknown driver {request.driver!r}; expected one of {serving.DRIVERS}")
    elif not request.edits:
      raise ValueError("nothing to animate: move an edit slider or give an expression image")
    driving.parse_edits(request.edits)  # a bad edit fails before the source is fitted
    source_coeffs = animate.source_coefficients(image, res, box=box, face_model=inference.face_model)
    rows, edits = animate.driving_rows(inference, drv, source_coeffs, request.edits, frames=request.frames)
    o = request.options
    given = {"num_inference_steps": o.get("steps"), "guidance_scale": o.get("guidance"),
             "scheduler": o.get("scheduler")}  # fmt: skip
    given = {k: (int(v) if k == "num_inference_steps" else v) for k, v in given.items() if v is not None}
    config = dataclasses.replace(inference.sampler, **given)
    if config.num_inference_steps < 1:
      raise ValueError(f"sampler steps must be >= 1; got {config.num_inference_steps}")
    progress(0.05, "sampling, clip by clip")
    result = animate.generate_animation(inference, image, rows, sampler_config=config, seed=request.seed,
                                        mode="relative" if request.relative else "absolute", edits=edits,
                                        source_coeffs=source_coeffs)  # fmt: skip
    renders = animate.render_frames(inference, result.motion)
    columns = [result.source] + ([drv.previews] if drv is not None and drv.previews is not None else [])
    fps = (drv.fps if drv is not None and drv.fps else None) or video_io.DEFAULT_FPS
    return serving.Result(
      frames=result.frames,
      fps=fps,
      source_crop=result.source,
      columns=columns + [renders, result.frames],
      model_input=renders[0],
      model_input_label="the 3DMM render I_R of the first frame (the blended coefficients, as the model sees them)",
      summary=f"{len(result.frames)} frames at {res} px in {len(result.clip_starts)} clips, {fps:g} fps; "
      f"{config.scheduler}, {config.num_inference_steps} steps, guidance {config.guidance_scale:g}",
    )

  return serving.ServedModel(
    name=f"MIMAFace, {path}",
    family="mimaface",
    resolution=res,
    drivers=serving.DRIVERS,
    edit_controls=EDITS,
    option_controls=_options(inference.sampler),
    animate=run,
    default_frames=animate.DEFAULT_EDIT_FRAMES,
    notes="A diffusion model: the driver becomes 3DMM coefficient rows (blended with the source's identity), "
    "rendered as I_R; clips of the checkpoint's length are sampled one after another, each continuing the last "
    "(ICA).",
  )
