"""`mimajax extract-motion`: MIMAFace motion coefficients (pose, expression, gaze) from MediaPipe FaceMesh landmarks.

For videos without Deep3DFaceRecon coefficients (issue 4, item 2). The output has Deep3DFaceRecon's layout plus gaze
(mimajax.face3d.coefficients, 261 columns), so `prepare`, the loader and the model take it unchanged; the landmark
morphable model stored beside it (`face_model.npz`, mimajax.face3d.landmark_model) renders it with
`render_coefficients`.

Pass 1, per clip: the crop `prepare` will store (the centre square, or its Haar face box with crop="detect"), so the
coefficients describe the stored frames -> face_landmarks.FaceLandmarker.track -> 478 landmarks in the crop scaled
to 224 px, cached as `<clip>.landmarks.npz`. Gaps of up to max_gap frames without a face are interpolated from their
neighbours; a clip with a longer gap or no face at all gets no coefficients (prepare counts it as missing).
Pass 2, per frame, in Deep3DFaceRecon's camera (focal 1015, centre 112 at 224 px, camera at z = 10; face3d/camera.py):
  rigid fit   each landmark is back-projected along its pixel's ray to depth D (1 + z / 1015), MediaPipe's z being a
              relative depth in pixels; a weighted Umeyama similarity of MediaPipe's canonical face (its procrustes
              landmarks and weights) to these points at D = 1 gives R, s, t1. Units: the canonical face in
              decimetres (the BFM's units), and a face is taken to be canonical-sized, so its apparent size sets its
              distance: D = 1 / s, translation = t1 / s + (0, 0, 10). Then R X + translation projects exactly onto the
              landmarks for the landmarks' own shape X.
  angle       Euler (x, y, z) with R = Rz Ry Rx, so compute_rotation(angle) = R^T (the row-vector M) reproduces it
  shape       R^T (P - translation): the landmarks in the canonical frame
  gaze        iris centre - eye-corner midpoint, / corner distance, in the canonical frame (head pose removed), for the
              eye at -x (a) and +x (b): [mean x, mean y, (a - b) x / 2, (a - b) y / 2], minus the canonical face's
              values (0 = looking straight ahead). A horizontal mirror swaps the eyes and negates x, so it negates
              columns 0 and 3 only (GAZE_MIRROR_COLUMNS; data_pipeline.loader).
  expression  PCA over all frames of the dataset: mean shape + basis @ beta, up to 64 components (zero-padded),
              whitened (unit variance over the dataset); the basis and mean are written to face_model.npz.
Identity and texture columns are zero; gamma is DEFAULT_GAMMA: Deep3DFaceRecon's built-in ambient 0.8 plus a weak
light from the camera (band z, 0.2), so a render shows the face's relief rather than a flat silhouette.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from data_pipeline import prepare
from mimajax.face3d.camera import DEEP3D_CENTER, DEEP3D_DISTANCE, DEEP3D_FOCAL, DEEP3D_SIZE
from mimajax.face3d.coefficients import COEFFICIENT_SLICES, COEFFICIENT_WIDTHS
from mimajax.face3d.landmark_model import NUM_LANDMARKS, canonical_face_mesh, landmark_face_model, save_face_model
from mimajax.face3d.morphable_model import EXPRESSION_DIM

log = logging.getLogger(__name__)

FACE_MODEL = "face_model.npz"
SUMMARY = "motion_extraction.json"
CACHE_SUFFIX = ".landmarks.npz"
CACHE_VERSION = 1
# MediaPipe's geometry pipeline (face_geometry/data/geometry_pipeline_metadata_landmarks.pbtxt): landmarks that move
# little with expression, and their procrustes weights (nose bridge and alae, eye corners, cheekbones, forehead).
RIGID_WEIGHTS = {
  4: 0.0709, 6: 0.0321, 10: 0.0084, 33: 0.0587, 54: 0.0077, 67: 0.0091, 117: 0.0098, 119: 0.0146, 121: 0.0186,
  127: 0.0052, 129: 0.1206, 132: 0.0056, 133: 0.0533, 136: 0.0669, 143: 0.0148, 147: 0.0143, 198: 0.0255,
  205: 0.0473, 263: 0.0587, 284: 0.0077, 297: 0.0091, 346: 0.0098, 348: 0.0146, 350: 0.0186, 356: 0.0052,
  358: 0.1206, 361: 0.0056, 362: 0.0533, 365: 0.0669, 372: 0.0148, 376: 0.0143, 420: 0.0255, 425: 0.0473,
}  # fmt: skip
# (iris centre, eye corner, eye corner): the eye at -x (image left), then at +x
GAZE_EYES = ((468, 33, 133), (473, 362, 263))
GAZE_MIRROR_COLUMNS = (0, 3)  # within the 4 gaze values: mean x and the eyes' y difference flip under a mirror
FRONT_LIGHT = 0.2
DEFAULT_GAMMA = np.zeros((3, 9), np.float32)
DEFAULT_GAMMA[:, 2] = FRONT_LIGHT  # SH band z (towards the camera) of each colour; band 0 keeps the 0.8 ambient
DEFAULT_GAMMA = DEFAULT_GAMMA.reshape(27)


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
  """How clips become coefficients; crop and face_margin must be prepare's, so renders align with stored frames."""

  crop: str = "center"
  face_margin: float = 1.8
  components: int = EXPRESSION_DIM
  max_gap: int = 12  # longest run of frames without a face that is interpolated

  def __post_init__(self):
    if self.crop not in ("center", "detect"):
      raise ValueError(f"crop={self.crop!r}; expected 'center' or 'detect' (as prepare's --crop)")
    if not 1 <= self.components <= EXPRESSION_DIM:
      raise ValueError(f"components={self.components}; expected 1..{EXPRESSION_DIM} (the expression columns)")
    if self.max_gap < 0:
      raise ValueError(f"max_gap={self.max_gap}; expected >= 0 frames")


