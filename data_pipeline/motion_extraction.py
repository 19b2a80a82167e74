"""`mimajax extract-motion`: MIMAFace motion coefficients (pose, expression, gaze) from MediaPipe FaceMesh landmarks.

For videos without Deep3DFaceRecon coefficients (issue 4, item 2). The output has Deep3DFaceRecon's layout plus gaze
(mimajax.face3d.coefficients, 261 columns), so `prepare`, the loader and the model take it unchanged; the landmark
morphable model stored beside it (`face_model.npz`, mimajax.face3d.landmark_model) renders it with
`render_coefficients`. This module is the dataset-level job (clips, caches, the PCA over the whole dataset, files,
command line); the per-frame fit is mimajax.faces.motion_fit, shared with `mimajax animate`'s video drivers.

Pass 1, per clip: the crop `prepare` will store (the centre square, or its Haar face box with crop="detect";
clip_files.py and mimajax.faces.detection, as prepare), so the coefficients describe the stored frames ->
mimajax.faces.landmarks.FaceLandmarker.track -> 478 landmarks in the crop scaled to 224 px, cached as
`<clip>.landmarks.npz`, keyed by the options that shape them (crop, face_margin) and by the video it was made
from (size, mtime and SHA-256): a replaced or repaired clip is redone. Gaps of up to max_gap frames without a
face are interpolated from their neighbours (motion_fit.fill_gaps); a clip with a longer gap or no face at all gets
no coefficients (prepare counts it as missing).
Pass 2: motion_fit.fit_pose of every frame of every usable clip; the expression basis is the PCA of all their
canonical-frame shapes (ShapePCA): mean shape + basis @ beta, up to 64 components (zero-padded), whitened (unit
variance over the dataset), written to face_model.npz; then each clip's rows (motion_fit.motion_coefficients: angle,
translation, expression in that basis, gaze, default lighting) are written as `<clip>.npy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from data_pipeline import clip_files
from mimajax.face3d.landmark_model import NUM_LANDMARKS, landmark_face_model, save_face_model
from mimajax.face3d.morphable_model import EXPRESSION_DIM
from mimajax.faces import detection, motion_fit

log = logging.getLogger(__name__)

FACE_MODEL = "face_model.npz"
SUMMARY = "motion_extraction.json"
CACHE_SUFFIX = ".landmarks.npz"
CACHE_VERSION = 2  # 2: keyed by the video's content too
ESTIMATORS = ("mediapipe", "d3dfr")
WARP_SUFFIX = ".d3dfr_warp.npy"  # beside a d3dfr clip's rows: its frame -> network-crop matrices


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """How clips become coefficients; crop and face_margin must be prepare's, so renders align with stored frames."""

  crop: str = "center"
  face_margin: float = detection.FACE_MARGIN
  face_detector: str = detection.DEFAULT_DETECTOR
  face_index: int = 0
  components: int = EXPRESSION_DIM
  max_gap: int = 12  # longest run of frames without a face that is interpolated

  def __post_init__(self):
    if self.crop not in ("center", "detect"):
      raise ValueError(f"crop={self.crop!r}; expected 'center' or 'detect' (as prepare's --crop)")
    detection.check_detector(self.face_detector)
    if self.face_index < 0:
      raise ValueError(f"face_index={self.face_index}; expected >= 0 (0: the largest face)")
    if not 1 <= self.components <= EXPRESSION_DIM:
      raise ValueError(f"components={self.components}; expected 1..{EXPRESSION_DIM} (the expression columns)")
    if self.max_gap < 0:
      raise ValueError(f"max_gap={self.max_gap}; expected >= 0 frames")


# --------------------------------------------------------------------------- the dataset's expression basis


class ShapePCA:
  """Streaming PCA of flattened shapes (T, 3N): float64 sums (shifted by the first batch's mean for precision)."""

  def __init__(self):
    self.count, self.shift, self.total, self.outer = 0, None, None, None

  def add(self, shapes: np.ndarray) -> None:
    x = np.asarray(shapes, np.float64).reshape(len(shapes), -1)
    if self.shift is None:
      self.shift, self.total, self.outer = x.mean(0), np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
    x = x - self.shift
    self.count += len(x)
    self.total += x.sum(0)
    self.outer += x.T @ x

  def fit(self, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3N,) and whitened basis (3N, K <= components): column k = unit direction k * its standard deviation."""
    if not self.count:
      raise ValueError("PCA of no shapes: no clip had landmarks")
    mean = self.total / self.count
    cov = self.outer / self.count - np.outer(mean, mean)
    import scipy.linalg

    n = len(cov)  # only the top `components` eigenpairs: a full eigh of a 1434-square matrix takes seconds
    values, vectors = scipy.linalg.eigh(cov, subset_by_index=[n - min(components, n), n - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    # directions with no variance (fewer frames than components, or float noise) stay zero columns
    keep = int(min(components, np.sum(values > max(values[0], 0.0) * 1e-9)))
    vectors = vectors[:, :keep] * np.sign(vectors[np.abs(vectors[:, :keep]).argmax(0), np.arange(keep)])
    return mean + self.shift, vectors * np.sqrt(values[:keep])


# --------------------------------------------------------------------------- pass 1: landmarks per clip


def crop_box(video_path: str, options: ExtractOptions) -> tuple[int, int, int] | None:
  """prepare's crop of this clip: (x0, y0, side), None for the centre square; raises ValueError for no face."""
  if options.crop == "center":
    return None
  box = clip_files.clip_face_box(video_path, options.face_margin, options.face_detector, options.face_index)
  if box is None:
    raise ValueError(f"the {options.face_detector} face detector found no face, so prepare has no crop for this clip")
  return box


