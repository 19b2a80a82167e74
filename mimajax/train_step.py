"""One pure, jitted training step over named parameter groups: trainable masks, AdamW, clipping, accumulation, EMA.

The state is a plain pytree (`TrainState`), donated to the step and sharded by the logical rules. It
holds named parameter groups (one for MIMAFace, a generator and a discriminator for a GAN), each with
its own optimizer state, plus the family's `extra` state (MIMAFace's identity memory bank). The step's
randomness is `fold_in(rng, step)`, so a resumed run draws exactly what an uninterrupted one would. A
non-finite loss or gradient in any group leaves the whole state unchanged and is reported in the
metrics (`finite`), so the caller can stop with the last good state in hand. So does a step whose loss
and gradients are finite but whose update is not (an overflowing learning rate or weight decay): the
step is finite only when everything it would keep is (`all_finite`), and its parameters usable
(`usable_params`: |p| <= sqrt(float max), 2^64 for float32, beyond which p^2 overflows), so every
checkpoint holds a state the next step can compute with.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mimajax.families import LossFn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar
  params: dict[str, nnx.State]  # per group: every nnx.Param of its module (trainable and frozen)
  opt_state: dict[str, Any]  # per group: optimizer state of its trainable parameters only
  rng: jax.Array  # the run's base key; step keys are fold_in(rng, step)
  extra: Any = None  # the family's own state (e.g. the identity memory bank)
  ema_params: dict[str, nnx.State] | None = None
  buffers: dict[str, nnx.State] | None = None  # per group with any: non-parameter variables (BatchNorm statistics)


def path_string(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def trainable_labels(params: nnx.State, patterns: Sequence[str]) -> nnx.State:
  """ "train" for parameters whose path ("unet/down_blocks/0/...") matches a regex in `patterns`, else "frozen"."""
  compiled = [re.compile(p) for p in patterns]
  flat = [
    (path, "train" if any(c.search(path_string(path)) for c in compiled) else "frozen")
    for path, _ in nnx.to_flat_state(params)
  ]
  if patterns and not any(label == "train" for _, label in flat):
    raise ValueError(
      f"trainable patterns {list(patterns)} match no parameter (paths look like {path_string(flat[0][0])})"
    )
  return nnx.from_flat_state(flat)


def make_optimizer(
  labels: nnx.State,
  *,
  learning_rate: float = 1e-5,
  warmup_steps: int = 0,
  weight_decay: float = 1e-2,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
  """AdamW (constant LR after optional linear warm-up) on the "train" parameters; no state for frozen ones."""
  schedule = (
    optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)], [warmup_steps]
    )
    if warmup_steps
    else optax.constant_schedule(learning_rate)
  )
  parts = ([optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []) + [
    optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  ]
  label_tree = jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, labels,
                            is_leaf=lambda x: isinstance(x, nnx.Variable))  # fmt: skip
  return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, label_tree)


def split_groups(modules: Mapping[str, nnx.Module]) -> tuple[dict, dict, dict]:
  """(graphdefs, parameters, other variables) by group."""
  graphdefs, params, rests = {}, {}, {}
  for name, module in modules.items():
    graphdefs[name], params[name], rests[name] = nnx.split(module, nnx.Param, ...)
  return graphdefs, params, rests


def carried(rests: Mapping[str, nnx.State]) -> dict[str, nnx.State]:
  """The groups whose non-parameter variables (BatchNorm statistics) change in training: the state carries them."""
  return {g: r for g, r in rests.items() if jax.tree.leaves(r)}


def all_finite(*trees) -> jax.Array:
  """Whether every floating-point leaf of `trees` is finite: one fused reduction per leaf, ANDed (a scalar bool).

  Integer leaves (optimizer counts, steps) and PRNG keys are always finite and skipped."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def param_limit(dtype) -> float:
  """The largest parameter magnitude a step accepts: sqrt of the format's max (2^64 ~ 1.8e19 for float32 and
  bfloat16), beyond which the parameter's square overflows, so every variance, norm or second moment computed
  from it (normalisation layers, weight norms, Adam's v of gradients that scale with it) is inf: such a state
  is already diverged even while finite. Trained diffusion weights are below ~1e3. Formats whose square root
  of max would be small (float16: 256) keep plain finiteness as the test."""
  info = jnp.finfo(dtype)
  return float(np.sqrt(info.max)) if info.max > 1e38 else float(info.max)


