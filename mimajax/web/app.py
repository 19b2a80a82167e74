"""The `mimajax serve` page (Gradio): a portrait in, an animation out, for a model family's `ServedModel`.

  portrait + driver (video | coefficient file | edits alone) + edit sliders + options -> Animate
    -> the animation and the side-by-side (source | driver | ... | output), both playable and downloadable,
       the face crop the model saw, what else drove it (MIMAFace: the render I_R; MMFA: the source's keypoints),
       a one-line summary

The page is drawn from what the family declares (mimajax/serving.py), so it knows no family. One request runs at
a time (Gradio's queue, concurrency 1: two users never share the device at once; the others wait in line and see
their place). Every request gets its own folder for its files, removed when the page has its copies; Gradio's own
copies of uploads and results are deleted after `CACHE_AGE_S`. A bad input is a message in the page
(`gr.Error`); the server keeps serving.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimajax import serving, video_io

log = logging.getLogger("mimajax.serve")

CACHE_AGE_S = 3600  # Gradio's copies of uploads and results live this long (checked every CACHE_AGE_S / 4)
DRIVER_LABELS = {"video": "a driving video", "coefficients": "a coefficient file (.npy / .mat)", "edits": "edits only"}
LABEL_DRIVERS = {v: k for k, v in DRIVER_LABELS.items()}
CSS = "#summary {min-height: 2em} footer {display: none !important}"


def _frames_value(value) -> int | None:
  """The Frames box: 0 or empty means the whole driver (or the default edit length)."""
  if value is None or value == "":
    return None
  value = float(value)
  if not np.isfinite(value) or value != int(value) or value < 0:
    raise ValueError(f"Frames must be a whole number >= 0 (0: the whole driver); got {value:g}")
  return int(value) or None


def _path(value) -> str | None:
  """A Gradio upload's path (a str, or a dict / object with a path, by Gradio version)."""
  if value is None:
    return None
  if isinstance(value, (str, os.PathLike)):
    return str(value)
  if isinstance(value, dict):
    return value.get("path") or value.get("name")
  return getattr(value, "path", None) or getattr(value, "name", None)


def make_request(model: serving.ServedModel, values: dict[str, Any], *, max_frames: int,
                 workdir: Path) -> serving.Request:  # fmt: skip
  """The page's values (by control key; "source", "driver", "video", "coefficients", "frames", "relative", "seed")
  -> a checked Request. ValueError names what is missing or wrong."""
  source = values.get("source")
  if source is None:
    raise ValueError("no portrait: upload an image with a face")
  source = video_io.as_rgb(np.asarray(source), "the portrait")
  driver = LABEL_DRIVERS.get(values.get("driver"), values.get("driver"))
  if driver not in model.drivers:
    raise ValueError(f"this {model.family} model is driven by {', '.join(DRIVER_LABELS[d] for d in model.drivers)}")
  frames = serving.check_frames(_frames_value(values.get("frames")), max_frames)
  driving = None
  if driver == "video":
    driving = _path(values.get("video"))
    if not driving:
      raise ValueError("no driving video: upload one, or choose to drive with edits only")
    video_io.video_fps(driving)  # an unreadable video is named now, before the portrait is fitted
    declared = video_io.declared_frames(driving) if frames is None else None
    serving.check_frames(frames, max_frames, driver_frames=declared)
  elif driver == "coefficients":
    driving = _path(values.get("coefficients"))
    if not driving:
      raise ValueError("no coefficient file: upload a .npy or .mat (Deep3DFaceRecon or SadTalker coefficients)")
  edit_values = {c.key: (_path(values.get(c.key)) if c.kind == "image" else values.get(c.key))
                 for c in model.edit_controls}  # fmt: skip
  edits = serving.edit_strings(model.edit_controls, edit_values)
  seed = values.get("seed")
  return serving.Request(
    source=source,
    driver=driver,
    driving=driving,
    edits=edits,
    frames=frames,
    relative=bool(values.get("relative")),
    options={c.key: values.get(c.key) for c in model.option_controls},
    seed=int(seed or 0),
    max_frames=max_frames,
    workdir=workdir,
  )


def run_request(model: serving.ServedModel, values: dict[str, Any], *, max_frames: int, temp_root: str | None,
                progress: Callable[[float, str], None] = lambda fraction, what: None) -> tuple:  # fmt: skip
  """One press of Animate: (animation mp4, side-by-side mp4, source crop, model input, summary, request folder).
  The folder holds the mp4s until the page has copied them (`finish` removes it); on an error it is removed at
  once and the error raised (ValueError / OSError: the user's input; anything else: a failure)."""
  files = serving.RequestFiles(temp_root)
  try:
    request = make_request(model, values, max_frames=max_frames, workdir=files.path)
    result = model.animate(request, progress)
    progress(0.95, "writing the videos")
    out, side = serving.write_result(result, files.path)
  except BaseException:
    files.remove()
    raise
  summary = result.summary + (f"; {result.model_input_label} shown" if result.model_input is not None else "")
  return str(out), str(side), result.source_crop, result.model_input, summary, str(files.path)


def finish(folder: str | None) -> None:
  """After the page has its copies of a request's results: the request's folder goes."""
  if folder and Path(folder).name.startswith(serving.REQUEST_PREFIX):
    shutil.rmtree(folder, ignore_errors=True)


