"""Stable Diffusion 1.5 at full size (U-Net 860M, VAE 84M); what GPU users run.

  mimajax parity --component unet --size sd15 [--pretrained /path/to/stable-diffusion-v1-5]
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.name = "sd15"
  config.seed = 0
  config.model = common.model_config("sd15")
  config.noise_schedule = common.noise_schedule()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.unet_axis_rules = common.UNET_AXIS_RULES
  config.vae_axis_rules = common.VAE_AXIS_RULES
  config.bench = ml_collections.ConfigDict(dict(batch=8, resolution=512))
  return config
