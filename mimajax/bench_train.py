"""`mimajax bench train --cached-latents`: the train step reading a latent cache against the same step encoding the
frames and renders itself, on the same state, batch and rng.

  mimajax bench train --cached-latents --config configs/tiny.py:1 --data data/demo_latents [--repeats 7]

The family's task is built over the cache (`mimajax cache-latents`; config.data.latents="always", flip off; the
cache's VAE as config.model.vae_from unless the config names a pretrained one), and
its jitted step is called on one host batch two ways: as loaded (latents and render latents read from the cache)
and with those two keys dropped (the VAE encodes the frames and the renders inside the step, as without a cache).
First both run once from the same initial state: their losses are printed (equal up to float rounding: the cached
latents are the step's own encoding). Then the two sides are timed interleaved (bench.paired), each on its own
donated state; the last line is `ratio=<cached step time / encoding step time>`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimajax import bench, bench_memory, families, sharding, train, train_step

CACHED_KEYS = ("latents", "render_latents")


def add_arguments(p) -> None:
  p.add_argument("--cached-latents", action="store_true", help="train: cached latents vs encoding in the step")
  p.add_argument("--config", default="configs/tiny.py:1", help="train: FILE[:ARG], the stage to time")


def main(args, log: Callable[[str], None] = print) -> int:
  if not args.cached_latents:
    raise ValueError("bench train compares the step with and without a latent cache: pass --cached-latents")
  if not args.data:
    raise ValueError("--data: a latent cache (`mimajax cache-latents --data ... --out DIR`) is needed")
  from data_pipeline import latent_cache

  section = latent_cache.manifest_latents(args.data)
  if section is None:
    raise ValueError(f"--data {args.data} is not a latent cache (`mimajax cache-latents --data ... --out DIR`)")
  config = bench_memory.load_config_file(args.config)
  with config.unlocked():
    config.data.update(path=args.data, latents="always", flip=False, workers=0)
    if not config.model.get("pretrained") and not config.model.get("vae_from"):
      config.model.vae_from = section["vae"]  # the VAE the cache was made with is the run's frozen VAE
  family = families.get(families.name_of(config))
  family.check_config(config)
  with tempfile.TemporaryDirectory() as workdir:
    task = family.build_task(config, Path(workdir))
  missing = [k for k in CACHED_KEYS if k not in (task.batch_keys or ())]
  if missing:
    raise ValueError(f"the {family.name} task over {args.data} does not read {missing} from the cache")
  host = next(task.iterator)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  optimizers = train.group_optimizers(task)
  step = train.build_step(task, config, optimizers)
  frozen_sh = train.frozen_shardings(task.frozen, task.frozen_rules or {}, mesh) if task.frozen is not None else None
  frozen = jax.device_put(task.frozen, frozen_sh) if frozen_sh is not None else None
  batches = {
    "cached": {k: np.asarray(host[k]) for k in task.batch_keys},
    "encoding": {k: np.asarray(host[k]) for k in task.batch_keys if k not in CACHED_KEYS},
  }
  runs, losses = {}, {}
  for name, host_batch in batches.items():
    state = train.init_sharded_state(task, optimizers, jax.random.key(config.seed), mesh,
                                     ema=bool(config.train.ema_decay))  # fmt: skip
    state = jax.tree.map(jnp.copy, state)  # its own buffers: the step donates them, and the task's modules hold them
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host_batch.items()}
    jitted = train_step.jit_train_step(step, train.shardings_of(state), batch_sh, sharding.replicated(mesh), frozen_sh)
    batch = jax.device_put(host_batch, batch_sh)
    state, metrics = jitted(state, batch, frozen)  # compiles; the loss of the first step from the initial state
    losses[name] = float(metrics["loss"])
    holder = {"state": state}

    def run(jitted=jitted, batch=batch, holder=holder):
      holder["state"], m = jitted(holder["state"], batch, frozen)
      jax.block_until_ready(m)

    runs[name] = run
  log(f"{args.config} over {args.data}: batch {config.data.batch_size}, {config.data.resolution} px; first-step loss "
      f"cached {losses['cached']:.6f}, encoding {losses['encoding']:.6f} (rel. diff "
      f"{abs(losses['cached'] - losses['encoding']) / max(abs(losses['encoding']), 1e-12):.1e})")  # fmt: skip
  both = bench.paired(runs["cached"], runs["encoding"], pairs=args.repeats or 7)
  log(both.describe("cached", "encoding"))
  log(f"ratio={both.ratio:.3f}")
  return 0
