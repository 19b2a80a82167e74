"""Stable Diffusion 1.5 at full size (U-Net 860M, VAE 84M); what GPU users run.

mimajax parity --component unet --size sd15 [--pretrained /path/to/stable-diffusion-v1-5]
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = common.base_config("sd15", name="sd15")
  config.bench = ml_collections.ConfigDict(dict(batch=8, resolution=512))
  return config
