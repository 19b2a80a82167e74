"""`mimajax prepare`: VoxCeleb2-layout videos + per-frame 3DMM coefficients -> ArrayRecord shards + manifest.

Input: `INPUT/<speaker>/<video>/<clip>.mp4` (VoxCeleb2: `id00012/21Uxsk56VDQ/00001.mp4`) and, per clip, a
coefficient file `<clip>.npy` or Deep3DFaceRecon `<clip>.mat` (key `coeff`) with one row per frame and
257 columns (261 with the release's gaze), found under `--coefficients` (same relative path) or beside
the video (clip_files.py finds them; mimajax.face3d.coefficient_files reads them); `--extract-motion` first writes
MediaPipe-derived ones for clips without any (motion_extraction.py, which also puts its landmark 3DMM
`face_model.npz` into the output). Frames are the centre square or, with `--crop detect`, the clip's face box
(mimajax.faces.detection: BlazeFace, Haar where it finds none; the crop `mimajax animate` makes too), resized. Output:
`records-KKKKK-of-NNNNN.array_record` shards of `records.Record`s (segments of up to `frames_per_record`
consecutive frames), a `.json` beside each shard with its counts, and
`manifest.json` (options, identity vocabulary, shard list, counts, every skipped clip and why).
The identity vocabulary is every speaker folder found, sorted (label = index), also those whose clips
were all skipped, so labels never depend on which clips failed.

Videos are assigned to shards in sorted order, `shard_size` videos per shard, so a rerun makes the
same shards. A shard is written under a temporary name of its own attempt and renamed when complete; a rerun
skips complete shards, so a killed job resumes. Bad input is skipped with its reason logged and counted;
it never stops the job.

Runners (`--runner`): `local` (default) runs the shards in worker processes on this host; `direct`, `dataflow`,
`flink` and `spark` run the same `write_shard` per shard as an Apache Beam pipeline (beam_runner.py), with Beam's
own options after `--`. Every runner writes the same bytes, manifest and skip counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import queue as queue_lib
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline import beam_runner, clip_files, records
from mimajax import cli_errors
from mimajax.face3d import coefficient_files
from mimajax.faces import detection

log = logging.getLogger(__name__)

SKIP_REASONS = (
  "missing_coefficients",  # no <clip>.npy / .mat found
  "unreadable_coefficients",  # the file exists but cannot be loaded (or a .mat without `coeff`)
  "bad_coefficient_shape",  # not (frames, 257 | 261)
  "nan_coefficients",  # NaN or inf anywhere
  "unreadable_video",  # no frame could be decoded, or fewer than the container declares (truncated, corrupt)
  "too_short",  # fewer than min_frames frames
  "coefficient_frames_mismatch",  # coefficient rows != decoded frames
  "no_face",  # crop="detect" and the face detector found no face
  "processing_error",  # anything else raised while processing the clip
)
MANIFEST = "manifest.json"
FACE_MODEL = "face_model.npz"  # with extract_motion: the landmark morphable model of the coefficients
PLAN = "plan.json"


class SkipVideo(Exception):
  """A clip that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason, self.message = reason, message


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """How clips become records; part of the plan, so a rerun with other options is refused."""

  resolution: int = 512  # square output frames
  frames_per_record: int = 64  # upper bound; a video is cut into balanced segments
  shard_size: int = 64  # videos per shard
  image_format: str = "jpeg"  # or "png" (lossless, larger)
  quality: int = 90  # JPEG quality
  crop: str = "center"  # "center": centre square (VoxCeleb2 clips are face tracks); "detect": the detected face's box
  face_margin: float = detection.FACE_MARGIN  # crop side / detected face side (crop="detect")
  face_detector: str = detection.DEFAULT_DETECTOR  # crop="detect": detection.DETECTORS
  face_index: int = 0  # crop="detect" with several faces: the face_index-th largest (0: the largest, the speaker)
  min_frames: int = 2  # a source frame and a target frame
  coefficient_dim: int | None = None  # None accepts 257 and 261

  def __post_init__(self):
    if self.crop not in ("center", "detect"):
      raise ValueError(f"crop={self.crop!r}; expected 'center' or 'detect'")
    detection.check_detector(self.face_detector)
    if self.face_index < 0:
      raise ValueError(f"face_index={self.face_index}; expected >= 0 (0: the largest face)")
    if self.image_format not in records.IMAGE_FORMATS:
      raise ValueError(f"image_format={self.image_format!r}; expected one of {records.IMAGE_FORMATS}")
    if self.coefficient_dim not in (None, *records.COEFFICIENT_DIMS):
      raise ValueError(f"coefficient_dim={self.coefficient_dim}; expected one of {records.COEFFICIENT_DIMS}")
    if min(self.resolution, self.frames_per_record, self.shard_size, self.min_frames) < 1:
      raise ValueError(f"resolution, frames_per_record, shard_size and min_frames must be >= 1: {self}")