def clip_landmarks(video_path: str, options: ExtractOptions, landmarker) -> tuple[np.ndarray, np.ndarray]:
  """Landmarks (T, 478, 3) in prepare's crop scaled to 224 px (NaN where no face) and found (T,)."""
  try:
    box = crop_box(video_path, options)
  except ValueError:
    frames = sum(1 for _ in clip_files.read_frames(video_path))
    return np.full((frames, NUM_LANDMARKS, 3), np.nan, np.float32), np.zeros(frames, bool)
  side = [None]

  def crops():
    for _, rgb in clip_files.read_frames(video_path):
      side[0] = box[2] if box else min(rgb.shape[:2])
      yield detection.crop_and_resize(rgb, box, side[0])  # at the crop's own size: no detail lost to resizing

  landmarks, found = landmarker.track(crops())
  if side[0] is not None:
    landmarks = motion_fit.to_fit_pixels(landmarks, side[0])
  return landmarks, found


def _paths(entry: clip_files.VideoEntry, coefficients_dir) -> tuple[Path, Path]:
  """(coefficients .npy, landmark cache) for a clip: under coefficients_dir, or beside the video."""
  base = Path(coefficients_dir) / entry.video_id if coefficients_dir else Path(entry.video_path).with_suffix("")
  return Path(f"{base}.npy"), Path(f"{base}{CACHE_SUFFIX}")


def _cache_key(options: ExtractOptions) -> dict:
  key = dict(version=CACHE_VERSION, crop=options.crop, face_margin=options.face_margin)
  if options.crop == "detect":  # the box depends on them
    key.update(face_detector=options.face_detector, face_index=options.face_index)
  return key


def _sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def video_stamp(video_path: str | os.PathLike) -> dict:
  """What a cache was made from: the video's size, mtime and SHA-256 (read once; far less than decoding it)."""
  st = os.stat(video_path)
  return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=_sha256(video_path))


def _same_video(saved: dict, video_path: str | os.PathLike) -> bool:
  """Whether the video is the one a cache was made from: same size, and same mtime or (touched or copied
  without its times) same SHA-256. A same-size replacement that keeps the mtime to the nanosecond is the one
  change not seen without hashing every video on every run."""
  st = os.stat(video_path)
  if saved.get("size") != st.st_size:
    return False
  return saved.get("mtime_ns") == st.st_mtime_ns or saved.get("sha256") == _sha256(video_path)


def load_cache(path: Path, options: ExtractOptions, video_path: str | os.PathLike | None = None) -> dict | None:
  """A clip's cached landmarks, or None if absent, unreadable, made with another crop, or (given the video)
  made from other content than the video now has."""
  try:
    with np.load(path, allow_pickle=False) as f:
      key = json.loads(str(f["key"]))
      video = key.pop("video", None)
      if key != _cache_key(options):
        return None
      if video_path is not None and (video is None or not _same_video(video, video_path)):
        return None
      return dict(landmarks=f["landmarks"], found=f["found"])
  except Exception:  # noqa: BLE001  (any unusable cache is recomputed)
    return None


_LANDMARKER = None


def _landmarks_job(job: tuple[str, str, ExtractOptions]) -> None:
  """Pass 1 for one clip (in a worker process or not): landmarks -> cache; none when the clip breaks it."""
  global _LANDMARKER
  from mimajax.faces.landmarks import FaceLandmarker

  video_path, cache, options = job
  if _LANDMARKER is None:
    _LANDMARKER = FaceLandmarker()
  try:
    video = video_stamp(video_path)  # before reading: a clip replaced meanwhile is redone next run
    landmarks, found = clip_landmarks(video_path, options, _LANDMARKER)
  except Exception as e:  # noqa: BLE001  (bad input never stops the job: the clip gets no coefficients)
    log.warning("landmarks of %s failed: %r", video_path, e)
    Path(cache).unlink(missing_ok=True)  # an older cache is of other content
    return
  tmp = cache + ".tmp.npz"
  np.savez(tmp, landmarks=landmarks, found=found, key=np.array(json.dumps(dict(_cache_key(options), video=video))))
  os.replace(tmp, cache)