# --------------------------------------------------------------------------- per-frame geometry


def similarity_fit(src: np.ndarray, dst: np.ndarray, weights: np.ndarray):
  """Weighted Umeyama: dst (T, K, 3) ~ s R src (K, 3) + t -> s (T,), R (T, 3, 3) proper rotations, t (T, 3)."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = w @ src, np.einsum("k,tkc->tc", w, dst)
  sc, dc = src - mu_s, dst - mu_d[:, None]
  u, sv, vt = np.linalg.svd(np.einsum("k,tki,kj->tij", w, dc, sc))
  d = np.sign(np.linalg.det(u @ vt))  # a reflection would fit better only for mirrored input: never allowed
  flip = np.stack([np.ones_like(d), np.ones_like(d), d], -1)
  rotation = u @ (flip[..., None] * vt)
  scale = (sv * flip).sum(-1) / (w @ (sc**2).sum(-1))
  return scale, rotation, mu_d - scale[:, None] * np.einsum("tij,j->ti", rotation, mu_s)


def rotation_to_angles(rotation: np.ndarray) -> np.ndarray:
  """R = Rz(z) Ry(y) Rx(x) (..., 3, 3) -> (..., 3) (x, y, z): the inverse of compute_rotation (which returns R^T)."""
  r = np.asarray(rotation, np.float64)
  y = np.arcsin(np.clip(-r[..., 2, 0], -1.0, 1.0))
  return np.stack([np.arctan2(r[..., 2, 1], r[..., 2, 2]), y, np.arctan2(r[..., 1, 0], r[..., 0, 0])], axis=-1)


def backproject(points: np.ndarray) -> np.ndarray:
  """Landmarks (..., N, 3) in 224-px crop pixels (x, y down, z) -> world points for a reference depth of 1.

  World = D * this + (0, 0, 10) for the face at depth D (camera space is (x, y, 10 - z), see camera.py).
  """
  p = np.asarray(points, np.float64)
  k = 1.0 + p[..., 2] / DEEP3D_FOCAL  # depth relative to the reference depth
  x = (p[..., 0] - DEEP3D_CENTER) / DEEP3D_FOCAL * k
  y = (DEEP3D_SIZE - p[..., 1] - DEEP3D_CENTER) / DEEP3D_FOCAL * k  # rows grow down, v grows up
  return np.stack([x, y, -k], axis=-1)


def fit_pose(points: np.ndarray) -> dict[str, np.ndarray]:
  """Landmarks (T, 478, 3) in 224-px crop pixels -> angle (T, 3), translation (T, 3), shape (T, 478, 3) canonical."""
  canonical, _ = canonical_face_mesh()
  idx = np.fromiter(RIGID_WEIGHTS, int)
  unit = backproject(points)
  scale, rotation, t1 = similarity_fit(canonical[idx], unit[:, idx], np.fromiter(RIGID_WEIGHTS.values(), float))
  depth = 1.0 / scale  # the face at canonical size
  translation = t1 * depth[:, None] + np.array([0.0, 0.0, DEEP3D_DISTANCE])
  world = unit * depth[:, None, None] + np.array([0.0, 0.0, DEEP3D_DISTANCE])
  shape = np.einsum("tji,tnj->tni", rotation, world - translation[:, None])  # R^T (P - t)
  return dict(angle=rotation_to_angles(rotation), translation=translation, shape=shape, rotation=rotation)


def _iris_offsets(shape: np.ndarray) -> np.ndarray:
  offsets = []
  for iris, c0, c1 in GAZE_EYES:
    mid = (shape[..., c0, :2] + shape[..., c1, :2]) / 2
    width = np.linalg.norm(shape[..., c1, :] - shape[..., c0, :], axis=-1, keepdims=True)
    offsets.append((shape[..., iris, :2] - mid) / width)
  a, b = offsets
  return np.concatenate([(a + b) / 2, (a - b) / 2], axis=-1)


def gaze(shape: np.ndarray) -> np.ndarray:
  """Canonical-frame landmarks (..., 478, 3) -> (..., 4) gaze; 0 for the canonical face's straight-ahead irises."""
  rest = _iris_offsets(np.asarray(canonical_face_mesh()[0], np.float64))  # symmetric: mirror-even, like zero
  return _iris_offsets(np.asarray(shape, np.float64)) - rest