# --------------------------------------------------------------------------- one clip

COEFFICIENT_SKIP_REASONS = {  # coefficient_files.CoefficientError.reason -> SKIP_REASONS
  "unreadable": "unreadable_coefficients",
  "shape": "bad_coefficient_shape",
  "non_finite": "nan_coefficients",
}


def _clip_coefficients(path: str | None, dim: int | None) -> np.ndarray:
  """(frames, 257 | 261) float32 from `.npy` or a Deep3DFaceRecon `.mat` (`coeff`); SkipVideo if unusable."""
  if path is None:
    raise SkipVideo("missing_coefficients", "no <clip>.npy or <clip>.mat beside the video or under --coefficients")
  try:
    coeffs, _ = coefficient_files.read_coefficients(path, width=dim, training_rows=True)
  except coefficient_files.CoefficientError as e:
    raise SkipVideo(COEFFICIENT_SKIP_REASONS[e.reason], str(e)) from None
  return coeffs


def segment_bounds(num_frames: int, frames_per_record: int) -> list[tuple[int, int]]:
  """Balanced [start, end) segments of at most frames_per_record frames (no short tail segment)."""
  n = math.ceil(num_frames / frames_per_record)
  edges = [round(i * num_frames / n) for i in range(n + 1)]
  return list(zip(edges[:-1], edges[1:]))


def _check_decodes(path: str, decoded: int | None = None) -> None:
  """SkipVideo("unreadable_video") if the video decodes no frame or fewer than its container declares (a truncated
  or corrupt file): asked before a clip is skipped for what a broken file would also cause (no face, a frame count
  that differs from the coefficients', too few frames)."""
  counted, declared = clip_files.frame_counts(path)
  decoded = counted if decoded is None else decoded
  if not decoded:
    raise SkipVideo("unreadable_video", f"{path}: no frame could be decoded")
  if declared is not None and decoded < declared - 1:  # a container's count may be off by one (rounded duration)
    raise SkipVideo(
      "unreadable_video", f"{path}: decodes only {decoded} of the {declared} frames its container declares "
      "(truncated or corrupt)"
    )  # fmt: skip


def process_video(entry: clip_files.VideoEntry, identity: int, options: PrepareOptions) -> list[records.Record]:
  """One clip -> its records; SkipVideo(reason, message) if it is unusable."""
  coeffs = _clip_coefficients(entry.coefficient_path, options.coefficient_dim)
  box = None
  if options.crop == "detect":
    box = clip_files.clip_face_box(entry.video_path, options.face_margin, options.face_detector, options.face_index)
    if box is None:
      _check_decodes(entry.video_path)  # a broken file is unreadable, not faceless
      raise SkipVideo("no_face", f"{entry.video_path}: the {options.face_detector} face detector found no face "
                                 f"(index {options.face_index}) in the sampled frames")  # fmt: skip
  frames = []
  for _, rgb in clip_files.read_frames(entry.video_path):
    frames.append(
      records.encode_frame(
        detection.crop_and_resize(rgb, box, options.resolution), options.image_format, options.quality
      )
    )
  if not frames:
    raise SkipVideo("unreadable_video", f"{entry.video_path}: no frame could be decoded")
  if len(frames) < options.min_frames or len(frames) != len(coeffs):
    _check_decodes(entry.video_path, len(frames))  # a truncated file: unreadable, not too short or mismatched
  if len(frames) < options.min_frames:
    raise SkipVideo("too_short", f"{entry.video_path}: {len(frames)} frames < min_frames={options.min_frames}")
  if len(frames) != len(coeffs):
    raise SkipVideo(
      "coefficient_frames_mismatch", f"{entry.coefficient_path}: {len(coeffs)} rows for {len(frames)} decoded frames"
    )
  r, fmt = options.resolution, options.image_format
  return [
    records.Record(entry.video_id, entry.speaker, identity, np.arange(a, b), coeffs[a:b], frames[a:b], r, r, fmt)
    for a, b in segment_bounds(len(frames), options.frames_per_record)
  ]