def usable_params(*trees) -> jax.Array:
  """Whether every floating-point parameter of `trees` is finite and |p| <= param_limit (NaN fails the compare):
  one fused reduction per leaf, ANDed."""
  flags = [
    (jnp.abs(x) <= param_limit(x.dtype)).all()
    for x in jax.tree.leaves(trees)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


# A prepared batch may carry, under this key, networks its losses read but never train (a perceptual loss's VGG,
# LPIPS): they pass to every micro-batch whole, where every other entry is split along its first (sample) axis.
SHARED_KEY = "shared"


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} accumulation micro-batches")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])

  return {k: split(v) for k, v in batch.items() if k != SHARED_KEY}


def _join_micro(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-micro-batch aux (leading axis n) -> one batch's: scalars averaged, arrays (per-sample) concatenated."""
  return {k: (v.mean(0) if v.ndim == 1 else v.reshape(-1, *v.shape[2:])) for k, v in aux.items()}


def make_train_step(
  graphdefs: Mapping[str, nnx.GraphDef],
  losses: Mapping[str, LossFn],
  optimizers: Mapping[str, optax.GradientTransformation],
  *,
  rests: Mapping[str, nnx.State] | None = None,
  untrained: Mapping[str, frozenset] | None = None,
  accumulation_steps: int = 1,
  ema_decay: float | None = None,
  prepare: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]] | None = None,
  update_extra: Callable[[Any, Mapping[str, dict], Mapping[str, jax.Array]], Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """(state, batch[, frozen]) -> (state, metrics); jit it with `jit_train_step`.

  Group g's gradient is that of `losses[g]` with respect to g's parameters, every group seeing the
  step's starting parameters of the others. `prepare(frozen, batch)` turns the loader's batch into the
  model's inside the step (e.g. a frozen VAE encoding frames); `frozen` is an argument, not closed over,
  so large frozen weights are sharded inputs rather than constants baked into the program. `rests`
  are the groups' non-parameter variables that are not carried in the state (empty ones).
  `untrained` holds, per group, the paths its optimizer leaves frozen: no gradient is computed for them
  (stop_gradient), so a stage that tunes a few layers does not pay for the backward pass of the rest.
  Every group's loss gets the same step key, so a discriminator judges the very samples the generator's
  loss drew. `update_extra(extra, aux by group, batch)` advances the family's extra state.
  Metrics: `loss`, `grad_norm` and the scalar aux of a single group; `<group>/...` with several.
  """
  groups = tuple(graphdefs)
  rests = dict(rests or {})

  def modules_of(params, buffers):
    # Fresh Variable objects in the current trace (tree.map rebuilds them): BatchNorm may update its statistics.
    fresh = lambda tree: jax.tree.map(lambda x: x, tree)
    return {h: nnx.merge(graphdefs[h], params[h], fresh(buffers[h]) if h in buffers else rests[h]) for h in groups}

  untrained = dict(untrained or {})

  def without_untrained_grads(group, p):
    paths = untrained.get(group)
    if not paths:
      return p
    flat = nnx.to_flat_state(p)
    return nnx.from_flat_state(
      [(path, v.replace(jax.lax.stop_gradient(v[...])) if tuple(path) in paths else v) for path, v in flat]
    )

  def grads_of(group, state, buffers, batch, rng):
    def objective(p):
      modules = modules_of({**state.params, group: without_untrained_grads(group, p)}, buffers)
      loss, aux = losses[group](modules, batch, rng, state.extra)
      new_buffers = nnx.state(modules[group], nnx.Not(nnx.Param)) if group in buffers else None
      return loss, (aux, new_buffers)

    return jax.value_and_grad(objective, has_aux=True)(state.params[group])

  def group_step(group, state, batch, rng):
    buffers = dict(state.buffers or {})
    if accumulation_steps == 1:
      (loss, (aux, new_buffers)), grads = grads_of(group, state, buffers, batch, rng)
    else:
      micro = _split_micro(batch, accumulation_steps)

      def body(carry, xs):  # the group's statistics advance micro-batch by micro-batch, as in one large batch
        i, mb = xs
        if SHARED_KEY in batch:
          mb = {**mb, SHARED_KEY: batch[SHARED_KEY]}
        total, summed, bufs = carry
        (l, (a, b)), g = grads_of(group, state, bufs, mb, jax.random.fold_in(rng, i))
        bufs = {**bufs, group: b} if b is not None else bufs
        return (total + l, jax.tree.map(jnp.add, summed, g), bufs), a

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params[group]), buffers)
      (loss, grads, buffers), auxs = jax.lax.scan(body, zeros, (jnp.arange(accumulation_steps), micro))
      loss, grads = loss / accumulation_steps, jax.tree.map(lambda g: g / accumulation_steps, grads)
      aux = _join_micro(auxs)
      new_buffers = buffers.get(group)
    updates, opt_state = optimizers[group].update(grads, state.opt_state[group], state.params[group])
    params = optax.apply_updates(state.params[group], updates)
    return loss, aux, params, opt_state, new_buffers, optax.tree.norm(grads)

  def step(state: TrainState, batch: Mapping[str, jax.Array], frozen: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if prepare is not None:
      batch = prepare(frozen, batch)
    params, opt_state, buffers, auxs, metrics = {}, {}, dict(state.buffers or {}), {}, {}
    finite = jnp.bool_(True)
    for group in groups:  # every group from the step's starting state
      loss, aux, params[group], opt_state[group], new_buffers, grad_norm = group_step(group, state, batch, rng)
      if new_buffers is not None:
        buffers[group] = new_buffers
      auxs[group] = aux
      finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      prefix = "" if len(groups) == 1 else f"{group}/"
      metrics.update({f"{prefix}{k}": v for k, v in aux.items() if jnp.ndim(v) == 0})
      metrics.update({f"{prefix}loss": loss, f"{prefix}grad_norm": grad_norm})
    extra = state.extra if update_extra is None else update_extra(state.extra, auxs, batch)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    # Finite loss and gradients can still overflow the update (learning rate x Adam step, or decoupled weight
    # decay lr * wd * p of already huge weights): the step also needs everything it would keep to be finite,
    # and its parameters within param_limit.
    finite = finite & usable_params(params, ema) & all_finite(opt_state, buffers, extra)
    # A non-finite step changes nothing: the caller stops on `finite == False` with the last good state.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new = TrainState(
      step=jnp.where(finite, state.step + 1, state.step),
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      rng=state.rng,
      extra=keep(extra, state.extra),
      ema_params=keep(ema, state.ema_params),
      buffers=keep(buffers, state.buffers) if state.buffers else None,
    )
    metrics["finite"] = finite
    return new, metrics

  return step