def assemble(angle, translation, expression, gaze_values) -> np.ndarray:
  """Per-frame groups -> (T, 261) float32 rows: zero identity/texture, DEFAULT_GAMMA, expression zero-padded to 64."""
  t = len(angle)
  out = np.zeros((t, COEFFICIENT_WIDTHS[1]), np.float32)
  a, _ = COEFFICIENT_SLICES["expression"]
  out[:, a : a + expression.shape[1]] = expression
  for name, value in (("angle", angle), ("translation", translation), ("gaze", gaze_values)):
    a, b = COEFFICIENT_SLICES[name]
    out[:, a:b] = value
  a, b = COEFFICIENT_SLICES["gamma"]
  out[:, a:b] = DEFAULT_GAMMA
  return out


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

  @staticmethod
  def project(shapes: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Flattened shapes (T, 3N) -> whitened coefficients (T, K): the least-squares fit of mean + basis @ beta."""
    x = np.asarray(shapes, np.float64).reshape(len(shapes), -1) - mean
    return x @ basis / np.maximum((basis**2).sum(0), 1e-30)


def fill_gaps(landmarks: np.ndarray, found: np.ndarray, max_gap: int) -> np.ndarray | None:
  """Missing frames linearly interpolated from their neighbours (edges: the nearest); None if a gap is too long."""
  if not found.any():
    return None
  missing = np.concatenate([[0], (~found).astype(np.int8), [0]])
  starts, ends = np.nonzero(np.diff(missing) == 1)[0], np.nonzero(np.diff(missing) == -1)[0]
  if len(starts) and (ends - starts).max() > max_gap:
    return None
  if found.all():
    return landmarks
  t, have = np.arange(len(found)), np.nonzero(found)[0]
  flat = landmarks.reshape(len(found), -1)
  filled = np.stack([np.interp(t, have, flat[have, j]) for j in range(flat.shape[1])], axis=1)
  return filled.reshape(landmarks.shape).astype(np.float32)


# --------------------------------------------------------------------------- pass 1: landmarks per clip


def crop_box(video_path: str, options: ExtractOptions) -> tuple[int, int, int] | None:
  """prepare's crop of this clip: (x0, y0, side), None for the centre square; raises ValueError for no Haar face."""
  if options.crop == "center":
    return None
  box = prepare.detect_face_box(video_path, options.face_margin)
  if box is None:
    raise ValueError("the Haar cascade found no face, so prepare has no crop for this clip")
  return box


def clip_landmarks(video_path: str, options: ExtractOptions, landmarker) -> tuple[np.ndarray, np.ndarray]:
  """Landmarks (T, 478, 3) in prepare's crop scaled to 224 px (NaN where no face) and found (T,)."""
  try:
    box = crop_box(video_path, options)
  except ValueError:
    frames = sum(1 for _ in prepare.read_frames(video_path))
    return np.full((frames, NUM_LANDMARKS, 3), np.nan, np.float32), np.zeros(frames, bool)
  side = [None]

  def crops():
    for _, rgb in prepare.read_frames(video_path):
      side[0] = box[2] if box else min(rgb.shape[:2])
      yield prepare.crop_and_resize(rgb, box, side[0])  # at the crop's own size: no detail lost to resizing

  landmarks, found = landmarker.track(crops())
  if side[0] is not None:
    landmarks = landmarks * np.float32(DEEP3D_SIZE / side[0])  # x, y and z alike
  return landmarks, found


def _paths(entry: prepare.VideoEntry, coefficients_dir) -> tuple[Path, Path]:
  """(coefficients .npy, landmark cache) for a clip: under coefficients_dir, or beside the video."""
  base = Path(coefficients_dir) / entry.video_id if coefficients_dir else Path(entry.video_path).with_suffix("")
  return Path(f"{base}.npy"), Path(f"{base}{CACHE_SUFFIX}")


def _cache_key(options: ExtractOptions) -> dict:
  return dict(version=CACHE_VERSION, crop=options.crop, face_margin=options.face_margin)


def load_cache(path: Path, options: ExtractOptions) -> dict | None:
  """A clip's cached landmarks, or None if absent, unreadable or made with another crop."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if json.loads(str(f["key"])) != _cache_key(options):
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
    landmarks, found = clip_landmarks(video_path, options, _LANDMARKER)
  except Exception as e:  # noqa: BLE001  (bad input never stops the job: the clip gets no coefficients)
    log.warning("landmarks of %s failed: %r", video_path, e)
    return
  tmp = cache + ".tmp.npz"
  np.savez(tmp, landmarks=landmarks, found=found, key=np.array(json.dumps(_cache_key(options))))
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
) -> dict:
  """Coefficients for every clip of input_dir without provided ones, and face_model.npz; returns a summary.

  A clip counts as extracted (and is redone from its cache, so the PCA covers the whole dataset) when its landmark
  cache exists; clips with coefficients but no cache are provided ones and are left alone. Deterministic.
  """
  from tqdm import tqdm

  from mimajax.faces.landmarks import check_available

  check_available()  # a clear error naming the install command before any work

  entries = prepare.discover_videos(input_dir, coefficients_dir)
  if not entries:
    raise ValueError(f"no videos under {input_dir}; expected <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  clips, provided = [], 0
  for e in entries:
    npy, cache = _paths(e, coefficients_dir)
    if e.coefficient_path is None or cache.exists():
      clips.append((e, npy, cache))
    else:
      provided += 1
  jobs = [(e.video_path, str(cache), options) for e, _, cache in clips if load_cache(cache, options) is None]
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
    data = load_cache(cache, options)
    landmarks = None if data is None else fill_gaps(data["landmarks"], data["found"], options.max_gap)
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
    pca.add(fit_pose(landmarks)["shape"])
    usable.append((entry, npy, landmarks, int(data["found"].sum())))
  summary = dict(videos=len(entries), provided=provided, extracted=len(usable), no_face=no_face,
                 options=dataclasses.asdict(options))  # fmt: skip
  if not usable:
    why = f"{len(no_face)} without a usable face" if clips else "all have provided coefficients"
    log.warning("motion extraction: no clip to write under %s (%d clips: %s)", input_dir, len(entries), why)
    return dict(summary, components=0, frames=0, face_model=None)
  mean, basis = pca.fit(options.components)
  frames = found = 0
  for _, npy, landmarks, n_found in usable:
    fit = fit_pose(landmarks)
    beta = ShapePCA.project(fit["shape"], mean, basis)
    coeffs = assemble(fit["angle"], fit["translation"], beta, gaze(fit["shape"]))
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


# --------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
  d = ExtractOptions()
  p.add_argument("input", help="folder of <speaker>/<video>/<clip>.mp4 (VoxCeleb2 layout)")
  p.add_argument("--coefficients", default=None, help="folder for <clip>.npy and face_model.npz; default: beside")
  p.add_argument("--components", type=int, default=d.components, help="expression PCA components (<= 64)")
  p.add_argument("--workers", type=int, default=1, help="processes for the landmark pass")
  p.add_argument("--crop", default=d.crop, choices=["center", "detect"], help="must match prepare's --crop")
  p.add_argument("--face-margin", type=float, default=d.face_margin, help="must match prepare's --face-margin")
  p.add_argument("--max-gap", type=int, default=d.max_gap, help="longest run of faceless frames to interpolate")
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  options = ExtractOptions(crop=args.crop, face_margin=args.face_margin, components=args.components,
                           max_gap=args.max_gap)  # fmt: skip
  s = extract_motion(args.input, args.coefficients, options=options, workers=args.workers,
                     progress=not args.no_progress)  # fmt: skip
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