# --------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class ShardTask:
  index: int
  path: str  # final .array_record path
  entries: tuple[clip_files.VideoEntry, ...]
  identities: tuple[int, ...]
  options: PrepareOptions


def shard_name(index: int, count: int) -> str:
  return f"records-{index:05d}-of-{count:05d}.array_record"


def _stats_path(shard_path: str) -> str:
  return shard_path[: -len(".array_record")] + ".json"


def shard_done(shard_path: str) -> bool:
  return os.path.exists(shard_path) and os.path.exists(_stats_path(shard_path))


_PROGRESS = None  # a worker's queue for per-video progress


def _init_worker(progress_queue):
  global _PROGRESS
  _PROGRESS = progress_queue
  import cv2

  cv2.setNumThreads(1)  # one process per core already


def write_shard(task: ShardTask, on_video: Callable[[], None] | None = None) -> dict:
  """Process the task's videos into `task.path` and its stats .json; returns the stats.

  Both are written under temporary names of this attempt's own (`<name>.<attempt>.tmp`) and renamed into place, the
  shard last: a Beam runner may retry a bundle or run it twice at once, and two attempts must never write one file.
  Every attempt writes the same bytes, so whichever rename comes last leaves the same complete shard."""
  from array_record.python.array_record_module import ArrayRecordWriter

  on_video = on_video or (lambda: _PROGRESS.put(1) if _PROGRESS is not None else None)
  attempt = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = f"{task.path}.{attempt}.tmp"
  writer = ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
  stats = dict(shard=os.path.basename(task.path), videos=[], record_frames=[], skipped=[], coefficient_dims={})
  try:
    for entry, identity in zip(task.entries, task.identities):
      try:
        recs = process_video(entry, identity, task.options)
      except SkipVideo as e:
        stats["skipped"].append(dict(video_id=entry.video_id, reason=e.reason, message=e.message))
        log.warning("skipped %s: %s", entry.video_id, e)
      except Exception as e:  # noqa: BLE001  (bad input never stops the job)
        stats["skipped"].append(dict(video_id=entry.video_id, reason="processing_error", message=repr(e)))
        log.warning("skipped %s: processing_error: %r", entry.video_id, e)
      else:
        for rec in recs:
          writer.write(records.encode_record(rec))
          stats["record_frames"].append(rec.num_frames)
        stats["videos"].append(entry.video_id)
        d = str(recs[0].coefficients.shape[1])
        stats["coefficient_dims"][d] = stats["coefficient_dims"].get(d, 0) + 1
      on_video()
  finally:
    writer.close()
  stats_tmp = f"{_stats_path(task.path)}.{attempt}.tmp"
  with open(stats_tmp, "w") as f:
    json.dump(stats, f)
  os.replace(stats_tmp, _stats_path(task.path))  # the shard last: its presence means complete
  os.replace(tmp, task.path)
  return stats


def beam_write_shard(task: ShardTask) -> dict[str, int]:
  """write_shard on a Beam worker; its counters (beam_runner.run_shards makes them Beam metrics)."""
  stats = write_shard(task, on_video=lambda: None)
  counters = {"shards_written": 1, "videos_processed": len(stats["videos"]) + len(stats["skipped"])}
  for s in stats["skipped"]:
    counters[f"skipped_{s['reason']}"] = counters.get(f"skipped_{s['reason']}", 0) + 1
  return counters


def _plan_digest(entries: list[clip_files.VideoEntry], options: PrepareOptions) -> dict:
  digest = hashlib.sha256("\n".join(e.video_id for e in entries).encode()).hexdigest()
  opts = dataclasses.asdict(options)
  if options.crop != "detect" or (options.face_detector, options.face_index) == ("haar", 0):
    # Only a detect crop depends on the detector; a plan written before the option existed (Haar, face 0) stays
    # the plan of the same run, so such an output resumes.
    opts.pop("face_detector")
    opts.pop("face_index")
  return dict(version=1, options=opts, videos=len(entries), video_ids_sha256=digest)


