"""`mimajax animate` (MIMAFace inference): a portrait driven by a video, a coefficient file (audio) or edits.

  source portrait -> face box (faces.detection, as `prepare --crop detect`) -> square crop at the model's resolution
  driver -> 3DMM rows (mimajax.mimaface.driving) -> blended with the source's own coefficients (the release's blend)
  rows -> I_R render latents (mimajax.mimaface.conditioning); source + rows -> MIA appearance context, per clip
  clip by clip (ClipSampler: DDIM/Euler with CFG): clip 1 unconditioned, every later clip starts k frames before
  the previous one ends and conditions on its last k latents (ICA, eq. 3-4; the release's prev_frame_num = 3)
  kept latents -> VAE decoding in fixed-size batches -> frames -> H.264 mp4, written batch by batch

Every clip has the same shape (the last one is padded by repeating the last driving row, as infer_video.py
does), so the sampling loop, the renderer, MIA and the decoder each compile once for the whole video. MIA is
motion-modulated, so each clip gets its own context (the release averages it over the clip's frames; the paper
variant keeps one per frame). A stage-1 (image) model has no ICA: its "clips" are batches of independent frames.
Memory: latents and rows are kept for the whole video (64 KB per 512-px frame); pixels only batch by batch.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import cli_errors, video_io
from mimajax.diffusion import schedulers
from mimajax.face3d.coefficient_files import check_coefficients, read_coefficients
from mimajax.faces import detection
from mimajax.mimaface import conditioning, driving, ica, release_format
from mimajax.mimaface.face_features import find_weights as find_face_recognition_weights
from mimajax.mimaface.inference import load_inference
from mimajax.mimaface.sampling import SCHEDULERS, ClipSampler, SamplerConfig

IMAGE_BATCH = 8  # frames per batch for a stage-1 (image) model
DEFAULT_EDIT_FRAMES = 50  # 2 s at 25 fps
EXTRACTION_RESOLUTION = 256  # the smallest source crop FaceMesh sees (a small model's frames are too few pixels)
PROG = "mimajax animate"
EXIT_ERROR = cli_errors.BAD_INPUT  # bad input
EXIT_FAILED = cli_errors.FAILED  # the output could not be written (nothing replaced the previous one)


@dataclasses.dataclass(frozen=True)
class Animation:
  """What `generate_animation` made, and the inputs it was made from."""

  latents: np.ndarray  # (T, h, w, 4) scaled VAE latents
  frames: np.ndarray | None  # (T, H, W, 3) uint8; None when not decoded (see `iter_frames`)
  source: np.ndarray  # (H, W, 3) uint8: the aligned source crop
  motion: np.ndarray  # (T, 257 | 261): the blended (and edited) coefficients the frames were rendered from
  clip_starts: tuple[int, ...]  # first driving frame of every clip


# ----------------------------------------------------------------------------- the source portrait


def find_face(image, margin: float = detection.FACE_MARGIN, *, what: str = "the source image") -> tuple[int, int, int]:
  """`detection.image_face_box`, or ValueError "no face found in the source ..." (a bad portrait)."""
  return detection.require_image_face_box(video_io.as_rgb(image, what), what, margin)


def crop_source(image, resolution: int, *, box: tuple[int, int, int] | None = None) -> np.ndarray:
  """The aligned face crop (resolution, resolution, 3) uint8 (the face found unless `box` is given)."""
  image = video_io.as_rgb(image, "the source image")
  return detection.crop_and_resize(image, box or find_face(image), resolution)


def source_coefficients(image, resolution: int, *, box=None, path: str | None = None, face_model=None):
  """The source's own coefficients (1, 257 | 261): row FRAME of `path` ("file.npy[:FRAME]"), or from FaceMesh
  landmarks of its face crop in `face_model`'s basis."""
  if path is not None:
    file, frame = driving.parse_frame_spec(str(path))
    rows, _ = read_coefficients(file)
    if frame >= len(rows):
      raise ValueError(f"source coefficients {path}: frame {frame} is out of range; {file} has {len(rows)} rows")
    return rows[frame : frame + 1]
  if face_model is None:
    raise ValueError("the source's coefficients need the checkpoint's face model or a file (--source-coefficients)")
  crop = crop_source(image, max(EXTRACTION_RESOLUTION, resolution), box=box)
  return driving.source_motion(crop, face_model)


