"""`mimajax bench animate`: one animation clip in mimajax against the exported PyTorch `MIMAFacePipeline`.

Both sides get the same random-weight model (exported once: `mimajax.mimaface.export`), source portrait, driving
coefficients, initial noise and ICA conditioning, on the same machine, after a warm-up. A clip is what `mimajax
animate` does per clip: CLIP + MIA of the source under the clip's motion, the VAE encoding of the clip's 3DMM
renders, the guided sampling loop (DDIM, classifier-free guidance, ICA), and the VAE decoding of the frames. The
renders are rasterised once beforehand (the PyTorch pipeline has no rasteriser: both sides encode the same
images). The two sides are timed interleaved, clip against clip (`mimajax.bench.paired`), and the ratio is the
median of the pairs' ratios; the last line is `ratio=<jax time / torch time>`.

Default: SD1.5 sizes (U-Net with AnimateDiff motion modules, CLIP ViT-L/14, the SD VAE) at 256 px, 4 frames, 3 DDIM
steps with guidance 3.5. `--size tiny` is the CI-sized model at 32 px. `--family mmfa` times MMFA's generated
frames instead (`mimajax.mmfa.bench`; no PyTorch side).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from mimajax import bench
from mimajax.diffusion import schedulers
from mimajax.face3d import synthetic_model
from mimajax.mimaface import conditioning
from mimajax.mimaface.sampling import ClipSampler, SamplerConfig
from mimajax.parity.mimaface import _jitted, _numpy, _video_to_torch, build_random, parity_inputs

RESOLUTION = {"tiny": 32, "sd15": 256}


def bench_animate(size: str = "sd15", *, frames: int = 4, steps: int = 3, guidance: float = 3.5,
                  resolution: int | None = None, pairs: int = 3, seed: int = 0,
                  log: Callable[[str], None] = print) -> bench.Paired:  # fmt: skip
  """Interleaved clip timings, JAX first in each pair."""
  import tempfile

  import torch

  from mimajax.mimaface.export import export_mimaface
  from mimajax.mimaface.pytorch import MIMAFacePipeline

  if size not in RESOLUTION:
    raise ValueError(f"bench animate size {size!r}; expected one of {sorted(RESOLUTION)}")
  resolution = resolution or RESOLUTION[size]
  model, vae = build_random(size, seed=seed)
  face_model = synthetic_model(seed)
  schedule = schedulers.make_noise_schedule(**common.noise_schedule().to_dict())
  config = SamplerConfig(scheduler="ddim", num_inference_steps=steps, guidance_scale=guidance)
  latent = resolution // conditioning.vae_scale(vae)
  x = parity_inputs(model, frames, latent, seed)
  motion = x["motion"][..., :257]  # the paper's MIA (the default variant) reads 257 columns
  images = jax.jit(conditioning.render_images, static_argnums=2)(face_model, jnp.asarray(motion), resolution)
  images = jax.block_until_ready(images)

  clip_context = _jitted(lambda m, s, c: m.encode_appearance(s, c, None).context, model)
  encode = _jitted(conditioning.encode_frames, vae)
  sampler = ClipSampler(model, schedule, config)
  decode = _jitted(lambda v, z: v.decode_latents(z.reshape(-1, *z.shape[2:])), vae)

  def run_jax():
    context = clip_context(x["source"], motion)
    render = encode(images)
    latents = sampler(context=context, render_latents=render, noise=x["noise"], cond_latents=x["cond_latents"],
                      mask=x["mask"])  # fmt: skip
    jax.block_until_ready(decode(latents))

  with tempfile.TemporaryDirectory() as tmp:
    export_mimaface(model, vae, f"{tmp}/export", num_frames=frames, resolution=resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = MIMAFacePipeline.from_pretrained(f"{tmp}/export", device=device)
  t = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731
  vid = lambda a: t(_video_to_torch(a))  # noqa: E731
  source_t, motion_t, images_t = t(x["source"].transpose(0, 3, 1, 2)), t(motion), vid(images)
  noise_t, cond_t, mask_t = vid(x["noise"]), vid(x["cond_latents"]), vid(x["mask"])

  @torch.no_grad()
  def run_torch():
    render = pipe.encode(images_t)
    latents = pipe(source_t, motion_t, render, noise_t, cond_t, mask_t, num_inference_steps=steps,
                   guidance_scale=guidance, scheduler="ddim")  # fmt: skip
    _numpy(pipe.decode(latents))
    if device == "cuda":
      torch.cuda.synchronize()

  log(f"bench animate [{size}]: one clip of {frames} frames at {resolution} px ({latent}x{latent} latents), "
      f"{steps} DDIM steps, guidance {guidance}; JAX on {jax.devices()[0].platform}, torch on {device} "
      f"({torch.get_num_threads()} threads)")  # fmt: skip
  result = bench.paired(run_jax, run_torch, pairs=pairs, warmup=1)  # the warm-up compiles the JAX programs
  for name, seconds in (("jax", result.a_s), ("torch", result.b_s)):
    median = float(np.median(seconds))
    log(f"{name:5s} {median:7.2f} s per clip, {frames / median:.3f} frames/s")
  log(result.describe("jax", "torch"))
  log(f"jax_frames_per_s={frames / float(np.median(result.a_s)):.4g} "
      f"torch_frames_per_s={frames / float(np.median(result.b_s)):.4g}")  # fmt: skip
  return result


def main(args) -> int:
  """`mimajax bench animate` (args from the bench parser)."""
  if args.family == "mmfa":
    from mimajax.mmfa import bench as mmfa_bench

    argv = ["--frames", str(args.frames or 32), "--repeats", str(args.repeats)]
    if args.mmfa_config:
      argv += ["--config", args.mmfa_config]
    if args.resolution:
      argv += ["--resolution", str(args.resolution)]
    return mmfa_bench.main(argv)
  result = bench_animate(args.size, frames=args.frames or 4, steps=args.steps, guidance=args.guidance,
                         resolution=args.resolution, pairs=args.repeats)  # fmt: skip
  print(f"ratio={result.ratio:.3f}")
  return 0
