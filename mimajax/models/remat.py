"""Rematerialisation of the U-Net's layers: recompute activations in the backward pass instead of storing them.

`set_remat(unet, policy)` marks every down/mid/up block; each resnet(+transformer, + motion module) layer
then runs under `nnx.remat` with the policy's rule for what may be saved:
  "none"           store everything (fastest, most memory)
  "full"           store nothing inside a layer: its inputs only
  "dots"           keep matmul/conv outputs, recompute norms and activations
  "dots_no_batch"  keep only matmuls without batch dimensions (weights-stationary products)
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

POLICIES: dict[str, Callable | None] = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: str | None) -> str:
  policy = policy or "none"
  if policy not in POLICIES:
    raise ValueError(f"remat policy {policy!r} unknown; expected one of {sorted(POLICIES)}")
  return policy


def set_remat(unet: nnx.Module, policy: str | None) -> None:
  """Sets the policy on every block of `unet` that has layers (a static attribute: part of the graph)."""
  policy = check_policy(policy)
  for _, module in nnx.iter_modules(unet) if hasattr(nnx, "iter_modules") else unet.iter_modules():
    if hasattr(type(module), "remat_policy"):
      module.remat_policy = policy


def call(policy: str, fn: Callable, module: nnx.Module, *args):
  """fn(module, *args), rematerialised under `policy` ("none": a plain call)."""
  if policy == "none":
    return fn(module, *args)
  return nnx.remat(fn, policy=POLICIES[policy], prevent_cse=True)(module, *args)


def bind_layer(method: Callable, j: int, **static) -> Callable:
  """module, *arrays -> method(module, j, *arrays, **static): the layer index and keywords stay Python values."""

  def layer(module, *arrays):
    return method(module, j, *arrays, **static)

  return layer