def release_face_features(inference, source: np.ndarray) -> np.ndarray:
  """The release MIA's face-recognition input (1, D) of the aligned source crop, computed as the release does
  (mimajax.mimaface.face_features) with the folder's CurricularFace weights."""
  features = inference.face_features(source)
  want = inference.model.config.mia.face_recognition_dim
  if features.shape[-1] != want:
    raise ValueError(
      f"this release MIA takes {want} face-recognition values, CurricularFace's deep features are "
      f"{features.shape[-1]}: pass matching ones (--face-features FILE.npy)"
    )
  return features


# ----------------------------------------------------------------------------- clip plan


def clip_starts(num_frames: int, clip_frames: int, overlap: int) -> list[int]:
  """First frame of every clip: clips of clip_frames, each starting `overlap` frames before the previous ends."""
  if num_frames < 1:
    raise ValueError(f"an animation needs at least one driving frame; got {num_frames}")
  if not 0 <= overlap < clip_frames:
    raise ValueError(f"ICA frames k={overlap} must be in [0, {clip_frames - 1}] for clips of {clip_frames} frames")
  starts = [0]
  while starts[-1] + clip_frames < num_frames:
    starts.append(starts[-1] + clip_frames - overlap)
  return starts


def clip_rows(motion: np.ndarray, start: int, clip_frames: int) -> np.ndarray:
  """Rows start..start+F-1, past the end repeating the last row (so every clip has one shape)."""
  return motion[np.minimum(np.arange(start, start + clip_frames), len(motion) - 1)]


def model_coefficient_width(inference) -> int | None:
  """The coefficient width the model was trained on: 261 for the release MIA, else config.data.coefficient_dim."""
  if inference.model.config.mia.variant == "release":
    return 261
  data = getattr(inference.config, "data", None)
  return data.get("coefficient_dim") if data is not None else None


def _shading(inference) -> str:
  data = getattr(inference.config, "data", None)
  return (data.get("render_shading") if data is not None else None) or "sh"


# ----------------------------------------------------------------------------- jitted pieces (compiled once each)


@nnx.jit
def _appearance(model, source, motion, face_features):
  return model.encode_appearance(source, motion, face_features).context


@functools.partial(nnx.jit, static_argnames=("resolution", "shading"))
def _render_latents(vae, face_model, coeffs, resolution, shading):
  return conditioning.render_latents(vae, face_model, coeffs, resolution, shading)


@functools.partial(jax.jit, static_argnames=("resolution", "shading"))
def _render_images(face_model, coeffs, resolution, shading):
  return conditioning.render_images(face_model, coeffs, resolution, shading)


@nnx.jit
def _decode(vae, latents):
  return conditioning.decode_frames(vae, latents)


