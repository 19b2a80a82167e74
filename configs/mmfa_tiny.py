"""MMFA at CPU size: every module of the vox-256 model, shrunk to train on the demo data on 2 cores.

mimajax train --config configs/mmfa_tiny.py --workdir runs/mmfa_tiny
mimajax train --config configs/mmfa_tiny.py:expression_vae --workdir runs/mmfa_tiny_vae \
  --config.train.init_from=runs/mmfa_tiny
"""

import ml_collections

from configs import mmfa


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "animator" (default) or "expression_vae" (the expression VAE on a trained animator's f_exp)."""
  config = mmfa.base_config("tiny", name="mmfa_tiny")
  # Two identities are never trained on, so `mimajax evaluate` scores held-out faces (as the VAE stage of the
  # MIMAFace demo holds them out).
  config.data.update(resolution=64, batch_size=8, read_threads=2, exclude_identities=("grace_hopper", "lfw_0005"))
  # LPIPS's AlexNet for the perceptual pyramid (about 1/25 of VGG-16's FLOPs; the tiny config's choice), at 64 and
  # 32 px (its smallest input)
  config.loss.update(perceptual_network="lpips_alex", perceptual_scales=(1.0, 0.5))
  config.total_steps = 600
  config.checkpoint.update(every_steps=200, keep=2)
  config.log.update(every_steps=20)
  config.sample.update(every_steps=200, count=4)
  config.stage = mmfa.stage(arg)
  if config.stage == mmfa.EXPRESSION_VAE:
    config.name = "mmfa_tiny_expression_vae"
    config.total_steps = 300
    config.expression_vae.kl_warmup_steps = 100
    config.checkpoint.update(every_steps=150)
  return config