def _init_worker():
  import cv2

  cv2.setNumThreads(1)


# --------------------------------------------------------------------------- the two passes


def extract_motion(
  input_dir: str | os.PathLike,
  coefficients_dir: str | os.PathLike | None = None,
  *,
  options: ExtractOptions = ExtractOptions(),
  workers: int = 1,
  progress: bool = True,
  estimator: str = "mediapipe",
  d3dfr_weights: str | os.PathLike | None = None,
  bfm: str | os.PathLike | None = None,
) -> dict:
  """Coefficients for every clip of input_dir without provided ones, and face_model.npz; returns a summary.

  estimator="d3dfr": pass 2 is Deep3DFaceRecon's network instead of the landmark fit (`_write_d3dfr`).

  A clip counts as extracted (and is redone from its cache, so the PCA covers the whole dataset) when its landmark
  cache exists; clips with coefficients but no cache are provided ones and are left alone. Deterministic.
  """
  from tqdm import tqdm

  from mimajax.faces.landmarks import check_available

  check_available()  # a clear error naming the install command before any work
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator {estimator!r} unknown; expected one of {ESTIMATORS}")
  if estimator == "d3dfr":  # unusable files are named before any work
    for what, path in (("--d3dfr-weights", d3dfr_weights), ("--bfm", bfm)):
      if not path or not Path(path).is_file():
        raise FileNotFoundError(f"--estimator d3dfr needs {what} FILE; {path or 'none given'} is not a file")

  entries = clip_files.discover_videos(input_dir, coefficients_dir)
  if not entries:
    raise ValueError(f"no videos under {input_dir}; expected <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  clips, provided = [], 0
  for e in entries:
    npy, cache = _paths(e, coefficients_dir)
    if e.coefficient_path is None or cache.exists():
      clips.append((e, npy, cache))
    else:
      provided += 1
  jobs = [
    (e.video_path, str(cache), options) for e, _, cache in clips if load_cache(cache, options, e.video_path) is None
  ]
  for _, _, cache in clips:
    cache.parent.mkdir(parents=True, exist_ok=True)
  with tqdm(total=len(jobs), unit="video", disable=not progress, desc="landmarks") as bar:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        _landmarks_job(job)
        bar.update(1)
    else:  # spawn: the parent may have JAX's threads running
      with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        for _ in pool.imap_unordered(_landmarks_job, jobs):
          bar.update(1)

  # pass 2: the PCA over every usable clip, then each clip's coefficients
  pca, usable, no_face = ShapePCA(), [], []
  for entry, npy, cache in clips:
    data = load_cache(cache, options, entry.video_path)
    landmarks = None if data is None else motion_fit.fill_gaps(data["landmarks"], data["found"], options.max_gap)
    if landmarks is None:
      no_face.append(entry.video_id)
      npy.unlink(missing_ok=True)  # an earlier run's coefficients for this clip: ours, and now wrong
      found = (
        "its landmark pass failed"
        if data is None
        else f"a face in {data['found'].sum()} of {len(data['found'])} frames"
      )
      log.warning("no coefficients for %s: %s (gaps over max_gap=%d frames are not filled)",
                  entry.video_id, found, options.max_gap)  # fmt: skip
      continue
    if estimator == "mediapipe":
      pca.add(motion_fit.fit_pose(landmarks)["shape"])
    usable.append((entry, npy, landmarks, int(data["found"].sum())))
  summary = dict(videos=len(entries), provided=provided, extracted=len(usable), no_face=no_face,
                 options=dataclasses.asdict(options))  # fmt: skip
  if not usable:
    why = f"{len(no_face)} without a usable face" if clips else "all have provided coefficients"
    log.warning("motion extraction: no clip to write under %s (%d clips: %s)", input_dir, len(entries), why)
    return dict(summary, components=0, frames=0, face_model=None)
  if estimator == "d3dfr":
    return _write_d3dfr(usable, summary, Path(coefficients_dir or input_dir), options, d3dfr_weights, bfm)
  mean, basis = pca.fit(options.components)
  frames = found = 0
  for _, npy, landmarks, n_found in usable:
    coeffs = motion_fit.motion_coefficients(landmarks, mean, basis)
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, coeffs)
    os.replace(tmp, npy)
    frames, found = frames + len(coeffs), found + n_found
  root = Path(coefficients_dir or input_dir)
  save_face_model(landmark_face_model(mean.reshape(NUM_LANDMARKS, 3), basis), root / FACE_MODEL)
  summary.update(components=basis.shape[1], frames=frames, frames_with_face=found, face_model=str(root / FACE_MODEL))
  (root / SUMMARY).write_text(json.dumps(summary, indent=1))
  log.info("motion extraction: %s", {k: v for k, v in summary.items() if k != "options"})
  return summary


