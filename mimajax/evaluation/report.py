"""What `mimajax evaluate` writes, from the per-frame figures of every pair and system.

summary.json   {protocol: {system: {metric: {"value", "network", "frames"}}}}: each figure, the network behind it
               and how many frames it averages (FID: how many generated frames its statistics come from); a value
               is null when no frame could be scored; PSNR of identical frames counts as 100 dB (scoring.PSNR_CAP)
report.json    what was scored: dataset, checkpoint, systems, networks, pair counts, frames without a face per
               pair and system, warnings (e.g. identities the model was trained on)
table.md       the papers' table: one row per system, same-identity and cross-identity column groups
pairs.json     the pair list (read back with --pairs); per_pair/<pair id>.json: per-frame values of every system
grid_<protocol>.png   source | driver | each system, at three moments, for the first pairs
curves_<protocol>.png per-frame curves (mean over pairs at each frame index) of the main metrics per system
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mimajax.evaluation.scoring import ALL_METRICS, GROUND_TRUTH_METRICS, HIGHER_IS_BETTER

TABLE_METRICS = {
  "same_identity": ("psnr", "ssim", "lpips", "fid", "csim", "akd", "apd", "aed", "exp", "pose", "gaze"),
  "cross_identity": ("fid", "csim", "akd", "apd", "aed", "exp", "pose", "gaze"),
}
CURVE_METRICS = ("psnr", "lpips", "csim", "akd", "aed", "pose")


def _json_value(v):
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return None
  return v


def summary(figures: Mapping, networks: Mapping[str, str]) -> dict:
  """figures: {protocol: {system: {metric: (value, frames)}}} -> the summary.json structure."""
  return {
    protocol: {
      system: {m: {"value": _json_value(v), "network": networks[m], "frames": n} for m, (v, n) in metrics.items()}
      for system, metrics in systems.items()
    }
    for protocol, systems in figures.items()
  }


def _cell(metric: str, value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float) and math.isinf(value):
    return "inf"
  if metric == "fid":
    value = max(value, 0.0)  # a Frechet distance is >= 0; a set against itself comes out at -1e-10 or so
  if metric in ("psnr", "fid", "akd", "exp"):
    return f"{value:.3f}"
  return f"{value:.4f}"


def table(figures: Mapping, systems: Sequence[str]) -> str:
  """The paper-style markdown table: a row per system, same-identity then cross-identity columns."""
  protocols = [p for p in TABLE_METRICS if p in figures]
  heads = [f"{'same' if p == 'same_identity' else 'cross'} {m.upper()}{_arrow(m)}" for p in protocols
           for m in TABLE_METRICS[p]]  # fmt: skip
  lines = ["| system | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 1)]
  for s in systems:
    cells = []
    for p in protocols:
      for m in TABLE_METRICS[p]:
        cells.append(_cell(m, figures[p].get(s, {}).get(m, (None, 0))[0]))
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _arrow(metric: str) -> str:
  return "↑" if HIGHER_IS_BETTER.get(metric) else "↓"


def network_lines(networks: Mapping[str, str]) -> str:
  groups: dict[str, list[str]] = {}
  for m in ALL_METRICS:
    groups.setdefault(networks[m], []).append(m.upper())
  return "\n".join(f"- {', '.join(ms)}: {net}" for net, ms in groups.items()) + "\n"


def write_markdown(path: Path, figures, systems, networks, meta: dict) -> str:
  text = table(figures, systems)
  notes = [
    f"Dataset {meta['data']}; {meta['pairs']} pairs ({meta['pair_counts']}), up to {meta['frames']} frames each, "
    f"scored at {meta['resolution']} px. Figures average every scored frame; FID's statistics come from the "
    "frames counted in summary.json (few frames bias FID upwards: compare FIDs only at equal counts).",
    "PSNR/SSIM/LPIPS compare with the ground truth (same-identity only); CSIM compares with the source; the motion "
    "metrics compare with the driver. copy_driver's same-identity frames are the ground truth itself; identical "
    "frames count as 100 dB of PSNR.",
  ]
  notes += [f"Warning: {w}" for w in meta.get("warnings", [])]
  if meta.get("no_face_total"):
    notes.append(f"Frames without a detectable face (left out of the face metrics): {meta['no_face_total']}; "
                 "per pair and system in report.json.")  # fmt: skip
  body = f"# mimajax evaluate\n\n{text}\nNetworks:\n{network_lines(networks)}\n" + "\n".join(notes) + "\n"
  path.write_text(body)
  return text


def write_grid(path: Path, rows: Sequence[dict], systems: Sequence[str], moments: int = 3) -> None:
  """rows: {"pair": id, "source": (R,R,3), "driver": (T,R,R,3), system: (T,R,R,3)}: one row per pair."""
  import cv2

  from mimajax import video_io

  if not rows:
    return
  r = rows[0]["source"].shape[0]
  cols = ["source"] + [f"driver t{i}" for i in range(moments)] + [f"{s} t{i}" for s in systems for i in range(moments)]
  band = max(14, r // 5)
  out_rows = []
  for row in rows:
    t = len(row["driver"])
    picks = sorted({int(round(x)) for x in np.linspace(0, t - 1, moments)}) + [t - 1] * moments
    picks = picks[:moments]
    tiles = [row["source"]] + [row["driver"][i] for i in picks]
    for s in systems:
      tiles += [row[s][i] if s in row else np.zeros_like(row["source"]) for i in picks]
    out_rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(out_rows, axis=0)
  header = np.full((band, grid.shape[1], 3), 255, np.uint8)
  scale = band / 40
  for i, name in enumerate(cols):
    cv2.putText(header, name[: max(4, r // 6)], (i * r + 2, int(band * 0.7)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
  video_io.write_image(path, np.concatenate([header, grid], axis=0))


def write_curves(path: Path, per_frame: Mapping[str, Mapping[str, list[np.ndarray]]], protocol: str) -> None:
  """per_frame: {system: {metric: [per-pair (T,) arrays]}} -> one panel per metric, the mean at each frame index."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = [m for m in CURVE_METRICS if any(m in v for v in per_frame.values())]
  if protocol == "cross_identity":
    metrics = [m for m in metrics if m not in GROUND_TRUTH_METRICS]
  if not metrics:
    return
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for system, values in per_frame.items():
      series = values.get(m) or []
      if not series:
        continue
      t = max(len(s) for s in series)
      stack = np.full((len(series), t), np.nan)
      for i, s in enumerate(series):
        stack[i, : len(s)] = s
      stack[~np.isfinite(stack)] = np.nan
      with np.errstate(all="ignore"), _quiet():
        mean = np.nanmean(stack, axis=0)
      ax.plot(np.arange(1, t + 1), mean, label=system)
    ax.set_title(f"{m.upper()} {_arrow(m)}")
    ax.set_xlabel("driving frame")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(protocol.replace("_", " "))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class _quiet:
  def __enter__(self):
    import warnings

    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *exc):
    return self._w.__exit__(*exc)


def write_json(path: Path, data) -> None:
  path.write_text(json.dumps(data, indent=1, allow_nan=False, default=_default))


def _default(x):
  if isinstance(x, np.ndarray):
    return [_json_value(float(v)) for v in x.tolist()]
  if isinstance(x, (np.floating, np.integer)):
    return _json_value(x.item())
  raise TypeError(f"not JSON: {type(x).__name__}")
