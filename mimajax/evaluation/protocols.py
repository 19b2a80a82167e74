"""The two evaluation protocols of MIMAFace table 1 and MMFA table 1, as deterministic pair lists.

  same_identity   reconstruction: the source is one frame of a video, the driver is the next `frames` frames of that
                  same video, and they are also the ground truth the output is compared with (PSNR, SSIM, LPIPS)
  cross_identity  reenactment: the source is a frame of a video of identity A, the driver frames come from a video of
                  another identity B; identity is judged against the source (CSIM), motion against the driver

The split is by identity: `held_out_identities` picks a fixed fraction of a dataset's identities from a hash of
their names and a seed (no other identity's order or count changes the choice), so a model trained on the others
can be scored on people it never saw. Pair lists depend only on the dataset's index, the seed and the options, and
are written into every report (`pairs.json`): two systems given the same list are scored on the same frames.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PROTOCOLS = ("same_identity", "cross_identity")
PAIRS_FORMAT = "mimajax-eval-pairs"
PAIR_ID = re.compile(r"[A-Za-z0-9_.-]+")  # a pair id names files: <pair id>.mp4, per_pair/<pair id>.json


@dataclasses.dataclass(frozen=True)
class Pair:
  """One evaluation pair: a source frame and `frames` driving frames (for same_identity also the ground truth)."""

  protocol: str
  pair_id: str  # unique within the list; the file name of this pair's generated video (`<pair_id>.mp4`)
  source_video: str
  source_frame: int
  driver_video: str
  driver_start: int
  frames: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _unit_hash(text: str, seed: int) -> float:
  digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64


def held_out_identities(identities: Iterable[str], fraction: float, seed: int = 0) -> list[str]:
  """The identities whose hash with `seed` falls below `fraction` (at least one): a stable held-out split."""
  if not 0 < fraction <= 1:
    raise ValueError(f"--test-fraction {fraction} must be in (0, 1]")
  identities = sorted(set(identities))
  chosen = [i for i in identities if _unit_hash(i, seed) < fraction]
  return chosen or [min(identities, key=lambda i: _unit_hash(i, seed))]


def make_pairs(videos: Sequence, *, frames: int, seed: int = 0, protocols: Sequence[str] = PROTOCOLS) -> list[Pair]:
  """Pairs over `videos` (dataset.Video: video_id, identity, num_frames), one per video and protocol.

  same_identity: source frame 0, driver frames 1 .. frames (fewer when the video is shorter; videos of fewer than
  2 frames are left out). cross_identity: the source is frame 0 of each video; its driver is a video of another
  identity drawn with `seed`, frames 0 .. frames - 1. The order is the videos' id order.
  """
  unknown = sorted(set(protocols) - set(PROTOCOLS))
  if unknown:
    raise ValueError(f"unknown protocol(s) {unknown}; expected some of {PROTOCOLS}")
  if frames < 1:
    raise ValueError(f"--frames {frames} must be >= 1")
  videos = sorted(videos, key=lambda v: v.video_id)
  rng = np.random.default_rng(seed)
  pairs = []
  for n, v in enumerate(videos):
    if "same_identity" in protocols and v.num_frames >= 2:
      pairs.append(Pair("same_identity", f"same_{n:05d}", v.video_id, 0, v.video_id, 1, min(frames, v.num_frames - 1)))
  if "cross_identity" in protocols:
    # The k-th video of another identity, without listing them per video (VoxCeleb1 test: 4,900 videos): the
    # videos of each identity are one contiguous run of `by_identity`, which the draw skips over.
    by_identity = sorted(range(len(videos)), key=lambda i: (videos[i].identity, videos[i].video_id))
    first, count = {}, {}
    for pos, i in enumerate(by_identity):
      first.setdefault(videos[i].identity, pos)
      count[videos[i].identity] = count.get(videos[i].identity, 0) + 1
    for n, v in enumerate(videos):
      others = len(videos) - count[v.identity]
      if not others:
        continue  # a dataset of one identity has no cross-identity pairs
      k = int(rng.integers(others))
      pos = k if k < first[v.identity] else k + count[v.identity]
      d = videos[by_identity[pos]]
      pairs.append(Pair("cross_identity", f"cross_{n:05d}", v.video_id, 0, d.video_id, 0, min(frames, d.num_frames)))
  return pairs


def limit_pairs(pairs: Sequence[Pair], limit: int | None) -> list[Pair]:
  """The first `limit` pairs of each protocol (a quick run scores the start of the same list)."""
  if limit is None:
    return list(pairs)
  if limit < 1:
    raise ValueError(f"--limit {limit} must be >= 1")
  counts: dict[str, int] = {}
  out = []
  for p in pairs:
    counts[p.protocol] = counts.get(p.protocol, 0) + 1
    if counts[p.protocol] <= limit:
      out.append(p)
  return out


def write_pairs(path: Path, pairs: Sequence[Pair], meta: dict) -> None:
  """pairs.json: the list and what it was made from (dataset, seed, frames); read back by `read_pairs`."""
  path.write_text(json.dumps({"format": PAIRS_FORMAT, **meta, "pairs": [p.to_json() for p in pairs]}, indent=1))


def read_pairs(path: str | Path, dataset=None) -> list[Pair]:
  """A pair list written by `mimajax evaluate` (pairs.json); every pair is checked against `dataset` when given."""
  path = Path(path)
  try:
    data = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--pairs {path} is not a readable pair list ({type(e).__name__}: {e})") from e
  if not isinstance(data, dict) or data.get("format") != PAIRS_FORMAT or not isinstance(data.get("pairs"), list):
    raise ValueError(f"--pairs {path} is not a {PAIRS_FORMAT} file (the pairs.json `mimajax evaluate` writes)")
  types = {f.name: f.type for f in dataclasses.fields(Pair)}
  pairs = []
  for n, item in enumerate(data["pairs"]):
    if not isinstance(item, dict) or set(item) != set(types):
      raise ValueError(f"--pairs {path}: pair {n} must have exactly the fields {sorted(types)}")
    wrong = [k for k, t in types.items() if type(item[k]).__name__ != t]  # bool is not an int here
    if wrong:
      raise ValueError(f"--pairs {path}: pair {n} has fields of the wrong type: {wrong} (ints and strings expected)")
    p = Pair(**item)
    if not PAIR_ID.fullmatch(p.pair_id):
      raise ValueError(f"--pairs {path}: pair id {p.pair_id!r} must be letters, digits, '_', '-' or '.' (a file name)")
    if p.protocol not in PROTOCOLS:
      raise ValueError(f"--pairs {path}: pair {p.pair_id} has protocol {p.protocol!r}; expected one of {PROTOCOLS}")
    if p.protocol == "same_identity" and p.source_video != p.driver_video:
      raise ValueError(f"--pairs {path}: same-identity pair {p.pair_id} drives {p.source_video} with another video")
    if dataset is not None:
      for vid, start, count in ((p.source_video, p.source_frame, 1), (p.driver_video, p.driver_start, p.frames)):
        v = dataset.videos.get(vid)
        if v is None:
          raise ValueError(f"--pairs {path}: pair {p.pair_id} names video {vid!r}, which --data does not hold")
        if start < 0 or start + count > v.num_frames:
          raise ValueError(f"--pairs {path}: pair {p.pair_id} reads frames {start}..{start + count - 1} of {vid} "
                           f"({v.num_frames} frames)")  # fmt: skip
    pairs.append(p)
  ids = [p.pair_id for p in pairs]
  if len(set(ids)) != len(ids):
    raise ValueError(f"--pairs {path}: pair ids are not unique")
  return pairs
