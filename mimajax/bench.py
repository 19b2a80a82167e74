"""Benchmarks that print figures: the U-Net training step in mimajax against diffusers' PyTorch U-Net.

A training step here is forward + backward of the epsilon-MSE loss with respect to every U-Net
parameter (no optimizer update: identical work on both sides), jitted in JAX, timed after
warm-up. The two sides run interleaved (JAX, torch, JAX, torch, ...: `paired`) and the ratio is the median of the
pairs' ratios with its min and max, so a machine that slows down mid-run slows both sides of a pair.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; fp32 runs are reported against the same peak.
PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "A10": 125e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
}


def device_peak_flops(device: jax.Device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def _timed(fn: Callable[[], None]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _median_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    fn()
  return statistics.median(_timed(fn) for _ in range(repeats))


@dataclasses.dataclass(frozen=True)
class Paired:
  """Two sides timed in alternation (A B A B ...): each pair's ratio a / b, so a drift of the machine (another job,
  frequency, memory) moves both sides of a pair alike and cancels in its ratio."""

  a_s: tuple[float, ...]
  b_s: tuple[float, ...]

  @property
  def ratios(self) -> tuple[float, ...]:
    return tuple(a / b for a, b in zip(self.a_s, self.b_s))

  @property
  def ratio(self) -> float:
    return statistics.median(self.ratios)

  @property
  def spread(self) -> float:
    """(max - min) / median of the pair ratios."""
    r = self.ratios
    return (max(r) - min(r)) / statistics.median(r)

  def describe(self, a: str, b: str) -> str:
    r = self.ratios
    return (f"{a} / {b}: median {self.ratio:.3f} over {len(r)} interleaved pairs (min {min(r):.3f}, max {max(r):.3f}, "
            f"spread {100 * self.spread:.1f}%); {a} median {statistics.median(self.a_s) * 1e3:.1f} ms, {b} median "
            f"{statistics.median(self.b_s) * 1e3:.1f} ms")  # fmt: skip


def paired(run_a: Callable[[], None], run_b: Callable[[], None], *, pairs: int, warmup: int = 1) -> Paired:
  """`pairs` interleaved timings of two warmed-up functions (each already compiled / traced)."""
  if pairs < 1:
    raise ValueError(f"pairs must be >= 1; got {pairs}")
  for _ in range(warmup):
    run_a()
    run_b()
  a_s, b_s = [], []
  for _ in range(pairs):
    a_s.append(_timed(run_a))
    b_s.append(_timed(run_b))
  return Paired(tuple(a_s), tuple(b_s))


def unet_train_step_fn(model: UNet2DConditionModel):
  """A jitted (params, batch) -> (loss, grads) function for the epsilon-MSE objective."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, x, t, ctx, target):
    m = nnx.merge(graphdef, params, rest)
    pred = m(x, t, ctx)
    return jnp.mean(jnp.square(pred - target))

  step = jax.jit(jax.value_and_grad(loss_fn))
  return step, params


def bench_unet(
  config: UNetConfig,
  *,
  batch: int,
  resolution: int,
  dtype=jnp.float32,
  attention_impl="xla",
  warmup: int = 2,
  repeats: int = 5,
  compare_torch: bool = True,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> dict[str, float]:
  """Times one U-Net training step in JAX (and in PyTorch on the same config and batch)."""
  side = resolution // 8  # latent side for an image of `resolution` pixels
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, side, side, config.in_channels), dtype=np.float32)
  target = rng.standard_normal((batch, side, side, config.out_channels), dtype=np.float32)
  t = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
  ctx = rng.standard_normal((batch, 77, config.cross_attention_dim), dtype=np.float32)

  model = UNet2DConditionModel(config, dtype=dtype, attention_impl=attention_impl, rngs=nnx.Rngs(seed))
  step, params = unet_train_step_fn(model)
  args = tuple(jnp.asarray(a) for a in (x, t, ctx, target))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  flops = None
  try:
    cost = step.lower(params, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception as e:  # cost analysis is best-effort on some backends
    log(f"cost_analysis unavailable: {e}")

  def run_jax():
    loss, grads = step(params, *args)
    jax.block_until_ready((loss, grads))

  t_compile = time.perf_counter()
  run_jax()
  t_compile = time.perf_counter() - t_compile
  both = None
  if compare_torch:  # interleaved with torch: each pair's two steps see the same machine
    run_torch = _torch_unet_step(config, x, t, ctx, target, seed, bf16=dtype == jnp.bfloat16)
    both = paired(run_jax, run_torch, pairs=repeats, warmup=warmup)
    jax_s = statistics.median(both.a_s)
  else:
    jax_s = _median_time(run_jax, warmup, repeats)
  device = jax.devices()[0]
  result = {"jax_s": jax_s, "params": float(n_params), "compile_s": t_compile}
  log(
    f"device: {device.platform} {getattr(device, 'device_kind', '')}; U-Net {n_params / 1e6:.1f}M params, "
    f"block_out_channels={config.block_out_channels}, batch {batch} x {side}x{side}x{config.in_channels} latents "
    f"({resolution}px), compute {jnp.dtype(dtype).name}"
  )
  log(
    f"jax   train step (fwd+bwd): {jax_s * 1e3:9.1f} ms median of {repeats}"
    f"  (first call incl. compile {t_compile:.1f} s)"
  )
  if flops:
    result["flops"] = flops
    log(f"jax   step FLOPs (lowered cost analysis): {flops / 1e12:.3f} TFLOP")
    peak = device_peak_flops(device)
    if device.platform != "cpu":
      result["images_per_s"] = batch / jax_s
      log(f"images/s: {batch / jax_s:.2f}")
      if peak:
        result["mfu"] = flops / jax_s / peak
        log(f"MFU: {100 * result['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s peak")
  if both is not None:
    result.update(torch_s=statistics.median(both.b_s), ratio=both.ratio, ratio_min=min(both.ratios),
                  ratio_max=max(both.ratios), spread=both.spread)  # fmt: skip
    log(f"torch train step (fwd+bwd): {result['torch_s'] * 1e3:9.1f} ms median of {repeats}")
    log(both.describe("jax", "torch"))
  return result


def _torch_unet_step(config: UNetConfig, x, t, ctx, target, seed, bf16: bool = False) -> Callable[[], None]:
  """The same step in diffusers on the same machine (CUDA if torch sees a GPU), SDPA attention."""
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = TorchUNet(**config.to_diffusers()).to(device).train()
  as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
  xt, ct = as_torch(np.moveaxis(x, -1, 1)), as_torch(ctx)
  yt, tt = as_torch(np.moveaxis(target, -1, 1)), as_torch(t.astype(np.int64))

  def run():
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = torch.mean((model(xt, tt, ct).sample.float() - yt) ** 2)
    loss.backward()
    if device == "cuda":
      torch.cuda.synchronize()

  return run
