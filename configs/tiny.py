"""The CPU-sized demo experiment: every component of the real model, shrunk to run on 2 cores.

  mimajax parity --component unet --size tiny
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.seed = 0
  config.model = common.model_config("tiny")
  config.noise_schedule = common.noise_schedule()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.unet_axis_rules = common.UNET_AXIS_RULES
  config.vae_axis_rules = common.VAE_AXIS_RULES
  config.bench = ml_collections.ConfigDict(dict(batch=2, resolution=64))
  return config
