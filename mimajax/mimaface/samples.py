"""Training samples of MIMAFace: samples/step_XXXXXXX.png, per row source | render I_R | generated | ground truth."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimajax import video_io
from mimajax.diffusion import schedulers
from mimajax.mimaface import conditioning
from mimajax.mimaface.model import MIMAFace
from mimajax.mimaface.sampling import ClipSampler, SamplerConfig

log = logging.getLogger("mimajax.train")


class SampleWriter:
  """Generates with the current parameters (the EMA copy when kept) by the sampler users animate with:
  DDIM/Euler with CFG over `config.sample.num_inference_steps`, the first frame of each clip.

  One sampler for the run: later sample steps swap in new weights of the same structure, no recompilation.
  """

  def __init__(self, config, model: MIMAFace, vae_graphdef, group: str):
    self.config = config
    self.group = group
    self.graphdef = nnx.graphdef(model)
    self.rest = nnx.state(model, nnx.Not(nnx.Param))
    self.vae_graphdef = vae_graphdef
    self.sampler = None

  def __call__(self, workdir: Path, step: int, params: dict, frozen: dict, host_batch: dict, buffers=None) -> Path:
    config = self.config
    n = min(config.sample.count, len(host_batch["identity"]))
    model = nnx.merge(self.graphdef, params[self.group], self.rest)
    vae = nnx.merge(self.vae_graphdef, frozen["vae"])
    face_model = frozen["face_model"]
    local = {k: np.asarray(v[:n]) for k, v in host_batch.items()}
    batch = conditioning.model_batch(vae, face_model, local, clip_size=config.model.clip.image_size,
                                     coefficient_dim=config.data.coefficient_dim,
                                     shading=config.data.render_shading)  # fmt: skip
    appearance = model.encode_appearance(batch["source"], batch["motion"], batch.get("face_features"))
    if self.sampler is None:
      schedule = schedulers.make_noise_schedule(**config.noise_schedule.to_dict())
      self.sampler = ClipSampler(model, schedule, SamplerConfig.from_config(config.sample))
    else:
      self.sampler.state = nnx.state(model)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(config.seed + 1), step), batch["latents"].shape)
    latents = self.sampler(context=appearance.context, render_latents=batch["render_latents"], noise=noise)
    first = (lambda x: x[:, 0]) if config.stage == 2 else (lambda x: x)  # the first frame of each clip
    size = config.data.resolution
    columns = [
      conditioning.clip_source(jnp.asarray(local["source_frame"]), size),
      conditioning.render_images(face_model, first(batch["motion"]), size, config.data.render_shading),
      conditioning.decode_frames(vae, first(latents)),
      conditioning.to_unit(jnp.asarray(first(local["frames"]))),
    ]
    grid = np.concatenate([np.concatenate(list(np.asarray(c)), axis=0) for c in columns], axis=1)
    path = Path(workdir) / "samples" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_image(path, video_io.to_uint8(grid))  # complete or not there (a full disk raises)
    log.info("samples: %s", path)
    return path
