"""The CPU-sized demo experiment: every component of the real model, shrunk to run on 2 cores.

mimajax parity --component unet --size tiny
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = common.base_config("tiny", name="tiny")
  config.bench = ml_collections.ConfigDict(dict(batch=2, resolution=64))
  return config
