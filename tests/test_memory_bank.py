"""ID-token memory bank: FIFO order, wrap-around, identity bookkeeping, jit/donation, gather over 8 devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax.mimaface.losses import identity_contrastive_loss
from mimajax.mimaface.memory_bank import MemoryBank, enqueue, init_memory_bank


def _tokens(labels, dim=3):
  """Token k is filled with its label, so slots can be read back."""
  labels = jnp.asarray(labels, jnp.int32)
  return jnp.broadcast_to(labels[:, None].astype(jnp.float32), (labels.shape[0], dim)), labels


def test_init_is_empty():
  bank = init_memory_bank(4, 3)
  assert bank.tokens.shape == (4, 3) and bank.size == 4
  assert not bank.valid.any() and int(bank.pointer) == 0 and (bank.labels == -1).all()
  with pytest.raises(ValueError, match="size"):
    init_memory_bank(0, 3)


def test_fifo_order_and_wrap_around():
  bank = init_memory_bank(4, 3)
  bank = enqueue(bank, *_tokens([10, 11, 12]))
  assert bank.labels.tolist() == [10, 11, 12, -1] and bank.valid.tolist() == [True, True, True, False]
  assert int(bank.pointer) == 3
  bank = enqueue(bank, *_tokens([13, 14]))  # wraps: slot 3, then slot 0 (the oldest) is overwritten
  assert bank.labels.tolist() == [14, 11, 12, 13] and bank.valid.all() and int(bank.pointer) == 1
  np.testing.assert_array_equal(bank.tokens[:, 0], [14, 11, 12, 13])
  bank = enqueue(bank, *_tokens([15, 16, 17]))
  assert bank.labels.tolist() == [14, 15, 16, 17] and int(bank.pointer) == 0


def test_enqueue_more_than_size_equals_sequential_writes():
  labels = [20, 21, 22, 23, 24, 25, 26]
  start = enqueue(init_memory_bank(5, 3), *_tokens([1, 2]))  # pointer 2
  at_once = enqueue(start, *_tokens(labels))
  one_by_one = start
  for label in labels:
    one_by_one = enqueue(one_by_one, *_tokens([label]))
  for a, b in zip(jax.tree.leaves(at_once), jax.tree.leaves(one_by_one)):
    np.testing.assert_array_equal(a, b)
  assert at_once.labels.tolist() == [23, 24, 25, 26, 22] and int(at_once.pointer) == 4


def test_padding_entries_are_written_invalid():
  tokens, labels = _tokens([1, 2, 3])
  bank = enqueue(init_memory_bank(4, 3), tokens, labels, valid=jnp.array([True, False, True]))
  assert bank.valid.tolist() == [True, False, True, False] and int(bank.pointer) == 3


def test_jit_with_donation_and_no_gradient_into_bank():
  step = jax.jit(enqueue, donate_argnums=0)
  bank = step(init_memory_bank(6, 3), *_tokens([1, 2, 3, 4]))
  bank = step(bank, *_tokens([5, 6, 7, 8]))
  assert isinstance(bank, MemoryBank) and bank.labels.tolist() == [7, 8, 3, 4, 5, 6]

  def loss_after_enqueue(x):
    b = enqueue(init_memory_bank(4, 3), x, jnp.arange(2))
    return jnp.sum(b.tokens)

  assert float(jnp.abs(jax.grad(loss_after_enqueue)(jnp.ones((2, 3)))).max()) == 0.0


def test_bank_feeds_identity_loss_with_its_labels():
  # An identity already in the bank becomes a positive: the loss drops when its token is enqueued.
  anchor = jnp.array([[1.0, 0.0, 0.0]])
  positive = jnp.array([[0.6, 0.8, 0.0]])
  bank = enqueue(init_memory_bank(4, 3), jnp.array([[0.0, 0.0, 1.0]]), jnp.array([9]))
  before = identity_contrastive_loss(anchor, positive, bank.tokens, bank.labels, bank.valid, jnp.array([3]))
  bank = enqueue(bank, jnp.array([[0.99, 0.1, 0.0]]), jnp.array([3]))
  after = identity_contrastive_loss(anchor, positive, bank.tokens, bank.labels, bank.valid, jnp.array([3]))
  assert float(after) < float(before)


def test_shape_errors():
  bank = init_memory_bank(4, 3)
  with pytest.raises(ValueError, match="tokens"):
    enqueue(bank, jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="labels"):
    enqueue(bank, jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))


GATHER_SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mimajax.mimaface.memory_bank import enqueue, gather_for_bank, init_memory_bank

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("data",))
  tokens = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4)  # global batch of 16, 2 per device
  labels = jnp.arange(16, dtype=jnp.int32) % 5
  expected = enqueue(enqueue(init_memory_bank(24, 4), tokens, labels), tokens + 100, labels + 10)

  for invariant in (False, True):
    def step(bank, t, l):
      t, l = gather_for_bank(t, l, "data", invariant=invariant)
      assert t.shape == (16, 4), t.shape
      return enqueue(bank, t, l)

    def two_steps(bank, t, l):
      bank = step(bank, t, l)
      bank = step(bank, t + 100, l + 10)
      # Every device's own copy, stacked on a leading axis, to check they are identical.
      return jax.tree.map(lambda x: x[None], bank)

    f = jax.jit(jax.shard_map(
      two_steps, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"), check_vma=invariant))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    bank = jax.tree.map(lambda x: put(x, P()), init_memory_bank(24, 4))
    copies = f(bank, put(tokens, P("data")), put(labels, P("data")))
    for got, want in zip(jax.tree.leaves(copies), jax.tree.leaves(expected)):
      got = np.asarray(got)
      assert got.shape[0] == 8
      for d in range(8):
        np.testing.assert_array_equal(got[d], np.asarray(want))
  print("GATHER_OK")
  """
)


def test_gather_across_8_simulated_devices_keeps_banks_replicated():
  # A fresh process: this one may already have initialised JAX with one CPU device.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, "-c", GATHER_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "GATHER_OK" in proc.stdout