def _control(gr, control: serving.Control):
  kw = {"label": control.label, "elem_id": f"control_{control.key}", "info": control.info or None}
  if control.kind == "slider":
    return gr.Slider(control.minimum, control.maximum, value=control.default, step=control.step, **kw)
  if control.kind == "number":
    return gr.Number(value=control.default, minimum=control.minimum, maximum=control.maximum, precision=0, **kw)
  if control.kind == "checkbox":
    return gr.Checkbox(value=bool(control.default), **kw)
  if control.kind == "choice":
    return gr.Dropdown(choices=list(control.choices), value=control.default, **kw)
  kw.pop("info")
  return gr.Image(type="filepath", sources=["upload"], height=160, **kw)


def build(model: serving.ServedModel, *, max_frames: int = serving.DEFAULT_MAX_FRAMES, temp_root: str | None = None):
  """The Gradio Blocks for `model` (not launched)."""
  import gradio as gr

  named: dict[str, Any] = {}
  with gr.Blocks(title=f"mimajax: {model.family}", delete_cache=(CACHE_AGE_S // 4, CACHE_AGE_S)) as page:
    gr.Markdown(f"## mimajax · {model.name}\n{model.notes}\n\nOne request runs at a time; at most {max_frames} "
                f"frames a request; frames are {model.resolution} px.")  # fmt: skip
    with gr.Row():
      with gr.Column():
        named["source"] = gr.Image(label="Portrait (a visible face)", type="numpy", sources=["upload"],
                                   elem_id="source", height=300)  # fmt: skip
        named["driver"] = gr.Radio([DRIVER_LABELS[d] for d in model.drivers], value=DRIVER_LABELS[model.drivers[0]],
                                   label="Drive it with", elem_id="driver")  # fmt: skip
        if "video" in model.drivers:
          named["video"] = gr.Video(label="Driving video", sources=["upload"], elem_id="driving_video", height=240)
        if "coefficients" in model.drivers:
          named["coefficients"] = gr.File(label="Coefficients (Deep3DFaceRecon .npy / .mat, SadTalker coeff_3dmm)",
                                          file_types=[".npy", ".mat"], elem_id="coefficients")  # fmt: skip
        with gr.Row():
          label = f"Frames (0: the whole driver; edits only: {model.default_frames})"
          named["frames"] = gr.Number(value=0, precision=0, minimum=0, maximum=max_frames, elem_id="frames",
                                      label=label)  # fmt: skip
          named["seed"] = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        named["relative"] = gr.Checkbox(label="Relative motion (the driver's change since its first frame)",
                                        elem_id="relative")  # fmt: skip
        with gr.Accordion("Edits (applied to every frame; with edits only, ramped in from the source)", open=True):
          for control in model.edit_controls:
            named[control.key] = _control(gr, control)
        if model.option_controls:
          with gr.Accordion("Sampler", open=False):
            for control in model.option_controls:
              named[control.key] = _control(gr, control)
        button = gr.Button("Animate", variant="primary", elem_id="animate")
      with gr.Column():
        result = gr.Video(label="Animation", elem_id="result", autoplay=True, loop=True, buttons=["download"])
        side = gr.Video(label="Side by side: source | driver | ... | output", elem_id="side_by_side", loop=True,
                        buttons=["download"])  # fmt: skip
        with gr.Row():
          crop = gr.Image(label="Face crop the model saw", elem_id="source_crop", format="png", height=200)
          model_input = gr.Image(label="What drives it", elem_id="model_input", format="png", height=200)
        summary = gr.Markdown(elem_id="summary")
    folder = gr.State(None)
    inputs = set(named.values())
    keys = {component: key for key, component in named.items()}

    def on_animate(data, progress=gr.Progress(track_tqdm=True)):
      values = {keys[c]: v for c, v in data.items()}
      try:
        return run_request(model, values, max_frames=max_frames, temp_root=temp_root,
                           progress=lambda f, what: progress(f, desc=what))  # fmt: skip
      except (ValueError, OSError) as e:
        log.info("refused a request: %s", e)
        raise gr.Error(html.escape(str(e)), duration=None, title="Cannot animate this", print_exception=False) from None
      except Exception as e:  # noqa: BLE001  (a failure is reported in the page; the server keeps serving)
        log.error("request failed:\n%s", traceback.format_exc())
        message = f"the animation failed ({type(e).__name__}: {e}); the server's log has the details"
        raise gr.Error(html.escape(message), duration=None, print_exception=False) from None

    button.click(on_animate, inputs=inputs, outputs=[result, side, crop, model_input, summary, folder],
                 concurrency_limit=1, concurrency_id="device").then(finish, inputs=folder)  # fmt: skip
  return page


def launch(page, *, host: str, port: int, queue_size: int, temp_root: str | None, block: bool = True):
  """Serves the page: Gradio's queue with one request on the device at a time, no telemetry, no share link."""
  import gradio as gr

  page.queue(default_concurrency_limit=1, max_size=queue_size)
  return page.launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False,
                     prevent_thread_lock=not block, allowed_paths=[temp_root] if temp_root else None,
                     theme=gr.themes.Base(primary_hue="orange"), css=CSS, footer_links=[])  # fmt: skip