def _in_batches(fn, items: np.ndarray, batch: int) -> Iterator[np.ndarray]:
  """fn over fixed-size batches of `items` (the last padded by repetition, so fn compiles once)."""
  for i in range(0, len(items), batch):
    chunk = items[i : i + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    yield np.asarray(fn(jnp.asarray(chunk)))[:n]


def iter_frames(inference, latents: np.ndarray, batch: int) -> Iterator[np.ndarray]:
  """Latents (T, h, w, 4) -> uint8 frames, `batch` at a time (batched VAE decoding)."""
  for images in _in_batches(lambda x: _decode(inference.vae, x), latents, batch):
    yield video_io.to_uint8(images)


def render_frames(inference, motion: np.ndarray, batch: int = 8) -> np.ndarray:
  """The 3DMM renders I_R (T, H, W, 3) uint8 of coefficient rows, as the model sees them (before the VAE)."""
  fn = lambda c: _render_images(inference.face_model, c, inference.resolution, _shading(inference))
  return video_io.to_uint8(np.concatenate(list(_in_batches(fn, np.asarray(motion, np.float32), batch))))


# ----------------------------------------------------------------------------- clip-by-clip sampling


def sample_latents(inference, source: np.ndarray, motion: np.ndarray, *, sampler, clip_frames: int, ica_frames: int,
                   seed: int = 0, progress: bool = True, face_features=None) -> tuple[np.ndarray, list]:  # fmt: skip
  """Latents (T, h, w, 4) for rows `motion` (T, W) of the aligned source crop, sampled clip by clip."""
  from tqdm import tqdm

  model = inference.model
  video = model.config.video
  t = len(motion)
  starts = clip_starts(t, clip_frames, ica_frames if video else 0)
  # A video model sees one clip (1, F, ...); an image model a batch of F independent frames (F, ...).
  lead = (1,) if video else (clip_frames,)
  row_shape = (1, clip_frames, -1) if video else (clip_frames, -1)
  clip_image = conditioning.clip_source(jnp.asarray(source)[None], model.config.clip.image_size)
  clip_image = jnp.broadcast_to(clip_image, lead + clip_image.shape[1:])
  if face_features is not None:
    face_features = jnp.asarray(face_features, jnp.float32).reshape(1, -1)
    face_features = jnp.broadcast_to(face_features, lead + face_features.shape[1:])
  key = jax.random.key(seed)
  kept, previous = [], None
  with tqdm(total=len(starts), desc="animate", unit="clip", disable=not progress, dynamic_ncols=True) as bar:
    for j, start in enumerate(starts):
      rows = jnp.asarray(clip_rows(motion, start, clip_frames)).reshape(row_shape)
      context = _appearance(model, clip_image, rows, face_features)
      render = _render_latents(inference.vae, inference.face_model, rows, inference.resolution, _shading(inference))
      noise = jax.random.normal(jax.random.fold_in(key, j), render.shape, jnp.float32)
      if video:
        # Always arrays (zeros for the first clip), so every clip has the same input structure: one compilation.
        cond, mask = ica.ica_inference_condition(previous, render.shape, ica_frames)
      else:
        cond, mask = jnp.zeros_like(noise), jnp.zeros(noise.shape[:-1] + (1,))
      latents = sampler(context=context, render_latents=render, noise=noise, cond_latents=cond, mask=mask)
      previous = latents
      clip = np.asarray(latents).reshape((clip_frames,) + latents.shape[-3:])
      first = ica_frames if video and j else 0  # the overlap was kept from the previous clip
      kept.append(clip[first : min(clip_frames, t - start)])
      bar.update(1)
  return np.concatenate(kept), starts


def generate_animation(
  inference,
  source_image,
  driving_coeffs,
  *,
  sampler_config: SamplerConfig = SamplerConfig(),
  clip_frames: int | None = None,
  ica_frames: int | None = None,
  seed: int = 0,
  progress: bool = True,
  mode: str = "absolute",
  edits: Sequence[str] = (),
  source_coeffs=None,
  face_features=None,
  sampler=None,
  decode: bool = True,
  decode_batch: int | None = None,
) -> Animation:
  """`animate` with what it was made from; decode=False leaves the pixels to `iter_frames` (long videos)."""
  model = inference.model
  video = model.config.video
  extractor = getattr(inference, "face_features", None)  # a release folder's FaceFeatures
  if model.config.mia.variant == "release" and face_features is None and extractor is None:
    raise ValueError(
      "the release variant's MIA needs the source's face-recognition features (CurricularFace, "
      f"{model.config.mia.face_recognition_dim} values): pass face_features (--face-features FILE.npy)"
    )
  rows = check_coefficients(driving_coeffs, "driving coefficients")
  f = clip_frames or (inference.num_frames if video else min(IMAGE_BATCH, len(rows)))
  k = (inference.ica_frames if ica_frames is None else ica_frames) if video else 0
  if f < 1 or not 0 <= k < f:
    raise ValueError(f"clip_frames={f} must be >= 1 and ica_frames={k} in [0, clip_frames - 1]")
  if video and f > model.config.motion.max_seq_length:
    raise ValueError(f"clip_frames={f} exceeds the motion modules' {model.config.motion.max_seq_length} positions")
  box = find_face(source_image)
  source = crop_source(source_image, inference.resolution, box=box)
  if model.config.mia.variant == "release" and face_features is None:
    face_features = release_face_features(inference, source)
  if source_coeffs is None:
    source_coeffs = source_coefficients(source_image, inference.resolution, box=box, face_model=inference.face_model)
  motion = driving.blend(source_coeffs, rows, mode)
  if edits:
    motion = driving.apply_edits(motion, edits, face_model=inference.face_model)
  motion = driving.fit_width(motion, model_coefficient_width(inference))
  sampler = sampler or ClipSampler(model, inference.schedule, sampler_config)
  latents, starts = sample_latents(inference, source, motion, sampler=sampler, clip_frames=f, ica_frames=k, seed=seed,
                                   progress=progress, face_features=face_features)  # fmt: skip
  frames = np.concatenate(list(iter_frames(inference, latents, decode_batch or f))) if decode else None
  return Animation(latents, frames, source, motion, tuple(starts))


def animate(inference, source_image, driving_coeffs, *, sampler_config: SamplerConfig = SamplerConfig(),
            clip_frames: int | None = None, ica_frames: int | None = None, seed: int = 0, progress: bool = True,
            **options: Any) -> np.ndarray:  # fmt: skip
  """Frames (T, H, W, 3) uint8 of `source_image` driven by coefficient rows (T, 257 | 261).

  The source face is found and cropped (ValueError "no face found in the source ..." otherwise); its own
  coefficients (`source_coeffs`, or from FaceMesh landmarks) are blended with the driver's (`mode` "absolute" |
  "relative", then `edits`); clips of `clip_frames` (default: the checkpoint's F) overlap by `ica_frames` (its k).
  Other options: face_features (release variant), sampler, decode_batch (see `generate_animation`).
  """
  return generate_animation(inference, source_image, driving_coeffs, sampler_config=sampler_config,
                            clip_frames=clip_frames, ica_frames=ica_frames, seed=seed, progress=progress,
                            **options).frames  # fmt: skip


def write_outputs(out, inference, result: Animation, fps: float, *, side_by_side=None, driver_previews=None,
                  batch: int = 8) -> None:  # fmt: skip
  """The mp4 (and optionally source | driver | render | output), decoded and written batch by batch; the files
  appear only when every one is complete."""
  writers = [video_io.Mp4Writer(out, fps)] + ([video_io.Mp4Writer(side_by_side, fps)] if side_by_side else [])
  try:
    for i, frames in enumerate(iter_frames(inference, result.latents, batch)):
      writers[0].write(frames)
      if side_by_side:
        rows = slice(i * batch, i * batch + len(frames))
        columns = [result.source] + ([] if driver_previews is None else [driver_previews[rows]])
        columns += [render_frames(inference, result.motion[rows], batch), frames]
        writers[1].write(video_io.side_by_side(columns, height=frames.shape[1]))
    for w in writers:
      w.close()
    for w in writers:
      w.commit()
  except BaseException:
    for w in writers:
      w.discard()
    raise


# ----------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
  p.add_argument("--checkpoint", required=True, help="training workdir, checkpoint step folder or release folder")
  p.add_argument("--source", required=True, help="portrait image (PNG/JPEG) with a visible face")
  p.add_argument("--driving", help="video, or coefficients .npy / .mat (Deep3DFaceRecon, SadTalker's coeff_3dmm)")
  p.add_argument("--edit", action="append", default=[], metavar="KEY=VALUE",
                 help="yaw=+15, pitch=-10, roll=5 (degrees), tx/ty/tz=, exp_scale=, exp_from=|pose_from=|gaze_from="
                      "FILE[:FRAME]; repeat or separate by commas. Without --driving the video moves from the "
                      "source to the edit")  # fmt: skip
  p.add_argument("--out", required=True, help="output .mp4 (H.264)")
  p.add_argument("--frames", type=int, default=None,
                 help=f"video length (default: the whole driver; {DEFAULT_EDIT_FRAMES} for edits)")  # fmt: skip
  p.add_argument("--relative", action="store_true", help="source motion + the driver's change since its first frame")
  p.add_argument("--side-by-side", default=None, metavar="PATH", help="also write source | driver | render | output")
  # Sampler flags default to the checkpoint's own sampler (Inference.sampler: its training config's `sample`, an
  # export's saved settings, the release's Euler / 25 / 5.0 / linspace for release folders).
  p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="default: the checkpoint's")
  p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
  p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance; 1 = none (default: the "
                 "checkpoint's)")  # fmt: skip
  p.add_argument("--timestep-spacing", default=None, choices=list(schedulers.TIMESTEP_SPACINGS),
                 help="how the sampler's timesteps spread over the schedule (default: the checkpoint's)")  # fmt: skip
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--source-coefficients", default=None, metavar="FILE[:FRAME]",
                 help="the source's own 3DMM coefficients (default: from its FaceMesh landmarks)")  # fmt: skip
  p.add_argument("--face-features", default=None, metavar="FILE.npy",
                 help="the source's face-recognition features for a release folder's MIA (default: CurricularFace "
                      "IR-101 of the source, as the release computes them)")  # fmt: skip
  p.add_argument("--vae", default=None, metavar="DIR", help="diffusers VAE folder (release folders ship none)")
  p.add_argument("--face-model", default=None, metavar="PATH",
                 help="the coefficients' morphable model: face_model.npz, BFM_model_front.mat (release)")  # fmt: skip
  p.add_argument("--clip-frames", type=int, default=None, help="frames per clip (default: the checkpoint's)")
  p.add_argument("--ica-frames", type=int, default=None, help="frames each clip takes from the previous one")
  p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's, or 25)")
  p.add_argument("--hold-edit", action="store_true", help="edits without --driving: hold the edit, no ramp")
  p.add_argument("--no-ema", action="store_true", help="the raw weights rather than the EMA copy")
  p.add_argument("--no-progress", action="store_true")


