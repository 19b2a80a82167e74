"""The ID-token memory bank M = {e_id} of the identity contrastive loss (MIMAFace, "Identity Modulation").

A fixed-size FIFO of (token, identity label, valid flag), kept as arrays in a frozen dataclass
registered as a JAX pytree. A pytree of plain arrays, rather than an nnx.Variable inside the model,
because the bank is not a parameter: it must stay out of the optimizer and the gradient, it is
replaced (not mutated) by the jitted train step, it is donated with the rest of the state, and it
is sharded like any leaf (replicated: `P()`). Orbax saves it as four arrays.

Order within a train step (as MoCo): compute the loss against the bank as it was, then
`enqueue` the batch's ID tokens, so no anchor meets itself in the bank.

Data parallelism: the bank must be the same on every device. Under `jax.jit` with shardings
(the project's train step), the batch is a global array: `enqueue(bank, tokens, labels)` with a
replicated bank makes XLA all-gather the tokens. Inside `jax.shard_map` (or `pmap`), each device
holds only its shard, so gather the global batch first and enqueue it identically everywhere:

  def step(bank, tokens, labels):  # tokens: this device's (b, D) shard
    tokens, labels = gather_for_bank(tokens, labels, "data")  # (b * n_devices, D), device order
    return enqueue(bank, tokens, labels)

  jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(), check_vma=False)

(`gather_for_bank(..., invariant=True)` keeps shard_map's replication check on; see there.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryBank:
  """FIFO of ID tokens: tokens (M, D), labels (M,) int32, valid (M,) bool, pointer () int32 (next slot)."""

  tokens: jax.Array
  labels: jax.Array
  valid: jax.Array
  pointer: jax.Array

  @property
  def size(self) -> int:
    return self.tokens.shape[0]


def init_memory_bank(size: int, dim: int, dtype=jnp.float32) -> MemoryBank:
  """An empty bank of `size` slots for `dim`-wide tokens (all invalid, pointer 0)."""
  if size < 1 or dim < 1:
    raise ValueError(f"memory bank needs size >= 1 and dim >= 1; got size={size}, dim={dim}")
  return MemoryBank(
    tokens=jnp.zeros((size, dim), dtype),
    labels=jnp.full((size,), -1, jnp.int32),
    valid=jnp.zeros((size,), bool),
    pointer=jnp.zeros((), jnp.int32),
  )


def enqueue(bank: MemoryBank, tokens: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> MemoryBank:
  """Writes (n, D) tokens and (n,) labels at the pointer, wrapping around; the oldest entries are overwritten.

  `valid` (n,) marks real entries (False for padding; they are written as invalid slots). If n
  exceeds the bank size only the last `size` entries are kept, as sequential writes would leave.
  Tokens are stored without gradient. Jittable.
  """
  size, dim = bank.tokens.shape
  if tokens.ndim != 2 or tokens.shape[1] != dim:
    raise ValueError(f"enqueue: tokens must be (n, {dim}); got shape {tokens.shape}")
  n = tokens.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"enqueue: labels must be ({n},) to match the tokens; got shape {labels.shape}")
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (n,):
    raise ValueError(f"enqueue: valid must be ({n},); got shape {valid.shape}")
  skip = max(n - size, 0)  # static: entries that later entries of the same call would overwrite
  index = (bank.pointer + jnp.arange(skip, n, dtype=jnp.int32)) % size  # distinct, so the scatter is well defined
  tokens = jax.lax.stop_gradient(tokens[skip:]).astype(bank.tokens.dtype)
  return MemoryBank(
    tokens=bank.tokens.at[index].set(tokens),
    labels=bank.labels.at[index].set(labels[skip:].astype(jnp.int32)),
    valid=bank.valid.at[index].set(valid[skip:]),
    pointer=((bank.pointer + n) % size).astype(jnp.int32),
  )


def gather_for_bank(
  tokens: jax.Array, labels: jax.Array, axis_name: str | tuple[str, ...] = "data", *, invariant: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Inside shard_map/pmap: this device's (b, D) tokens and (b,) labels -> the global batch, in device order.

  `jax.lax.all_gather` gives every device the same arrays, but shard_map's replication check
  (`check_vma`) types its result as varying, so returning the bank with `out_specs=P()` needs
  `check_vma=False`. With `invariant=True` the gather is a psum of each shard placed in a zero
  global buffer, typed replicated, so the check can stay on (an all-reduce of the global batch:
  n times the traffic of the all-gather, trivial for ID tokens).
  """
  tokens = jax.lax.stop_gradient(tokens)
  if not invariant:
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    return gather(tokens), gather(labels)
  n, index = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)

  def gather(x):
    placed = jnp.zeros((n * x.shape[0],) + x.shape[1:], x.dtype)
    return jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(placed, x, index * x.shape[0], axis=0), axis_name)

  return gather(tokens), gather(labels)