def prepare(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
            coefficients_dir: str | os.PathLike | None = None, options: PrepareOptions = PrepareOptions(),
            workers: int = 1, progress: bool = True, coefficients_source: str = "provided",
            extract_motion: bool = False, runner: str = "local", beam_args: tuple[str, ...] = ()) -> dict:  # fmt: skip
  """Prepare (or resume preparing) output_dir from input_dir; returns the manifest (also written as JSON).

  runner: "local" (worker processes on this host) or a Beam runner of beam_runner.RUNNERS, with beam_args its
  pipeline options ("--name=value"). Motion extraction, the plan and the manifest run here, on the driver.

  extract_motion: first write MediaPipe coefficients for the clips without any (motion_extraction.py, with this
  crop), copy its face_model.npz into output_dir, and record the source as "mediapipe" ("provided+mediapipe"
  when some clips brought their own).
  """
  beam_runner.check_runner(runner, beam_args, (input_dir, output_dir, coefficients_dir))
  face_model = None
  if extract_motion:
    from data_pipeline import motion_extraction as extraction

    summary = extraction.extract_motion(input_dir, coefficients_dir, workers=workers, progress=progress,
                                        options=extraction.ExtractOptions(crop=options.crop,
                                                                          face_margin=options.face_margin,
                                                                          face_detector=options.face_detector,
                                                                          face_index=options.face_index))  # fmt: skip
    face_model = summary["face_model"]
    if coefficients_source == "provided":
      coefficients_source = "provided+mediapipe" if summary["provided"] else "mediapipe"
  entries = clip_files.discover_videos(input_dir, coefficients_dir)
  if not entries:
    raise ValueError(f"no videos under {input_dir}; expected <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  plan = _plan_digest(entries, options)
  plan_path = out / PLAN
  if plan_path.exists():
    old = json.loads(plan_path.read_text())
    if old != plan:
      raise ValueError(
        f"{out} was prepared from other videos or options ({old}); this run has {plan}. Use a new --output."
      )
  else:
    plan_path.write_text(json.dumps(plan, indent=1))
  for leftover in out.glob("*.tmp"):  # a killed run's partial files; no attempt of this run has started yet
    leftover.unlink()
  identities = sorted({e.speaker for e in entries})
  vocab = {s: i for i, s in enumerate(identities)}
  count = math.ceil(len(entries) / options.shard_size)
  tasks = []
  for k in range(count):
    chunk = tuple(entries[k * options.shard_size : (k + 1) * options.shard_size])
    tasks.append(ShardTask(k, str(out / shard_name(k, count)), chunk, tuple(vocab[e.speaker] for e in chunk), options))
  todo = [t for t in tasks if not shard_done(t.path)]
  if runner == "local":
    _run(todo, workers, progress, total=len(entries), initial=len(entries) - sum(len(t.entries) for t in todo))
  else:
    beam_runner.run_shards(todo, beam_write_shard, runner, beam_args, workers)
  manifest = build_manifest(out, tasks, identities, plan, coefficients_source)
  if face_model:  # the landmark 3DMM that renders the extracted coefficients travels with the dataset
    shutil.copyfile(face_model, out / FACE_MODEL)
    manifest["face_model"] = FACE_MODEL
  tmp = out / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, out / MANIFEST)
  log.info("prepared %s: %s", out, manifest["counts"])
  return manifest


def _run(tasks: list[ShardTask], workers: int, progress: bool, total: int, initial: int) -> None:
  from tqdm import tqdm

  with tqdm(total=total, initial=initial, unit="video", disable=not progress, desc="prepare") as bar:
    if workers <= 1 or len(tasks) <= 1:
      for t in tasks:
        write_shard(t, on_video=lambda: bar.update(1))
      return
    # spawn, not fork: the parent may have JAX's threads running.
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(progress_queue,)) as pool:
      result = pool.map_async(write_shard, tasks, chunksize=1)
      while not result.ready():
        try:
          bar.update(progress_queue.get(timeout=0.2))
        except queue_lib.Empty:
          pass
      result.get()  # re-raises a worker's error (e.g. a full disk): that is not bad input