def _check_args(args) -> None:
  video_io.check_output_path(args.out, "--out")
  if args.side_by_side:
    video_io.check_output_path(args.side_by_side, "--side-by-side")
    if Path(args.side_by_side).absolute() == Path(args.out).absolute():
      raise ValueError("--side-by-side must differ from --out")
  if not args.driving and not args.edit:
    raise ValueError("nothing drives the source: give --driving (video or coefficient file) and/or --edit KEY=VALUE")
  for name in ("frames", "steps", "clip_frames"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
  if args.fps is not None and not args.fps > 0:
    raise ValueError(f"--fps must be > 0; got {args.fps}")
  driving.parse_edits(args.edit)  # a typo fails now, not after the checkpoint loads


def sampler_from_args(default: SamplerConfig, args) -> SamplerConfig:
  """The checkpoint's sampler with the flags the user gave (None: not given) in its place."""
  given = {"scheduler": args.scheduler, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
           "timestep_spacing": args.timestep_spacing}  # fmt: skip
  return dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})


def _load_inference(args):
  return load_inference(args.checkpoint, use_ema=not args.no_ema, vae_dir=args.vae, face_model_path=args.face_model)


def _face_features(path: str | None) -> np.ndarray | None:
  if path is None:
    return None
  try:
    x = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"--face-features {path} is not a readable .npy array ({type(e).__name__}: {e})") from e
  if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
    raise ValueError(f"--face-features {path}: expected finite numbers; got dtype {x.dtype}")
  return np.asarray(x, np.float32).reshape(1, -1)


