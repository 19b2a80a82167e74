"""`mimajax animate --checkpoint <MMFA workdir>`: a portrait driven by a video, and the paper's edits (sec. 3.2, C.2).

  --driving VIDEO        each frame's R (landmark pose fit), s, t and expression code on the source's canonical
                         keypoints (absolute, the paper's); --relative: the driver's change since its first frame
                         applied to the source's own parameters (face-vid2vid / LivePortrait's relative mode)
  --edit KEY=VALUE       on every frame (with a driver) or ramped in over --frames frames from the source (without):
    yaw=, pitch=, roll=  degrees, composed with R (face-vid2vid's angle convention)
    scale=1.2            multiplies s (the face's size on the image plane)
    tx=, ty=             added to t (image-plane units: the image spans [-1, 1])
    exp_from=IMAGE       the expression code f_exp of another face image (expression transfer)
    exp_interp=IMAGE     from the source's expression to IMAGE's through the expression VAE's latent space
                         (eq. 10-12; needs --expression-vae WORKDIR): z = (1 - a) mu_source + a mu_image, a: 0 -> 1

Bad input (no face, an unknown edit, a missing VAE) fails before the checkpoint loads, with nothing written.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimajax import cli_errors, video_io
from mimajax.faces import detection, tracking
from mimajax.mmfa import keypoints, pose
from mimajax.mmfa.inference import load_inference, relative_to_first

PROG = "mimajax animate"
EXIT_ERROR, EXIT_FAILED = 2, 1
DEFAULT_EDIT_FRAMES = 32
ANGLE_KEYS = ("yaw", "pitch", "roll")
NUMBER_KEYS = ANGLE_KEYS + ("scale", "tx", "ty")
IMAGE_KEYS = ("exp_from", "exp_interp")


@dataclasses.dataclass(frozen=True)
class Edits:
  yaw: float = 0.0
  pitch: float = 0.0
  roll: float = 0.0
  scale: float = 1.0
  tx: float = 0.0
  ty: float = 0.0
  exp_from: str | None = None
  exp_interp: str | None = None


def parse_edits(specs) -> Edits:
  """`key=value` strings (repeatable, or comma-separated) -> Edits; ValueError naming a bad one."""
  values: dict = {}
  for spec in specs or ():
    for item in filter(None, (s.strip() for s in spec.split(","))):
      key, sep, value = item.partition("=")
      if not sep or not value:
        raise ValueError(f"--edit {item!r}: expected KEY=VALUE with KEY one of {NUMBER_KEYS + IMAGE_KEYS}")
      if key in NUMBER_KEYS:
        try:
          values[key] = float(value)
        except ValueError:
          raise ValueError(f"--edit {item!r}: {key} takes a number") from None
      elif key in IMAGE_KEYS:
        if not Path(value).is_file():
          raise ValueError(f"--edit {item!r}: {value} is not an image file")
        values[key] = value
      else:
        raise ValueError(f"--edit {item!r}: unknown key {key!r}; expected one of {NUMBER_KEYS + IMAGE_KEYS}")
  edits = Edits(**values)
  if edits.scale <= 0:
    raise ValueError(f"--edit scale={edits.scale}: the scale must be > 0")
  if edits.exp_from and edits.exp_interp:
    raise ValueError("--edit exp_from and exp_interp both set the expression; keep one")
  return edits


def face_crop(image: np.ndarray, what: str) -> np.ndarray:
  """The aligned face crop of an image at the face box's own size (the pipeline's crop), or ValueError."""
  image = video_io.as_rgb(image, what)
  box = detection.require_image_face_box(image, what)
  return detection.crop_and_resize(image, box, box[2])


def apply_edits(motions: keypoints.Motion, edits: Edits, ramp: jax.Array) -> keypoints.Motion:
  """R, s and t edited, each edit scaled by `ramp` (T,) (1: the full edit)."""
  extra = keypoints.rotation_from_degrees(edits.yaw * ramp, edits.pitch * ramp, edits.roll * ramp)
  rotation = jnp.einsum("nij,njk->nik", extra, motions.rotation)
  scale = motions.scale * (1.0 + (edits.scale - 1.0) * ramp)
  shift = jnp.stack([edits.tx * ramp, edits.ty * ramp, jnp.zeros_like(ramp)], -1)
  return keypoints.Motion(rotation, motions.delta, scale, motions.translation + shift)


@functools.lru_cache(maxsize=4)
def _expression_vae(path: str | None):
  """The expression VAE stage at `path`, loaded once per process (a server's requests share it)."""
  if not path:
    raise ValueError("--edit exp_interp needs --expression-vae WORKDIR (a trained `expression_vae` stage)")
  from mimajax.mmfa import expression_vae_stage

  return expression_vae_stage.load(path)


def encode_portrait(inference, crop: np.ndarray):
  """The source's encoding (appearance volume, x_c, its own eq. 5 motion, f_exp) from its face crop (`face_crop`),
  with R from its landmark pose fit."""
  return inference.encode_source(crop, pose.rotations(crop[None])[0])


def animate_frames(inference, crop: np.ndarray, *, source=None, driver_crops=None, driver_rotations=None,
                   edits: Edits = Edits(), frames: int = DEFAULT_EDIT_FRAMES, relative: bool = False,
                   expression_vae: str | None = None) -> np.ndarray:  # fmt: skip
  """Frames (T, R, R, 3) uint8 of the source's face crop (`face_crop`), driven and/or edited; `source`: its
  `encode_portrait`, when the caller has it already."""
  source = encode_portrait(inference, crop) if source is None else source
  r_source = source.motion.rotation[0]
  if driver_crops is not None:
    head, f_exp = inference.codes(driver_crops)
    rotations = jnp.asarray(driver_rotations, jnp.float32)
    ramp = jnp.ones((len(f_exp),), jnp.float32)
  else:  # the source alone, the edits ramped in
    t = frames
    head = jax.tree.map(lambda x: jnp.broadcast_to(x, (t,) + x.shape[1:]), inference.codes(crop[None])[0])
    f_exp = jnp.broadcast_to(source.expression, (t,) + source.expression.shape[1:])
    rotations = jnp.broadcast_to(jnp.asarray(r_source)[None], (t, 3, 3))
    ramp = jnp.linspace(0.0, 1.0, t, dtype=jnp.float32)
  if edits.exp_from:
    target = face_crop(video_io.read_image(edits.exp_from), f"--edit exp_from={edits.exp_from}")
    f_target = inference.codes(target[None])[1]
    f_exp = f_exp + ramp[:, None] * (jnp.broadcast_to(f_target, f_exp.shape) - f_exp)
  if edits.exp_interp:
    vae = _expression_vae(expression_vae)
    target = face_crop(video_io.read_image(edits.exp_interp), f"--edit exp_interp={edits.exp_interp}")
    f_target = inference.codes(target[None])[1]
    mu_a, _ = vae.encode(f_exp)
    mu_b, _ = vae.encode(jnp.broadcast_to(f_target, f_exp.shape))
    f_exp = vae.decode(mu_a + ramp[:, None] * (mu_b - mu_a))  # sec. 4.4: along the line between posterior means
  motions = inference.motions(source, f_exp, head, rotations)
  if relative and driver_crops is not None:
    motions = relative_to_first(source, motions)
  return inference.render(source, apply_edits(motions, edits, ramp))


def read_driver(path: str, max_frames: int | None) -> tuple[np.ndarray, np.ndarray, float]:
  """(face crops (T, S, S, 3), R (T, 3, 3), fps) of a driving video."""
  if not video_io.is_video(path):
    raise ValueError(f"--driving {path}: MMFA is driven by a video (its frames are the networks' input)")
  box, stream = tracking.video_crops(path, max_frames)
  crops = np.stack(list(stream()))
  if max_frames and len(crops) < max_frames:
    raise ValueError(f"--frames {max_frames}: the driver {path} has only {len(crops)} frames")
  return crops, pose.rotations(crops), video_io.video_fps(path)


def side_by_side_columns(inference, crop: np.ndarray, driver_crops, frames: np.ndarray) -> list[np.ndarray]:
  """source face crop | driver crops (when driven by a video) | output, each at the model's resolution."""
  res = inference.resolution
  columns = [detection.crop_and_resize(crop, None, res)]
  if driver_crops is not None:
    columns.append(np.stack([detection.crop_and_resize(c, None, res) for c in driver_crops]))
  return columns + [frames]


def add_arguments(p) -> None:
  p.add_argument("--checkpoint", required=True, help="an MMFA training workdir or checkpoint step folder")
  p.add_argument("--source", required=True, help="portrait image (PNG/JPEG) with a visible face")
  p.add_argument("--driving", help="driving video")
  p.add_argument(
    "--edit",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="yaw= pitch= roll= (degrees), scale=, tx= ty= (image units), exp_from=IMAGE, exp_interp=IMAGE",
  )
  p.add_argument("--out", required=True, help="output .mp4 (H.264)")
  p.add_argument("--frames", type=int, default=None, help="frames: the driver's first N, or the edit's length")
  p.add_argument("--relative", action="store_true", help="source motion + the driver's change since its first frame")
  p.add_argument("--expression-vae", default=None, metavar="WORKDIR", help="the expression VAE stage (exp_interp)")
  p.add_argument("--side-by-side", default=None, metavar="PATH", help="also write source | driver | output")
  p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's, or 25)")
  p.add_argument("--no-ema", action="store_true", help="the raw weights rather than the EMA copy")
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  """0 on success; 2 with a message (and no output file) on bad input; 1 if writing the output failed."""
  try:
    video_io.check_output_path(args.out)
    if args.frames is not None and args.frames < 1:
      raise ValueError(f"--frames {args.frames}: must be >= 1")
    edits = parse_edits(args.edit)
    if edits.exp_interp and not args.expression_vae:
      raise ValueError("--edit exp_interp needs --expression-vae WORKDIR (a trained `expression_vae` stage)")
    if not args.driving and edits == Edits():
      raise ValueError("nothing to animate: give --driving VIDEO and/or --edit KEY=VALUE")
    image = video_io.read_image(args.source)
    crop = face_crop(image, "the source image")  # before the checkpoint loads: a bad portrait fails in seconds
    crops = rotations = None
    fps = args.fps or video_io.DEFAULT_FPS
    if args.driving:
      crops, rotations, driver_fps = read_driver(args.driving, args.frames)
      fps = args.fps or driver_fps or video_io.DEFAULT_FPS
    inference = load_inference(args.checkpoint, use_ema=not args.no_ema)
    frames = animate_frames(inference, crop, driver_crops=crops, driver_rotations=rotations, edits=edits,
                            frames=args.frames or DEFAULT_EDIT_FRAMES, relative=args.relative,
                            expression_vae=args.expression_vae)  # fmt: skip
    video_io.write_mp4(args.out, video_io.even_frames(frames), fps)
    if args.side_by_side:
      columns = side_by_side_columns(inference, crop, crops, frames)
      video_io.write_mp4(args.side_by_side, video_io.even_frames(video_io.side_by_side(columns)), fps)
  except video_io.VideoWriteError as e:
    return cli_errors.report(PROG, e, code=EXIT_FAILED)
  except (ValueError, OSError) as e:
    return cli_errors.report(PROG, e, code=EXIT_ERROR)
  print(f"wrote {args.out}: {len(frames)} frames")
  return 0
