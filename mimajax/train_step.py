"""One pure, jitted training step: trainable masks, AdamW, clipping, accumulation, EMA, identity bank.

The state is a plain pytree (`TrainState`), donated to the step and sharded by the logical rules;
the step's randomness is `fold_in(rng, step)`, so a resumed run draws exactly what an
uninterrupted one would. A non-finite loss or gradient leaves the state unchanged and is reported
in the metrics (`finite`), so the caller can stop with the last good state in hand.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mimajax.mimaface.memory_bank import MemoryBank, enqueue

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array, MemoryBank | None], tuple[jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar
  params: nnx.State  # every nnx.Param of the model (trainable and frozen)
  opt_state: Any  # optimizer state of the trainable parameters only
  rng: jax.Array  # the run's base key; step keys are fold_in(rng, step)
  bank: MemoryBank | None = None  # identity memory bank (paper variant)
  ema_params: nnx.State | None = None


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


def init_state(model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array, *, bank: MemoryBank | None = None,
               ema: bool = False) -> TrainState:  # fmt: skip
  params = nnx.state(model, nnx.Param)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=rng,
    bank=bank,
    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
  )


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} accumulation micro-batches")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])

  return {k: split(v) for k, v in batch.items()}


def make_train_step(
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  *,
  accumulation_steps: int = 1,
  ema_decay: float | None = None,
  prepare: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """(state, batch[, frozen]) -> (state, metrics); jit it with `jit_train_step`.

  `prepare(frozen, batch)` turns the loader's batch into the model's inside the step (e.g. the frozen
  VAE encoding frames and the renderer drawing I_R); `frozen` is passed as an argument, not closed
  over, so large frozen weights are sharded inputs rather than constants baked into the program.
  """

  def grads_of(params, batch, rng, bank):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch, rng, bank)

    return jax.value_and_grad(objective, has_aux=True)(params)

  def step(state: TrainState, batch: Mapping[str, jax.Array], frozen: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if prepare is not None:
      batch = prepare(frozen, batch)
    if accumulation_steps == 1:
      (loss, aux), grads = grads_of(state.params, batch, rng, state.bank)
    else:
      micro = _split_micro(batch, accumulation_steps)

      def body(carry, xs):
        i, mb = xs
        (l, a), g = grads_of(state.params, mb, jax.random.fold_in(rng, i), state.bank)
        return jax.tree.map(jnp.add, carry, (l, g)), a

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), auxs = jax.lax.scan(body, zeros, (jnp.arange(accumulation_steps), micro))
      loss, grads = loss / accumulation_steps, jax.tree.map(lambda g: g / accumulation_steps, grads)
      aux = {k: (v.reshape(-1, *v.shape[2:]) if k == "e_id" else v.mean(0)) for k, v in auxs.items()}

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bank = state.bank
    if bank is not None and "e_id" in aux and "identity" in batch:
      bank = enqueue(bank, aux["e_id"], batch["identity"])  # the global batch: every replica enqueues the same
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    # A non-finite step changes nothing: the caller stops on `finite == False` with the last good state.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new = TrainState(
      step=jnp.where(finite, state.step + 1, state.step),
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      rng=state.rng,
      bank=keep(bank, state.bank),
      ema_params=keep(ema, state.ema_params),
    )
    metrics = {k: v for k, v in aux.items() if k != "e_id" and jnp.ndim(v) == 0}
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step


def jit_train_step(step_fn, state_shardings, batch_shardings, metrics_sharding, frozen_shardings=None):
  """The step compiled once with explicit shardings, the state donated."""
  in_shardings = (state_shardings, batch_shardings)
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  return jax.jit(
    step_fn,
    in_shardings=in_shardings,
    out_shardings=(state_shardings, metrics_sharding),
    donate_argnums=(0,),
  )


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises FloatingPointError naming the step and the non-finite metrics."""
  if bool(metrics["finite"]):
    return
  bad = sorted(k for k, v in metrics.items() if k != "finite" and not bool(jnp.all(jnp.isfinite(v))))
  raise FloatingPointError(
    f"non-finite values at step {step} in {bad or ['gradients']}; the state was left at the last good step"
  )
