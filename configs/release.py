"""The release-compatible variant (the official MIMAFace PyTorch release): its post-fuse MIA, 261-wide
coefficients (with gaze), min-SNR-5 weighting; stage 2 also tunes MIA and CLIP's last two layers.

Start stage 2 from an imported release folder or train both stages:
  mimajax train --config configs/release.py:1 --workdir runs/release_stage1
  mimajax train --config configs/release.py:2 --workdir runs/release_stage2 --config.train.init_from=runs/release_stage1
"""

import ml_collections

from configs import sd15_stage1, sd15_stage2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage = int(arg or 2)
  if stage not in (1, 2):
    raise ValueError(f"configs/release.py:<stage> takes 1 or 2; got {arg!r}")
  config = (sd15_stage1 if stage == 1 else sd15_stage2).get_config("release")
  config.name = f"release_stage{stage}"
  config.model.objective.min_snr_gamma = 5.0
  return config
