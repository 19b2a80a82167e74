"""MMFA's generated frames per second: `python -m mimajax.mmfa.bench [--config configs/mmfa_vox256.py] [--frames 32]`.

The animation path of `mimajax animate` and `evaluate` (mmfa.inference.Inference): the source encoded once, then
each driver frame's head, expression code, eq. 5 keypoints, dense motion, warp and multi-scale generator, in chunks of
`inference.CHUNK` frames, jitted, after a warm-up; random weights of the config's sizes (the time does not depend on
the values). The last line is `frames_per_s=`.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import numpy as np
from flax import nnx

from mimajax.mmfa.inference import Inference
from mimajax.mmfa.model import MMFA


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("mmfa_bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mimajax.mmfa.bench", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mmfa_vox256.py")
  p.add_argument("--resolution", type=int, default=None, help="default: the config's (256 for vox256)")
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  config = load_config(args.config)
  if args.resolution:
    config.data.resolution = args.resolution
  model = MMFA(config.model, rngs=nnx.Rngs(0))
  inference = Inference(model, config)
  r = inference.resolution
  rng = np.random.default_rng(0)
  source = rng.integers(0, 256, (r, r, 3), dtype=np.uint8)
  driver = rng.integers(0, 256, (args.frames, r, r, 3), dtype=np.uint8)
  rotations = np.broadcast_to(np.eye(3, dtype=np.float32), (args.frames, 3, 3))
  inference.animate(source, np.eye(3, dtype=np.float32), driver, rotations)  # compile the chunk programs
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    jax.block_until_ready(inference.animate(source, np.eye(3, dtype=np.float32), driver, rotations))
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  print(f"config={args.config} resolution={r} frames={args.frames} device={jax.devices()[0].platform} "
        f"seconds={seconds:.2f}")  # fmt: skip
  print(f"frames_per_s={args.frames / seconds:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
