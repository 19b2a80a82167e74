"""MMFA for `mimajax serve`: the generator loaded once, driven by a video and/or the paper's edits (sec. 3.2, C.2)
through the same `animate_frames` as `mimajax animate`.

Edit sliders: yaw / pitch / roll (degrees), scale (s) and tx / ty (t, image units), expression from a second image,
and, when the server was started with an expression VAE stage, expression interpolation through its latent space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mimajax import serving, video_io
from mimajax.faces import detection
from mimajax.mmfa import animate
from mimajax.mmfa.inference import load_inference
from mimajax.mmfa.samples import draw_keypoints

KEYPOINT_VIEW = 256  # pixels of the keypoint picture the page shows
EDITS = (
  serving.Control("yaw", "Yaw (degrees)", "slider", 0.0, -45.0, 45.0, 1.0, "positive turns the face to its left"),
  serving.Control("pitch", "Pitch (degrees)", "slider", 0.0, -30.0, 30.0, 1.0),
  serving.Control("roll", "Roll (degrees)", "slider", 0.0, -30.0, 30.0, 1.0),
  serving.Control("scale", "Scale s", "slider", 1.0, 0.7, 1.3, 0.01, "the face's size on the image plane"),
  serving.Control("tx", "Shift x", "slider", 0.0, -0.3, 0.3, 0.01, "image units: the image spans [-1, 1]"),
  serving.Control("ty", "Shift y", "slider", 0.0, -0.3, 0.3, 0.01),
  serving.Control("exp_from", "Expression from this face", "image", info="transfers its expression code f_exp"),
)
INTERPOLATION = serving.Control(
  "exp_interp", "Interpolate the expression towards this face", "image",
  info="through the expression VAE's latent space (eq. 10-12), from the source's expression to this face's",
)  # fmt: skip


def load_served(path: str | Path, options: Mapping[str, Any]) -> serving.ServedModel:
  """The MMFA generator of a workdir or step folder; options: no_ema, expression_vae (a VAE stage's workdir)."""
  inference = load_inference(path, use_ema=not options.get("no_ema"))
  vae = options.get("expression_vae")
  if vae:
    animate._expression_vae(str(vae))  # loaded (and checked) now, not on the first request that needs it
  res = inference.resolution

  def run(request: serving.Request, progress) -> serving.Result:
    edits = animate.parse_edits(request.edits)
    if edits.exp_interp and not vae:
      raise ValueError("expression interpolation needs an expression VAE: start the server with --expression-vae")
    image = video_io.as_rgb(request.source, "the source image")
    crop = animate.face_crop(image, "the source image")  # no face: the message, before any network runs
    crops = rotations = None
    fps = video_io.DEFAULT_FPS
    if request.driver == "video":
      if not request.driving:
        raise ValueError("no driving video: upload one, or choose to drive with edits only")
      progress(0.05, "reading the driver: face crops and head pose")
      crops, rotations, fps = animate.read_driver(request.driving, request.frames)
      serving.check_frames(None, request.max_frames, driver_frames=len(crops))
    elif request.driver == "edits":
      if edits == animate.Edits():
        raise ValueError("nothing to animate: move an edit slider or give an expression image")
    else:
      raise ValueError(f"MMFA is driven by a video or by edits, not by {request.driver}")
    progress(0.3, "animating")
    source = animate.encode_portrait(inference, crop)  # once: for the frames and for the keypoint picture
    frames = animate.animate_frames(inference, crop, source=source, driver_crops=crops, driver_rotations=rotations,
                                    edits=edits, frames=request.frames or animate.DEFAULT_EDIT_FRAMES,
                                    relative=request.relative, expression_vae=str(vae) if vae else None)  # fmt: skip
    columns = animate.side_by_side_columns(inference, crop, crops, frames)
    shown = max(res, KEYPOINT_VIEW)  # drawn on a larger crop: a 64-px model's keypoints are dots of one pixel
    model_input = draw_keypoints(detection.crop_and_resize(crop, None, shown), np.asarray(source.keypoints()[0]),
                                 radius=max(2, shown // 80))  # fmt: skip
    return serving.Result(
      frames=frames,
      fps=fps,
      source_crop=columns[0],
      columns=columns,
      model_input=model_input,
      model_input_label="the source's keypoints x_s = s (R x_c + delta) + t (eq. 5)",
      summary=f"{len(frames)} frames at {res} px, {fps:g} fps",
    )

  return serving.ServedModel(
    name=f"MMFA, {inference.step_dir}",
    family="mmfa",
    resolution=res,
    drivers=("video", "edits"),
    edit_controls=EDITS + ((INTERPOLATION,) if vae else ()),
    option_controls=(),
    animate=run,
    default_frames=animate.DEFAULT_EDIT_FRAMES,
    notes="A keypoint model: the driver's head pose, scale, shift and expression code move the source's canonical "
    "keypoints; edits are applied on every driven frame, or ramped in from the source without a driver.",
  )
