"""The expression VAE stage of `mimajax train` (sec. 3.3-3.4): trained after the animator, on its frozen expression
encoder's codes f_exp of the dataset's frames.

  config.stage = "expression_vae", config.train.init_from = the trained animator (workdir or step folder)

Groups: "expression_vae" (eq. 10-12) and "expression_discriminator" (eq. 13's adversarial term), each with its own
Adam (config.expression_vae.learning_rate). Frozen: the animator's expression encoder (parameters and BatchNorm
statistics, eval mode), run in `prepare` on each pair's two frames, so a batch of N pairs gives 2N codes. Extra
state: the step count, for the KL warm-up.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax import checkpointing, families
from mimajax.convert.state_dict import merge_params
from mimajax.mmfa import expression_vae, objective
from mimajax.mmfa.data import data_iterator
from mimajax.mmfa.model import MMFA, images

VAE, CRITIC = "expression_vae", "expression_discriminator"


def check_config(config) -> None:
  src = config.train.init_from
  if not src:
    raise ValueError("config.train.init_from must name the trained MMFA animator (workdir or step folder) whose "
                     "expression encoder the expression VAE learns the codes of")  # fmt: skip
  if not Path(src).exists():
    raise ValueError(f"config.train.init_from={src} does not exist")
  if checkpointing.recorded_family(src) != "mmfa":
    raise ValueError(f"config.train.init_from={src} is not an MMFA training workdir or step folder")


def frozen_encoder(path: str | Path):
  """The animator's expression encoder (eval mode) from its checkpoint: parameters + BatchNorm statistics."""
  path = Path(path)
  workdir = path if (path / checkpointing.CONFIG_FILE).is_file() else path.parent.parent
  config = checkpointing.read_config(workdir)
  _, flat = checkpointing.intact_params(path, "generator", buffers=True)
  model = merge_params(nnx.eval_shape(lambda: MMFA(config.model, rngs=nnx.Rngs(0))), flat,
                       where=f"the MMFA generator of {path}")  # fmt: skip
  encoder = model.expression_encoder
  encoder.eval()
  return encoder, config


def build_vae(config, *, rngs: nnx.Rngs) -> expression_vae.ExpressionVAE:
  v = config.model.expression_vae
  return expression_vae.ExpressionVAE(config.model.expression.exp_dim, v.latent_dim, tuple(v.hidden), rngs=rngs)


def build_task(config, workdir: Path) -> families.Task:
  del workdir
  encoder, animator_config = frozen_encoder(config.train.init_from)
  ours, theirs = config.model.expression.to_dict(), animator_config.model.expression.to_dict()
  if ours != theirs:
    raise ValueError(f"config.model.expression {ours} differs from the animator's ({config.train.init_from}): {theirs}")
  graphdef = nnx.graphdef(encoder)
  rngs = nnx.Rngs(config.seed)
  v = config.model.expression_vae
  modules = {VAE: build_vae(config, rngs=rngs),
             CRITIC: expression_vae.ExpressionDiscriminator(config.model.expression.exp_dim, tuple(v.hidden),
                                                            rngs=rngs)}  # fmt: skip
  e = config.expression_vae
  weights = expression_vae.VAEWeights(reconstruction=e.reconstruction, kl=e.kl, adversarial=e.adversarial)

  def prepare(frozen, batch):
    enc = nnx.merge(graphdef, frozen["encoder"])
    frames = jnp.concatenate([images(batch["frames"]), images(batch["source_frame"])])
    return {"f_exp": jax.lax.stop_gradient(enc(frames))}

  def vae_loss(modules, batch, rng, extra):
    out = modules[VAE](batch["f_exp"], rng)
    fake = modules[CRITIC](out["reconstruction"])
    scale = expression_vae.kl_warmup(extra["step"], e.kl_warmup_steps)
    total, terms = expression_vae.vae_loss(batch["f_exp"], out, fake, weights=weights, kl_scale=scale)
    return total, {**terms, "kl_scale": scale, "code_std": jnp.mean(jnp.std(batch["f_exp"], axis=0))}

  def critic_loss(modules, batch, rng, extra):
    del extra
    out = modules[VAE](batch["f_exp"], rng)  # the same key: the very codes the VAE's loss drew
    real = modules[CRITIC](batch["f_exp"])
    fake = modules[CRITIC](jax.lax.stop_gradient(out["reconstruction"]))
    return expression_vae.vae_discriminator_loss(real, fake), {"real": jnp.mean(real), "fake": jnp.mean(fake)}

  rules = tuple(tuple(r) for r in config.axis_rules)
  opt = objective.optimizer(config, e.learning_rate)
  return families.Task(
    modules=modules,
    losses={VAE: vae_loss, CRITIC: critic_loss},
    optimizers={VAE: opt, CRITIC: opt},
    axis_rules={VAE: rules, CRITIC: rules},
    iterator=data_iterator(config),
    images_per_step=2 * config.data.batch_size,
    batch_keys=("frames", "source_frame"),
    frozen={"encoder": nnx.state(encoder)},
    frozen_rules={"encoder": None},
    prepare=prepare,
    extra={"step": jnp.zeros((), jnp.int32)},
    update_extra=lambda extra, aux, batch: {"step": extra["step"] + 1},
  )


def load(path: str | Path) -> expression_vae.ExpressionVAE:
  """A trained expression VAE from its stage's workdir or step folder."""
  path = Path(path)
  workdir = path if (path / checkpointing.CONFIG_FILE).is_file() else path.parent.parent
  if checkpointing.recorded_family(path) != "mmfa":
    raise ValueError(f"--expression-vae {path}: not an MMFA expression-VAE workdir or step folder")
  config = checkpointing.read_config(workdir)
  if config.get("stage") != "expression_vae":
    raise ValueError(f"--expression-vae {path}: a run of stage {config.get('stage')!r}, not 'expression_vae'")
  _, flat = checkpointing.intact_params(path, VAE)
  return merge_params(nnx.eval_shape(lambda: build_vae(config, rngs=nnx.Rngs(0))), flat, where=f"the VAE of {path}")
