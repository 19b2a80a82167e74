"""What a run reports: clu metric writers (TensorBoard + logs), a progress bar, steps/s, images/s, MFU, samples.

MFU = (FLOPs of one compiled step, from XLA's cost analysis) x steps/s / (peak dense bf16 FLOP/s of the
devices). The peak table covers the accelerators this project targets; elsewhere (CPU) MFU is not reported.
"""

from __future__ import annotations

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


class Reporter:
  """Host 0 writes metrics every `config.log.every_steps` steps and shows a progress bar; other hosts log only."""

  def __init__(self, workdir: str | os.PathLike, config, *, start: int, total: int):
    from clu import metric_writers

    self.every = max(1, int(config.log.every_steps))
    self.lead = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.lead)
    self.bar = None
    if self.lead and config.log.progress_bar:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=start, desc=f"train {config.name}", unit="step", dynamic_ncols=True)
    self.flops = None
    self.peak = peak_flops()
    self.devices = jax.device_count()
    self._last_time, self._last_step = time.perf_counter(), start
    self._sums: dict[str, float] = {}
    self._count = 0

  def set_flops(self, flops: float | None) -> None:
    self.flops = flops

  def step(self, step: int, metrics: dict[str, Any], *, images: int) -> None:
    if self.bar is not None:
      self.bar.update(1)
    # Metrics stay on device until a report is due: fetching every step would serialise the host and the device.
    self._pending = metrics
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
    self.writer.write_scalars(step, values)
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "steps_per_s", "mfu")})

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    self.writer.flush()
    self.writer.close()


def write_samples(workdir: str | os.PathLike, step: int, run, state, host_batch: dict) -> Path | None:
  """samples/step_XXXXXXX.png (host 0): per row source | render I_R | generated | ground truth.

  Generated with the current parameters (the EMA copy when kept) by the sampler users animate with:
  DDIM/Euler with CFG over `config.sample.num_inference_steps`, first frame of each clip.
  """
  if jax.process_index() != 0:
    return None
  import imageio.v3 as iio
  from flax import nnx

  from mimajax.diffusion import schedulers
  from mimajax.mimaface import conditioning
  from mimajax.mimaface.sampling import ClipSampler, SamplerConfig

  config = run.config
  n = min(config.sample.count, len(host_batch["identity"]))
  model = nnx.merge(nnx.graphdef(run.model), state.ema_params or state.params, nnx.state(run.model, nnx.Not(nnx.Param)))
  vae = nnx.merge(run.vae_graphdef, run.frozen["vae"])
  face_model = run.frozen["face_model"]
  local = {k: np.asarray(v[:n]) for k, v in host_batch.items()}
  batch = conditioning.model_batch(vae, face_model, local, clip_size=config.model.clip.image_size,
                                   coefficient_dim=config.data.coefficient_dim,
                                   shading=config.data.render_shading)  # fmt: skip
  appearance = model.encode_appearance(batch["source"], batch["motion"], batch.get("face_features"))
  schedule = schedulers.make_noise_schedule(**config.noise_schedule.to_dict())
  sampler = getattr(run, "sampler", None)
  if sampler is None:  # one sampler for the run: later sample steps swap in new weights, no recompilation
    sampler = run.sampler = ClipSampler(model, schedule, SamplerConfig(scheduler=config.sample.scheduler,
                                        num_inference_steps=config.sample.num_inference_steps,
                                        guidance_scale=config.sample.guidance_scale))  # fmt: skip
  else:
    sampler.state = nnx.state(model)
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(config.seed + 1), step), batch["latents"].shape)
  latents = sampler(context=appearance.context, render_latents=batch["render_latents"], noise=noise)
  first = (lambda x: x[:, 0]) if config.stage == 2 else (lambda x: x)  # the first frame of each clip
  size = config.data.resolution
  columns = [
    conditioning.clip_source(jax.numpy.asarray(local["source_frame"]), size),
    conditioning.render_images(face_model, first(batch["motion"]), size, config.data.render_shading),
    conditioning.decode_frames(vae, first(latents)),
    conditioning.to_unit(jax.numpy.asarray(first(local["frames"]))),
  ]
  grid = np.concatenate([np.concatenate(list(np.asarray(c)), axis=0) for c in columns], axis=1)
  path = Path(workdir) / "samples" / f"step_{step:07d}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  iio.imwrite(path, np.uint8(np.clip(grid, 0, 1) * 255 + 0.5))
  log.info("samples: %s", path)
  return path
