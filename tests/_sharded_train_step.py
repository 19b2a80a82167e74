"""Run as a script with 8 simulated CPU devices: the sharded MIMAFace step vs the single-device step (JSON out)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_mimaface import _batch  # noqa: E402

from configs import tiny  # noqa: E402
from mimajax import families, sharding, train, train_step  # noqa: E402
from mimajax.diffusion import schedulers  # noqa: E402
from mimajax.mimaface import factory as mimaface_factory  # noqa: E402
from mimajax.mimaface import family  # noqa: E402
from mimajax.mimaface.memory_bank import init_memory_bank  # noqa: E402
from mimajax.mimaface.model import training_loss  # noqa: E402


def run(mesh_shape, devices):
  config = tiny.get_config()
  config.model.attention_impl = "xla"
  model = mimaface_factory.build_mimaface(config.model, stage=1, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(mesh_shape, devices)
  schedule = schedulers.make_noise_schedule()
  loss_fn = lambda mods, b, r, bank: training_loss(mods["model"], b, r, schedule, bank)
  # The MIMAFace task as the family builds it (its axis rules and bank update), on a synthetic batch.
  task = families.Task(
    modules={"model": model},
    losses={"model": loss_fn},
    optimizers={"model": families.OptimizerConfig(learning_rate=1e-3, trainable=("^unet/", "^mia/", "^clip/"))},
    axis_rules={"model": family.axis_rules(config)},
    iterator=None,
    images_per_step=8,
    extra=init_memory_bank(16, config.model.clip.hidden_size),
    update_extra=family.update_memory_bank,
  )
  graphdefs, params, rests = train_step.split_groups(task.modules)
  optimizers = {"model": train_step.make_group_optimizer(params["model"], task.optimizers["model"])}
  # The training loop's own layout: parameters by the rules, moments like the parameters.
  state = train.init_sharded_state(task, optimizers, jax.random.key(0), mesh)
  step = train_step.make_train_step(graphdefs, task.losses, optimizers, rests=rests, update_extra=task.update_extra)
  state_sh = train.shardings_of(state)
  batch = _batch(model, b=8)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  metrics_sh = sharding.replicated(mesh)
  jitted = train_step.jit_train_step(step, state_sh, batch_sh, metrics_sh)
  batch = jax.device_put(batch, batch_sh)
  for _ in range(2):
    state, metrics = jitted(state, batch, None)
  flat = {train_step.path_string(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params["model"])}
  specs = {train_step.path_string(p): str(v[...].sharding.spec) for p, v in nnx.to_flat_state(state.params["model"])}
  # Adam's first moments of the trainable parameters must be laid out like the parameters themselves.
  mu = state.opt_state["model"].inner_states["train"].inner_state[1][0].mu
  moment_specs = {train_step.path_string(p): str(v[...].sharding.spec) for p, v in nnx.to_flat_state(mu)
                  if hasattr(v[...], "sharding")}  # fmt: skip
  specs_match = all(moment_specs[k] == specs[k] for k in moment_specs) and len(moment_specs) > 100
  return flat, specs, float(metrics["loss"]), np.asarray(state.extra.tokens), specs_match


if __name__ == "__main__":
  devices = jax.devices()
  assert len(devices) == 8, devices
  single, _, loss1, bank1, _ = run({"data": 1}, devices[:1])
  sharded, specs, loss8, bank8, moments_like_params = run({"data": 4, "fsdp": 2}, devices)
  keys = sorted(single)
  diff = np.sqrt(sum(float(np.sum((sharded[k] - single[k]) ** 2)) for k in keys))
  rel = diff / np.sqrt(sum(float(np.sum(single[k] ** 2)) for k in keys))
  # Attention key biases have an exactly-zero true gradient (softmax is invariant to a per-row shift), so
  # Adam turns their rounding noise into lr-sized steps of either sign: per tensor they are not comparable.
  shift_invariant = ("to_k/bias", "c_qkv/bias")
  per_tensor = {
    k: float(np.linalg.norm(sharded[k] - single[k]) / max(np.linalg.norm(single[k]), 1e-12))
    for k in keys
    if not k.endswith(shift_invariant)
  }
  bank_rel = float(np.linalg.norm(bank8 - bank1) / np.linalg.norm(bank1))
  worst = max(per_tensor, key=per_tensor.get)
  result = {"param_rel_err": rel, "max_tensor_rel_err": per_tensor[worst], "worst_tensor": worst,
            "moments_like_params": moments_like_params}  # fmt: skip
  print(json.dumps({**result, "loss_single": loss1, "loss_sharded": loss8, "bank_rel_err": bank_rel,
                    "specs": specs}))  # fmt: skip
