"""`mimajax bench loader`: clips per second through the real Grain loader, against what a GPU step consumes;
`mimajax bench prepare`: videos per second per worker through `prepare`, and what VoxCeleb2 costs at that rate.

Without --data it first prepares a synthetic dataset into a temporary folder through `prepare`: clips
of real 512 px photographs (scikit-image's astronaut, matplotlib's Grace Hopper; a procedural pattern
if those packages are missing) moved by a synthetic head motion, so the JPEGs carry real image
detail (VoxCeleb2's 224 px clips upscaled to 512 px compress further and decode no slower).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline import demo_data, prepare  # light: the CLI imports this module for its arguments

# What one GPU consumes, for comparison (an assumption, not measured here): SD1.5's U-Net forward +
# backward at 512 px (64x64 latents) in bf16 at about 24 frames/s on one H100 (public SD training
# throughputs: ~20 img/s per A100 at 256 px, 4x the tokens at 512 px, H100 ~2.5x an A100). Stage 2
# adds motion modules but freezes the U-Net's weights, so its per-frame cost is of that order.
GPU_FRAMES_PER_S = 24.0
STAGE2_CLIPS_PER_STEP = 8  # the paper's stage 2: batch 8 clips of 12 frames


def _photos(resolution: int) -> list[np.ndarray]:
  import cv2

  try:
    photos = [p for name, p in demo_data.portraits().items() if not name.startswith("lfw")]
  except ValueError:  # scikit-image / matplotlib missing: a detailed procedural pattern instead
    y, x = np.mgrid[:resolution, :resolution] / resolution
    rng = np.random.default_rng(0)
    pattern = [np.sin(40 * x * (1 + c) + 25 * y**2) * 0.5 + 0.5 + rng.normal(0, 0.05, x.shape) for c in range(3)]
    photos = [np.uint8(np.clip(np.stack(pattern, -1), 0, 1) * 255)]
  out = []
  for p in photos:
    s = min(p.shape[:2])
    y0, x0 = (p.shape[0] - s) // 2, (p.shape[1] - s) // 2
    out.append(cv2.resize(p[y0 : y0 + s, x0 : x0 + s], (resolution, resolution), interpolation=cv2.INTER_AREA))
  return out


def synthetic_dataset(folder: str | os.PathLike, *, resolution: int = 512, videos: int = 8, frames: int = 64,
                      workers: int = 1) -> Path:  # fmt: skip
  """Prepare `videos` synthetic clips of `frames` frames into folder/records; returns that folder."""
  folder = Path(folder)
  photos = _photos(resolution)
  rng = np.random.default_rng(0)
  for v in range(videos):
    path = folder / "videos" / f"id{v % 4:05d}" / f"synthetic{v:02d}" / "00001.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = demo_data.animate(photos[v % len(photos)], frames + v)[v:]  # a different phase per video
    demo_data.write_mp4(path, clip)
    np.save(path.with_suffix(".npy"), rng.normal(size=(frames, 257)).astype(np.float32))
  options = prepare.PrepareOptions(resolution=resolution, frames_per_record=64, shard_size=2)
  prepare.prepare(folder / "videos", folder / "records", options=options, workers=workers, progress=False)
  return folder / "records"


# VoxCeleb2's dev set (Chung et al. 2018): 1,092,009 utterances of 5,994 speakers, 2,442 hours, 224 x 224 at 25 fps:
# ~201 frames per clip on average.
VOX2_DEV_CLIPS = 1_092_009
VOX2_DEV_HOURS = 2_442
VOX2_FPS = 25
VOX2_SIZE = 224


def vox2_clip_frames() -> int:
  return round(VOX2_DEV_HOURS * 3600 * VOX2_FPS / VOX2_DEV_CLIPS)


def write_clips(folder: str | os.PathLike, *, videos: int, frames: int, size: int) -> Path:
  """`videos` clips of `frames` frames at size x size in the VoxCeleb2 layout, each with a 257-column .npy (the
  user's Deep3DFaceRecon coefficients), real photographs moved by a synthetic head motion; returns the folder."""
  import cv2

  folder = Path(folder)
  photos = [cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in _photos(512)]
  rng = np.random.default_rng(0)
  for v in range(videos):
    path = folder / f"id{v % 4:05d}" / f"bench{v:03d}" / "00001.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    demo_data.write_mp4(path, demo_data.animate(photos[v % len(photos)], frames + v)[v:])
    np.save(path.with_suffix(".npy"), rng.normal(size=(frames, 257)).astype(np.float32))
  return folder


def bench_prepare(*, videos: int, frames: int, size: int, resolution: int, workers: int, crop: str = "center",
                  extract_motion: bool = False) -> dict:  # fmt: skip
  """Times `prepare` over freshly written clips (writing them is not timed); returns the figures."""
  with tempfile.TemporaryDirectory(prefix="mimajax_bench_prepare_") as tmp:
    clips = write_clips(Path(tmp) / "videos", videos=videos, frames=frames, size=size)
    if extract_motion:
      for npy in clips.rglob("*.npy"):
        npy.unlink()  # nothing provided: MediaPipe's motion for every clip
    options = prepare.PrepareOptions(resolution=resolution, frames_per_record=64, shard_size=max(1, videos // 4),
                                     crop=crop)  # fmt: skip
    t0 = time.perf_counter()
    manifest = prepare.prepare(clips, Path(tmp) / "out", options=options, workers=workers, progress=False,
                               extract_motion=extract_motion)  # fmt: skip
    seconds = time.perf_counter() - t0
    stored = sum(p.stat().st_size for p in (Path(tmp) / "out").glob("*.array_record"))
  done = manifest["counts"]["videos"]
  if done != videos:
    raise ValueError(f"prepare skipped {videos - done} of the {videos} bench clips: {manifest['skipped']}")
  return dict(videos=videos, frames=done * frames, seconds=seconds, videos_per_s=videos / seconds / workers,
              bytes_per_frame=stored / max(1, done * frames), records=manifest["counts"]["records"],
              frames_per_s=done * frames / seconds / workers)  # fmt: skip


def run_prepare(args) -> int:
  """The `mimajax bench prepare` command: per-worker throughput, then the VoxCeleb2 dev estimate."""
  frames = args.clip_frames or vox2_clip_frames()
  resolution = args.resolution or 512
  if min(args.videos, args.prepare_workers, args.clip_size) < 1 or frames < 2:
    raise ValueError(f"--videos {args.videos}, --prepare-workers {args.prepare_workers} and --clip-size "
                     f"{args.clip_size} must be >= 1 and --clip-frames {frames} >= 2")  # fmt: skip
  r = bench_prepare(videos=args.videos, frames=frames, size=args.clip_size, resolution=resolution,
                    workers=args.prepare_workers, crop=args.crop, extract_motion=args.extract_motion)  # fmt: skip
  what = "MediaPipe motion extracted" if args.extract_motion else "coefficients provided"
  print(f"prepare: {args.videos} clips of {frames} frames at {args.clip_size} px -> {resolution} px JPEG records "
        f"(crop {args.crop}, {what}) with {args.prepare_workers} worker(s) on {os.cpu_count()} cores: "
        f"{r['seconds']:.1f} s, {r['frames_per_s']:.0f} frames/s per worker; {r['records']} records, "
        f"{r['bytes_per_frame'] / 1024:.1f} KiB per stored frame")  # fmt: skip
  tib = r["bytes_per_frame"] * VOX2_DEV_CLIPS * vox2_clip_frames() / 2**40
  per_clip = r["frames_per_s"] / vox2_clip_frames()  # clips/s per worker at VoxCeleb2's mean length
  worker_hours = VOX2_DEV_CLIPS / per_clip / 3600
  print(f"VoxCeleb2 dev ({VOX2_DEV_CLIPS:,} clips, {VOX2_DEV_HOURS:,} h, ~{vox2_clip_frames()} frames per clip): "
        f"{worker_hours:,.0f} worker-hours at this rate; "
        + ", ".join(f"{worker_hours / n:,.1f} h on {n} workers" for n in (1, 64, 512))
        + f"; {tib:.1f} TiB of records")  # fmt: skip
  print(f"videos_per_s={r['videos_per_s']:.3f}")
  return 0


def bench_loader(data, *, num_frames: int = 12, batch: int = 8, resolution: int | None = None, workers: int = 0,
                 read_threads: int = 4, seconds: float = 15.0, warmup_batches: int = 2) -> dict:  # fmt: skip
  """Stream batches for about `seconds` after warm-up (worker start-up excluded); returns the figures."""
  from data_pipeline import loader

  cfg = loader.LoaderConfig(num_frames=num_frames, batch_size=batch, resolution=resolution, flip=True)
  t0 = time.perf_counter()
  it = loader.make_iterator(data, cfg, process_index=0, process_count=1, workers=workers, read_threads=read_threads)
  for _ in range(warmup_batches):
    first = next(it)
  startup = time.perf_counter() - t0
  clips, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds or clips == 0:
    clips += len(next(it)["identity"])
  elapsed = time.perf_counter() - t0
  shape = first["frames"].shape
  return dict(clips=clips, seconds=elapsed, clips_per_s=clips / elapsed, startup_s=startup, batch_shape=shape,
              frames_per_s=clips * (num_frames + 1) / elapsed)  # fmt: skip


def run(args) -> int:
  """The `mimajax bench loader` command (args from mimajax.cli)."""
  resolution = args.resolution or 512
  batch = args.batch or STAGE2_CLIPS_PER_STEP
  with tempfile.TemporaryDirectory(prefix="mimajax_bench_loader_") as tmp:
    data = args.data
    if data is None:
      t0 = time.perf_counter()
      data = synthetic_dataset(tmp, resolution=resolution, videos=args.videos, workers=args.prepare_workers)
      print(f"prepared a synthetic dataset ({args.videos} clips of 64 frames at {resolution} px) in "
            f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    r = bench_loader(data, num_frames=args.num_frames, batch=batch, resolution=args.resolution if args.data else None,
                     workers=args.workers, read_threads=args.read_threads, seconds=args.seconds)  # fmt: skip
  print(f"loader: batch {r['batch_shape']} (uint8), workers={args.workers}, read_threads={args.read_threads}, "
        f"{os.cpu_count()} cores; start-up {r['startup_s']:.1f}s")  # fmt: skip
  print(f"loader: {r['clips']} clips in {r['seconds']:.1f}s, {r['frames_per_s']:.0f} JPEG frames decoded/s")
  steps = args.gpu_frames_per_s / (batch * args.num_frames)  # training steps/s one GPU sustains
  stage = "stage 2" if args.num_frames > 1 else "stage 1"
  print(f"GPU side (assumed, not measured here: {args.gpu_frames_per_s:g} frames/s of SD1.5 U-Net forward+backward "
        f"at 512 px per H100-class GPU in bf16; --gpu-frames-per-s): {stage} at {batch} clips x {args.num_frames} "
        f"frames per step runs {steps:.2f} steps/s = {steps * batch:.1f} clips/s per GPU; "
        f"this loader feeds {r['clips_per_s'] / (steps * batch):.1f} GPUs")  # fmt: skip
  print(f"clips_per_s={r['clips_per_s']:.2f}")
  return 0


def add_arguments(p) -> None:
  """Loader options of `mimajax bench` (--batch and --resolution are shared with `bench unet`)."""
  p.add_argument("--data", default=None, help="loader: a prepared folder; default: prepare a synthetic one")
  p.add_argument("--num-frames", type=int, default=12, help="loader: frames per clip (1: stage-1 images)")
  p.add_argument("--workers", type=int, default=0, help="loader: worker processes (0: read threads only)")
  p.add_argument("--read-threads", type=int, default=4, help="loader: decoding threads per process")
  p.add_argument("--seconds", type=float, default=15.0, help="loader: how long to stream after warm-up")
  p.add_argument("--videos", type=int, default=8, help="loader: synthetic clips to prepare")
  p.add_argument("--gpu-frames-per-s", type=float, default=GPU_FRAMES_PER_S, help="loader: assumed GPU frames/s")
  p.add_argument("--prepare-workers", type=int, default=1, help="loader, prepare: prepare's processes")
  p.add_argument("--clip-frames", type=int, default=None, help="prepare: frames per clip (default VoxCeleb2's mean)")
  p.add_argument("--clip-size", type=int, default=VOX2_SIZE, help="prepare: the clips' side in pixels")
  p.add_argument("--crop", default="center", choices=["center", "detect"], help="prepare: prepare's --crop")
  p.add_argument("--extract-motion", action="store_true", help="prepare: MediaPipe motion for every clip too")