def build_manifest(
  out: Path, tasks: list[ShardTask], identities: list[str], plan: dict, coefficients_source: str
) -> dict:
  """Aggregate the per-shard stats into the dataset manifest."""
  shards, skipped, dims = [], [], {}
  counts = dict(videos_found=plan["videos"], videos=0, records=0, frames=0, skipped={r: 0 for r in SKIP_REASONS})
  for t in tasks:
    stats = json.loads(Path(_stats_path(t.path)).read_text())
    shards.append(dict(path=stats["shard"], videos=len(stats["videos"]), records=len(stats["record_frames"]),
                       frames=sum(stats["record_frames"])))  # fmt: skip
    counts["videos"] += len(stats["videos"])
    counts["records"] += len(stats["record_frames"])
    counts["frames"] += sum(stats["record_frames"])
    for s in stats["skipped"]:
      counts["skipped"][s["reason"]] += 1
      skipped.append(s)
    for d, n in stats["coefficient_dims"].items():
      dims[d] = dims.get(d, 0) + n
  return dict(
    format="mimajax-records",
    version=1,
    record_granularity=f"segments of up to {plan['options']['frames_per_record']} consecutive frames of one clip",
    options=plan["options"],
    coefficients_source=coefficients_source,
    coefficient_dims=dims,
    identities=identities,
    counts=counts,
    shards=shards,
    skipped=skipped,
  )


# --------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
  d = PrepareOptions()
  p.add_argument("--input", required=True, help="folder of <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  p.add_argument("--output", required=True, help="folder for the shards and manifest.json (resumable)")
  p.add_argument("--coefficients", default=None, help="folder mirroring --input with <clip>.npy|.mat; default: beside")
  p.add_argument("--resolution", type=int, default=d.resolution)
  p.add_argument("--frames-per-record", type=int, default=d.frames_per_record)
  p.add_argument("--shard-size", type=int, default=d.shard_size, help="videos per shard")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--crop", default=d.crop, choices=["center", "detect"])
  p.add_argument("--face-margin", type=float, default=d.face_margin)
  p.add_argument("--face-detector", default=d.face_detector, choices=list(detection.DETECTORS),
                 help="--crop detect: auto (BlazeFace, Haar where it finds none), blazeface or haar")  # fmt: skip
  p.add_argument("--face-index", type=int, default=d.face_index,
                 help="--crop detect, several faces: the face-index-th largest (0: the largest)")  # fmt: skip
  p.add_argument("--image-format", default=d.image_format, choices=list(records.IMAGE_FORMATS))
  p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality")
  p.add_argument("--min-frames", type=int, default=d.min_frames)
  p.add_argument("--coefficient-dim", type=int, default=None, choices=list(records.COEFFICIENT_DIMS))
  p.add_argument("--coefficients-source", default="provided", help="recorded in the manifest (e.g. deep3dfacerecon)")
  p.add_argument(
    "--extract-motion",
    action="store_true",
    help="first extract MediaPipe motion coefficients for clips without any (mimajax extract-motion)",
  )
  p.add_argument("--runner", default="local", choices=list(beam_runner.RUNNERS),
                 help="local: worker processes on this host; direct|dataflow|flink|spark: an Apache Beam pipeline, "
                      "one shard per task (input and output on a filesystem every worker sees)")  # fmt: skip
  p.add_argument("beam_args", nargs="*", metavar="BEAM_OPTION",
                 help="after `--`: Beam pipeline options for --runner other than local, e.g. -- --project=P "
                      "--region=R --temp_location=gs://B/tmp --setup_file=./setup.py")  # fmt: skip
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  """`mimajax prepare`: 0; 2 (one line on stderr) for bad input (a missing or empty --input, options, a rerun with
  other options); 1 when every video was skipped (the counts per reason named; manifest.json lists each)."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  prog = "mimajax prepare"
  try:
    options = PrepareOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareOptions)})
    manifest = prepare(args.input, args.output, coefficients_dir=args.coefficients, options=options,
                       workers=args.workers, progress=not args.no_progress,
                       coefficients_source=args.coefficients_source, extract_motion=args.extract_motion,
                       runner=args.runner, beam_args=tuple(args.beam_args))  # fmt: skip
  except ValueError as e:
    return cli_errors.report(prog, e, code=cli_errors.BAD_INPUT)
  c = manifest["counts"]
  skipped = {r: n for r, n in c["skipped"].items() if n}
  print(f"videos={c['videos']}/{c['videos_found']} records={c['records']} frames={c['frames']} skipped={skipped}")
  if not c["videos"]:
    why = ", ".join(f"{reason}: {n}" for reason, n in skipped.items())
    n = c["videos_found"]
    which = f"all {n} videos were" if n != 1 else "the one video was"
    return cli_errors.fail(prog, f"{which} skipped ({why}); each clip's reason is in "
                                 f"{Path(args.output) / MANIFEST} under 'skipped'", code=cli_errors.FAILED)  # fmt: skip
  return 0


def main(argv: list[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.splitlines()[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