def _write_d3dfr(usable, summary: dict, root: Path, options: ExtractOptions, weights, bfm) -> dict:
  """Pass 2 with Deep3DFaceRecon's network (mimajax.faces.d3dfr_motion): each clip's crops again, its filled
  landmarks' five points, the aligned crops through the ReconNet -> `<clip>.npy` (T, 261) release-style rows and
  `<clip>.d3dfr_warp.npy` (T, 2, 3), the 512-frame -> network-crop matrices their renders are warped back with;
  face_model.npz is the BFM the rows are in."""
  from mimajax.face3d.morphable_model import load_bfm
  from mimajax.faces.d3dfr_motion import D3DFRMotion

  face_model = load_bfm(bfm)  # validated before the network runs
  motion = D3DFRMotion(weights)
  frames = found = 0
  for entry, npy, landmarks, n_found in usable:
    box = crop_box(entry.video_path, options)
    crops = (detection.crop_and_resize(rgb, box, box[2] if box else min(rgb.shape[:2]))
             for _, rgb in clip_files.read_frames(entry.video_path))  # fmt: skip
    coeffs, matrices = motion(crops, landmarks)
    for suffix, array in ((".npy", coeffs), (WARP_SUFFIX, matrices)):
      out = npy if suffix == ".npy" else npy.with_name(npy.stem + suffix)
      tmp = out.with_suffix(".tmp.npy")
      np.save(tmp, array)
      os.replace(tmp, out)
    frames, found = frames + len(coeffs), found + n_found
  save_face_model(face_model, root / FACE_MODEL)
  summary.update(estimator="d3dfr", d3dfr_variant=motion.variant, d3dfr_weights=str(weights), bfm=str(bfm),
                 components=0, frames=frames, frames_with_face=found, face_model=str(root / FACE_MODEL))  # fmt: skip
  (root / SUMMARY).write_text(json.dumps(summary, indent=1))
  log.info("motion extraction (d3dfr): %s", {k: v for k, v in summary.items() if k != "options"})
  return summary


# --------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
  d = ExtractOptions()
  p.add_argument("input", help="folder of <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  p.add_argument("--coefficients", default=None, help="folder for <clip>.npy and face_model.npz; default: beside")
  p.add_argument("--components", type=int, default=d.components, help="expression PCA components (<= 64)")
  p.add_argument("--workers", type=int, default=1, help="processes for the landmark pass")
  p.add_argument("--crop", default=d.crop, choices=["center", "detect"], help="must match prepare's --crop")
  p.add_argument("--face-margin", type=float, default=d.face_margin, help="must match prepare's --face-margin")
  p.add_argument("--face-detector", default=d.face_detector, choices=list(detection.DETECTORS),
                 help="must match prepare's --face-detector")  # fmt: skip
  p.add_argument("--face-index", type=int, default=d.face_index, help="must match prepare's --face-index")
  p.add_argument("--max-gap", type=int, default=d.max_gap, help="longest run of faceless frames to interpolate")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--estimator", default="mediapipe", choices=ESTIMATORS,
                 help="mediapipe: the landmark fit; d3dfr: Deep3DFaceRecon's network (needs the next two)")  # fmt: skip
  p.add_argument("--d3dfr-weights", default=None,
                 help="epoch_20.pth (Deep3DFaceRecon) or the release's netG_epoch_25.pth")  # fmt: skip
  p.add_argument("--bfm", default=None, help="BFM_model_front.mat: the morphable model of the d3dfr rows")


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  options = ExtractOptions(crop=args.crop, face_margin=args.face_margin, face_detector=args.face_detector,
                           face_index=args.face_index, components=args.components, max_gap=args.max_gap)  # fmt: skip
  s = extract_motion(args.input, args.coefficients, options=options, workers=args.workers,
                     progress=not args.no_progress, estimator=getattr(args, "estimator", "mediapipe"),
                     d3dfr_weights=getattr(args, "d3dfr_weights", None), bfm=getattr(args, "bfm", None))  # fmt: skip
  print(f"extracted={s['extracted']} provided={s['provided']} no_face={len(s['no_face'])} frames={s['frames']} "
        f"components={s['components']} face_model={s['face_model']}")  # fmt: skip
  return 0


def main(argv: list[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m data_pipeline.motion_extraction", description=__doc__.splitlines()[0]
  )
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
