"""A second model family for the tests, and its config file: a least-squares GAN on 2-D points.

Two parameter groups with their own optimizers (a generator with BatchNorm, whose statistics the state
carries, and a discriminator), registered with `mimajax.families` when this file is imported. It is
also a config file: `mimajax train --config tests/gan_family.py --workdir DIR` registers the family
and trains it through the shared loop, checkpoints and all, with nothing of it in the library.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mimajax import families
from mimajax.models.layers import linear

LATENT = 4
WIDTH = 32
AXIS_RULES = (("embed", "fsdp"), ("mlp", "tensor"))


class Generator(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = linear(LATENT, WIDTH, use_bias=False, rngs=rngs)  # a bias before BatchNorm has no gradient
    self.norm = nnx.BatchNorm(WIDTH, momentum=0.9, rngs=rngs)  # batch statistics: state the loop must carry
    self.hidden = linear(WIDTH, WIDTH, axes=("mlp", "embed"), rngs=rngs)
    self.out = linear(WIDTH, 2, axes=("embed", None), rngs=rngs)

  def __call__(self, z):
    return self.out(jax.nn.relu(self.hidden(jax.nn.relu(self.norm(self.inp(z))))))


class Discriminator(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = linear(2, WIDTH, rngs=rngs)
    self.hidden = linear(WIDTH, WIDTH, axes=("mlp", "embed"), rngs=rngs)
    self.out = linear(WIDTH, 1, axes=("embed", None), rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.leaky_relu(self.hidden(jax.nn.leaky_relu(self.inp(x)))))[:, 0]


def ring_points(rng: np.random.Generator, n: int, modes: int = 8) -> np.ndarray:
  """Points on `modes` Gaussian blobs around the unit circle (the classic GAN mode-coverage toy)."""
  angle = 2 * np.pi * rng.integers(0, modes, n) / modes
  return (np.stack([np.cos(angle), np.sin(angle)], -1) + 0.05 * rng.standard_normal((n, 2))).astype(np.float32)


class PointStream:
  """This host's batches, a pure function of (seed, host, index): the state to save is the index."""

  def __init__(self, seed: int, rows: int, delay_s: float = 0.0):
    self.seed, self.rows, self.delay_s, self.index = seed, rows, delay_s, 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self.delay_s:
      time.sleep(self.delay_s)  # a slow loader, so a test can kill a run between checkpoints
    rng = np.random.default_rng([self.seed, jax.process_index(), self.index])
    self.index += 1
    return {"points": ring_points(rng, self.rows), "z": rng.standard_normal((self.rows, LATENT)).astype(np.float32)}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def generator_loss(modules, batch, rng, extra):
  del rng, extra
  fake = modules["generator"](batch["z"])
  score = modules["discriminator"](fake)
  loss = jnp.mean((score - 1.0) ** 2)
  return loss, {"fake_mean_norm": jnp.mean(jnp.linalg.norm(fake, axis=-1))}


def discriminator_loss(modules, batch, rng, extra):
  del rng, extra
  fake = jax.lax.stop_gradient(modules["generator"](batch["z"]))
  real, fake = modules["discriminator"](batch["points"]), modules["discriminator"](fake)
  loss = 0.5 * (jnp.mean((real - 1.0) ** 2) + jnp.mean(fake**2))
  return loss, {"real_score": jnp.mean(real)}


def count_steps(extra, aux, batch):
  """Extra state: how many points the discriminator has seen (exercises `update_extra`)."""
  return extra + batch["points"].shape[0]


def build_task(config, workdir) -> families.Task:
  del workdir
  rngs = nnx.Rngs(config.seed)
  rows = config.data.batch_size // jax.process_count()
  t = config.train
  opt = lambda lr: families.OptimizerConfig(learning_rate=lr, weight_decay=0.0, b1=0.5, max_grad_norm=None)
  return families.Task(
    modules={"generator": Generator(rngs=rngs), "discriminator": Discriminator(rngs=rngs)},
    losses={"generator": generator_loss, "discriminator": discriminator_loss},
    optimizers={"generator": opt(t.generator_lr), "discriminator": opt(t.discriminator_lr)},
    axis_rules={"generator": AXIS_RULES, "discriminator": AXIS_RULES},
    iterator=PointStream(config.seed, rows, config.data.delay_s),
    images_per_step=config.data.batch_size,
    extra=jnp.zeros((), jnp.int32),
    update_extra=count_steps,
  )


def check_config(config) -> None:
  if config.train.generator_lr <= 0 or config.train.discriminator_lr <= 0:
    raise ValueError("config.train.generator_lr and discriminator_lr must be > 0")


ANIMATED: list[str] = []  # the step folders the animator was loaded from (the evaluation-during-training test)


def load_animator(path, options) -> families.Animator:
  """`mimajax evaluate` of a point GAN: the driver's frames brightened by an amount its generator's weights set."""
  from mimajax import checkpointing

  step_dir, params = checkpointing.intact_params(path, "generator")
  ANIMATED.append(step_dir.name)
  shift = int(np.round(40 * np.tanh(float(sum(np.abs(v).sum() for v in params.values())) / 100)))

  def run(source, source_row, driver, driver_rows, seed):
    return np.clip(driver.astype(np.int16) + shift, 0, 255).astype(np.uint8)

  return families.Animator(f"toy_gan ({step_dir})", 64, run)


FAMILY = families.register(
  families.Family(name="toy_gan", build_task=build_task, check_config=check_config, load_animator=load_animator)
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  return ml_collections.ConfigDict(
    dict(
      name="toy_gan",
      seed=0,
      total_steps=8,
      distributed=False,
      model=dict(family="toy_gan"),
      data=dict(batch_size=16, delay_s=0.0),
      train=dict(generator_lr=2e-3, discriminator_lr=2e-3, ema_decay=0.0, accumulation_steps=1),
      mesh=dict(data=-1, fsdp=1, tensor=1),
      checkpoint=dict(every_steps=2, keep=10, async_save=True),
      log=dict(every_steps=1, progress_bar=False),
    )
  )
