"""What a run reports: clu metric writers (TensorBoard + logs), a progress bar, steps/s, images/s, MFU.

MFU = (FLOPs of one compiled step, from XLA's cost analysis) x steps/s / (peak dense bf16 FLOP/s of the
devices). The peak table covers the accelerators this project targets; elsewhere (CPU) MFU is not reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("mimajax.train")

# Dense bf16 peak FLOP/s per device (vendor data sheets; SXM parts for NVIDIA).
PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function (XLA cost analysis), or None when XLA does not say."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


class PlainWriter:
  """Where clu (and the TensorFlow its TensorBoard writer imports) is not installed, as on a bare GPU machine: the
  scalars logged, and on host 0 appended to workdir/metrics.jsonl (one {"step", ...} object a line)."""

  def __init__(self, workdir: str | os.PathLike, *, just_logging: bool):
    self.path = None if just_logging else Path(workdir) / "metrics.jsonl"
    self._file = open(self.path, "a") if self.path is not None else None

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = {k: float(v) for k, v in scalars.items()}
    log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    if self._file is not None:
      self._file.write(json.dumps({"step": int(step), **values}) + "\n")

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def default_writer(workdir: str | os.PathLike, *, just_logging: bool):
  """clu's writer (TensorBoard events + logs) when clu and TensorFlow import, else a `PlainWriter`."""
  try:
    from clu import metric_writers

    return metric_writers.create_default_writer(str(workdir), just_logging=just_logging)
  except ImportError as e:
    log.warning("metrics: clu's TensorBoard writer is unavailable (%s); writing %s/metrics.jsonl instead", e, workdir)
    return PlainWriter(workdir, just_logging=just_logging)


class Reporter:
  """Host 0 writes metrics every `config.log.every_steps` steps and shows a progress bar; other hosts log only."""

  def __init__(self, workdir: str | os.PathLike, config, *, start: int, total: int):
    self.every = max(1, int(config.log.every_steps))
    self.lead = jax.process_index() == 0
    self.writer = default_writer(workdir, just_logging=not self.lead)
    self.bar = None
    if self.lead and config.log.progress_bar:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=start, desc=f"train {config.name}", unit="step", dynamic_ncols=True)
    self.flops = None
    self.peak = peak_flops()
    self.devices = jax.device_count()
    self._last_time, self._last_step = time.perf_counter(), start
    self.last: tuple[int, dict[str, float]] | None = None  # the newest reported (step, scalars)

  def set_flops(self, flops: float | None) -> None:
    self.flops = flops

  def step(self, step: int, metrics: dict[str, Any], *, images: int) -> None:
    if self.bar is not None:
      self.bar.update(1)
    # Metrics stay on device until a report is due: fetching every step would serialise the host and the device.
    if step % self.every and step != getattr(self.bar, "total", None):
      return
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0 and k != "finite"}
    now = time.perf_counter()
    steps = step - self._last_step
    if steps > 0:
      rate = steps / (now - self._last_time)
      values["steps_per_s"] = rate
      values["images_per_s"] = rate * images
      if self.flops and self.peak:
        values["mfu"] = self.flops * rate / (self.peak * self.devices)
    self._last_time, self._last_step = now, step
    self.last = (step, values)
    self.writer.write_scalars(step, values)
    if self.bar is not None:
      shown = {k: v for k, v in values.items() if k in ("loss", "steps_per_s", "mfu") or k.endswith("/loss")}
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

  def summary(self) -> str | None:
    """The newest reported scalars as one `key=value` line (what a launch script or a log scraper reads)."""
    if self.last is None or not self.lead:
      return None
    step, values = self.last
    return f"step={step} " + " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items()))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.writer.flush()
    self.writer.close()
