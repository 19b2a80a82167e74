"""The CPU-sized demo experiment: every component of the real model, shrunk to run on 2 cores.

python -m data_pipeline.demo_data --output data/demo
mimajax train --config configs/tiny.py --workdir runs/tiny [--config.total_steps=6]
mimajax parity --component unet --size tiny
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "1" (default, images), "2" (clips with motion modules) or "vae" (the VAE they freeze), e.g.
  --config configs/tiny.py:2."""
  if arg == "vae":
    return vae_config()
  stage = int(arg or 1)
  config = common.base_config("tiny", name=f"tiny_stage{stage}", stage=stage)
  # A 3-level VAE (4x downsampling, SD's is 8x): 64 px frames -> 16x16 latents, the tiny U-Net's sample size.
  config.model.vae.block_out_channels = (32, 64, 64)
  config.data.update(resolution=64, batch_size=4, num_frames=1 if stage == 1 else 4, read_threads=2)
  config.total_steps = 400
  config.train.update(learning_rate=1e-4, memory_bank_size=64)
  config.checkpoint.update(every_steps=100, keep=2)
  config.log.update(every_steps=10)
  config.sample.update(every_steps=200, count=4, num_inference_steps=10)
  config.bench = ml_collections.ConfigDict(dict(batch=2, resolution=64))
  return config


def vae_config() -> ml_collections.ConfigDict:
  """The tiny VAE stage: the demo's autoencoder (the VAE of stages 1 and 2), sized for a few CPU minutes."""
  config = common.vae_stage_config("tiny")
  config.name = "tiny_vae"
  config.model.vae.block_out_channels = (32, 64, 64)  # as stages 1 and 2 (see get_config)
  # grace_hopper and lfw_0005 (one colour portrait, one grey LFW face: 96 frames) are never trained on: the
  # held-out PSNR is measured on them.
  config.data.update(resolution=64, batch_size=8, read_threads=2, exclude_identities=("grace_hopper", "lfw_0005"))
  config.total_steps = 400
  config.train.update(learning_rate=1e-3, warmup_steps=20)
  config.checkpoint.update(every_steps=200, keep=2)
  config.log.update(every_steps=20)
  config.sample.update(every_steps=200, count=4)
  return config
