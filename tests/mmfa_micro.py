"""A config file for the MMFA tests: configs/mmfa_tiny.py shrunk to 32 px and a few channels, so that the family's
whole path (`mimajax train`, checkpoints, resume, evaluation, animation) runs in seconds per step on 2 cores.

  mimajax train --config tests/mmfa_micro.py --workdir DIR --config.data.path=DATA
"""

from __future__ import annotations

import ml_collections

from configs import mmfa_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = mmfa_tiny.get_config(arg)
  m = config.model
  m.num_kp, m.feature_channel = 4, 4
  m.kp_detector.update(block_expansion=4, max_features=16, scale_factor=0.5, num_blocks=2, reshape_channel=32,
                       reshape_depth=2)  # fmt: skip
  m.head_estimator.update(block_expansion=4, max_features=32, num_bottlenecks=(1, 1, 1, 1))
  m.generator.update(block_expansion=8, max_features=16, num_down_blocks=2, reshape_channel=8, reshape_depth=2,
                     num_resblocks=1)  # fmt: skip
  m.dense_motion.update(block_expansion=4, max_features=16, num_blocks=2, reshape_depth=2, compress=2)
  m.discriminator.update(block_expansion=4, max_features=16, num_blocks=2)
  m.expression.update(block_expansion=8, num_blocks=1, exp_dim=8, decoder_hidden=(16,))
  m.expression_vae.update(latent_dim=4, hidden=(16,))
  config.data.update(resolution=32, batch_size=4, read_threads=1, exclude_identities=())
  config.loss.perceptual_scales = (1.0,)  # 32 px: the AlexNet's smallest input
  config.total_steps = 6
  config.checkpoint.update(every_steps=2, keep=10)
  config.log.update(every_steps=1, progress_bar=False)
  config.sample.update(every_steps=0)
  return config