def driving_rows(inference, drv, source_coeffs, edits: Sequence[str], *, frames: int | None = None,
                 hold_edit: bool = False) -> tuple[np.ndarray, Sequence[str]]:  # fmt: skip
  """(rows to blend with the source, edits still to apply): a driver's rows and the edits, or without a driver the
  source's own row moving to the edit over `frames` frames (held with `hold_edit`), the edits already in it."""
  if drv is None:
    rows = driving.edit_sequence(source_coeffs, edits, frames or DEFAULT_EDIT_FRAMES, ramp=not hold_edit,
                                 face_model=inference.face_model)  # fmt: skip
    return rows, ()
  return driving.with_motion(drv, inference.face_model).coeffs, edits


def run(args) -> int:
  """`mimajax animate`: 0 on success; 2 with a message on stderr (and no output file) on bad input; 1 if writing the
  output failed (a full disk: the previous file at --out is untouched)."""
  try:
    _check_args(args)
    # Everything about the inputs is checked before the checkpoint loads: bad input fails in seconds.
    image = video_io.read_image(args.source)
    box = find_face(image)
    drv = None
    if args.driving:
      drv = driving.read_driving(args.driving, max_frames=args.frames, previews=bool(args.side_by_side))
      if args.frames and len(drv) < args.frames:
        raise ValueError(f"--frames {args.frames}: the driver {args.driving} has only {len(drv)} frames")
    features = _face_features(args.face_features)
    release = any(Path(args.checkpoint, f).is_file() for f in (release_format.MIA_FILE, release_format.UNET3D_FILE))
    if features is None and release:
      find_face_recognition_weights(args.checkpoint)  # a release MIA's features need its IR-101 file: say so now
    inference = _load_inference(args)
    source_coeffs = source_coefficients(image, inference.resolution, box=box, path=args.source_coefficients,
                                        face_model=inference.face_model)  # fmt: skip
    rows, edits = driving_rows(inference, drv, source_coeffs, args.edit, frames=args.frames, hold_edit=args.hold_edit)
    config = sampler_from_args(inference.sampler, args)
    result = generate_animation(inference, image, rows, sampler_config=config, clip_frames=args.clip_frames,
                                ica_frames=args.ica_frames, seed=args.seed, progress=not args.no_progress,
                                mode="relative" if args.relative else "absolute", edits=edits,
                                source_coeffs=source_coeffs, face_features=features, decode=False)  # fmt: skip
    fps = args.fps or (drv.fps if drv is not None and drv.fps else video_io.DEFAULT_FPS)
    write_outputs(args.out, inference, result, fps, side_by_side=args.side_by_side,
                  driver_previews=None if drv is None else drv.previews)  # fmt: skip
  except video_io.VideoWriteError as e:  # the inputs were fine; writing the result failed (e.g. a full disk)
    return cli_errors.report(PROG, e, code=EXIT_FAILED)
  except (ValueError, OSError) as e:
    return cli_errors.report(PROG, e, code=EXIT_ERROR)
  print(f"wrote {args.out}: {len(result.latents)} frames, {len(result.clip_starts)} clips")
  return 0