def jit_train_step(step_fn, state_shardings, batch_shardings, metrics_sharding, frozen_shardings=None):
  """The step compiled once with explicit shardings, the state donated; called as (state, batch, frozen)."""
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings, frozen_shardings),
    out_shardings=(state_shardings, metrics_sharding),
    donate_argnums=(0,),
  )


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises FloatingPointError naming the step and the non-finite metrics."""
  if bool(metrics["finite"]):
    return
  bad = sorted(k for k, v in metrics.items() if k != "finite" and not bool(jnp.all(jnp.isfinite(v))))
  where = bad or [
    "the updated parameters or optimizer state (loss and gradients were finite): an update overflowed or threw "
    "parameters beyond param_limit (2^64 for float32)"
  ]
  raise FloatingPointError(
    f"non-finite values at step {step} in {where}; the state was left at step {step - 1}, the last whose loss, "
    f"gradients and updated state were all finite (a diverging run: lower config.train.learning_rate)"
  )


def untrained_paths(params: nnx.State, config) -> frozenset:
  """The parameter paths a group's `families.OptimizerConfig` leaves frozen (no gradient computed for them)."""
  labels = trainable_labels(params, list(config.trainable) or [".*"])
  return frozenset(tuple(path) for path, label in nnx.to_flat_state(labels) if label == "frozen")


def make_group_optimizer(params: nnx.State, config) -> optax.GradientTransformation:
  """A group's optimizer from its `families.OptimizerConfig` (no `trainable` patterns: every parameter trains)."""
  labels = trainable_labels(params, list(config.trainable) or [".*"])
  return make_optimizer(labels, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                        weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                        max_grad_norm=config.max_grad_norm or None)  # fmt: skip
