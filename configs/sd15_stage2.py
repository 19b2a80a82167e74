"""MIMAFace stage 2 at full size: the stage-1 model plus AnimateDiff v3 motion modules on 16-frame clips with ICA.

Freezes the stage-1 weights and trains W_cond (the conv_in conditioning channels) and the motion modules.
  --config.train.init_from=runs/stage1                             (a stage-1 workdir or checkpoint step folder)
  --config.model.motion_pretrained=/models/v3_sd15_mm.ckpt          (AnimateDiff v3 .ckpt or MotionAdapter folder)
  --config.model.pretrained=/models/stable-diffusion-v1-5           (for the frozen VAE)

  mimajax train --config configs/sd15_stage2.py --workdir runs/stage2 --config.train.init_from=runs/stage1
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "release" for the release variant (which also tunes MIA and CLIP's last two layers)."""
  variant = arg or "paper"
  config = common.sd15_training_config(2, variant)
  config.data.update(num_frames=12, stride=1, batch_size=8)  # the paper (sec. 4.1): 12-frame clips, batch 8
  config.total_steps = 30_000
  config.checkpoint.update(every_steps=500, keep=3)
  config.log.update(every_steps=25)
  config.sample.update(every_steps=2500, count=2, num_inference_steps=25)
  # Video activations dominate: shard parameters and optimizer state (FSDP) across each node's GPUs.
  config.mesh.update(data=-1, fsdp=8, tensor=1)
  return config
