"""How often each face detector finds a face, on scikit-image's LFW subset (100 faces, 100 non-faces) and on
real portraits:

  python -m mimajax.faces.detection_eval [--limit 100]

Each 25-px LFW crop (a tight face, brows to mouth, no outline of the head) is shown to the detectors of
detection.py four ways:

  lfw          the crop at 128 px in the middle of a 256-px canvas of its own mean grey
  small        the crop at 1/20 of the shorter side of a 1080 x 1440 background (scikit-image's `coffee`, which
               has no face), at a seeded random place: 54 px
  rot+30/-30   the `lfw` canvas turned by +-30 degrees in the image plane
  non-face     scikit-image's 100 non-face crops shown as `lfw`: any face found is a false positive

and each whole portrait (the demo's astronaut and grace_hopper, and the face_recognition test portraits that
launch/setup.sh installs in .cache/test_assets, where present) three ways:

  portrait        as it is
  portrait-small  scaled so its face (as Haar frames it in the original) is 1/20 of the background's shorter side,
                  pasted at 4 seeded places
  portrait-rot    turned by +30 and by -30 degrees

A face counts as found when a detected face's centre lies inside the pasted crop; the table gives the fraction
found (false positives for non-face). Every figure is deterministic (fixed placement seed, no randomness in the
detectors).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from mimajax.faces import detection

SETS = ("lfw", "small", "rot+30", "rot-30", "non-face", "portrait", "portrait-small", "portrait-rot")
TEST_PORTRAITS = ".cache/test_assets/face_recognition"
SMALL_PLACES = 4
CANVAS = 256
FACE = 128
BACKGROUND = (1080, 1440)
SMALL_FRACTION = 1 / 20


def _rgb(gray: np.ndarray) -> np.ndarray:
  return np.repeat(np.clip(gray * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _on_canvas(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image, the crop's corners (4, 2) in it)."""
  import cv2

  canvas = np.full((CANVAS, CANVAS), crop.mean(), np.float64)
  o = (CANVAS - FACE) // 2
  canvas[o : o + FACE, o : o + FACE] = cv2.resize(crop, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
  corners = np.array([[o, o], [o + FACE, o], [o + FACE, o + FACE], [o, o + FACE]], np.float64)
  return _rgb(canvas), corners


def _rotated(image: np.ndarray, corners: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
  import cv2

  h, w = image.shape[:2]
  m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
  out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
  return out, corners @ m[:, :2].T + m[:, 2]


def _background() -> np.ndarray:
  import cv2
  import skimage.data

  return cv2.resize(skimage.data.coffee(), BACKGROUND[::-1], interpolation=cv2.INTER_CUBIC)


def _pasted_small(crop: np.ndarray, background: np.ndarray, rng: np.random.Generator):
  import cv2

  side = int(round(SMALL_FRACTION * min(background.shape[:2])))
  face = _rgb(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA))
  y, x = (int(rng.integers(0, n - side)) for n in background.shape[:2])
  image = background.copy()
  image[y : y + side, x : x + side] = face
  return image, np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], np.float64)


def _inside(point, corners: np.ndarray) -> bool:
  import cv2

  return cv2.pointPolygonTest(corners.astype(np.float32).reshape(-1, 1, 2), tuple(map(float, point)), False) >= 0


def portraits() -> dict[str, np.ndarray]:
  import glob

  import cv2
  import skimage.data
  from matplotlib import cbook

  hopper = cv2.cvtColor(cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)
  out = {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}
  for path in sorted(glob.glob(f"{TEST_PORTRAITS}/*.jpg")):
    out[Path(path).stem] = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
  return out


def _portrait_samples(image: np.ndarray, background: np.ndarray, rng: np.random.Generator):
  import cv2

  face = detection.faces(image, "haar")
  if not face:
    raise ValueError("a portrait of detection_eval has no Haar face: it cannot be placed")
  cx, cy, side = face[0]
  corners = np.array([[cx - side / 2, cy - side / 2], [cx + side / 2, cy - side / 2],
                      [cx + side / 2, cy + side / 2], [cx - side / 2, cy + side / 2]])  # fmt: skip
  yield "portrait", image, corners
  scale = SMALL_FRACTION * min(background.shape[:2]) / side
  small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
  h, w = (min(a, b) for a, b in zip(small.shape[:2], background.shape[:2]))
  for _ in range(SMALL_PLACES):
    y, x = int(rng.integers(0, background.shape[0] - h + 1)), int(rng.integers(0, background.shape[1] - w + 1))
    out = background.copy()
    out[y : y + h, x : x + w] = small[:h, :w]
    yield "portrait-small", out, corners * scale + (x, y)
  for degrees in (30, -30):
    yield ("portrait-rot", *_rotated(image, corners, degrees))


def samples(limit: int = 100):
  """(set name, image, the face's corners or None) for every set of the module docstring."""
  import skimage.data

  lfw = skimage.data.lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
  background, rng = _background(), np.random.default_rng(0)
  for crop in lfw[:limit]:
    image, corners = _on_canvas(crop)
    yield "lfw", image, corners
    yield ("small", *_pasted_small(crop, background, rng))
    for degrees in (30, -30):
      yield (f"rot{degrees:+d}", *_rotated(image, corners, degrees))
  for crop in lfw[100 : 100 + limit]:
    yield "non-face", _on_canvas(crop)[0], None
  for image in portraits().values():
    yield from _portrait_samples(image, background, rng)


def rates(detectors=detection.DETECTORS, limit: int = 100) -> dict[str, dict[str, float]]:
  """{detector: {set: fraction found (non-face: fraction with any face)}}."""
  hits = {d: {s: [] for s in SETS} for d in detectors}
  for name, image, corners in samples(limit):
    for d in detectors:
      found = detection.faces(image, d)
      hits[d][name].append(bool(found) if corners is None else any(_inside(f[:2], corners) for f in found))
  return {d: {s: float(np.mean(v)) for s, v in by_set.items()} for d, by_set in hits.items()}


def table(result: dict[str, dict[str, float]], limit: int) -> str:
  lines = [f"| detector | {' | '.join(SETS)} |", "|---" * (len(SETS) + 1) + "|"]
  for d, by_set in result.items():
    lines.append(f"| {d} | " + " | ".join(f"{by_set[s]:.2f}" for s in SETS) + " |")
  return "\n".join(lines) + (f"\n({limit} faces and {limit} non-faces of skimage.data.lfw_subset; "
                             f"{len(portraits())} portraits: {', '.join(portraits())})")  # fmt: skip


def main(argv=None, log: Callable[[str], None] = print) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--limit", type=int, default=100, help="faces (and non-faces) used, at most 100")
  args = p.parse_args(argv)
  log(table(rates(limit=min(100, args.limit)), min(100, args.limit)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
