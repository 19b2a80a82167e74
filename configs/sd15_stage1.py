"""MIMAFace stage 1 at full size (paper, section 4.1): SD1.5 U-Net + CLIP ViT-L/14 + MIA on single frames, 512 px.

Trains the U-Net, the appearance encoder and MIA (the paper's stage 1) with AdamW at a constant 1e-5.
Weights come from local folders (nothing is downloaded):
  --config.model.pretrained=/models/stable-diffusion-v1-5        (diffusers pipeline: unet/, vae/)
  --config.model.clip_pretrained=/models/clip-vit-large-patch14  (transformers CLIP)
  --config.data.path=/data/voxceleb2_mima                         (`mimajax prepare` output)

  mimajax train --config configs/sd15_stage1.py --workdir gs://bucket/runs/stage1 --config.mesh.fsdp=8
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "release" for the release variant (its post-fuse MIA), default the paper's."""
  variant = arg or "paper"
  config = common.sd15_training_config(1, variant)
  config.data.batch_size = 32  # the paper (sec. 4.1): batch 32, 30k steps at a constant 1e-5
  config.total_steps = 30_000
  config.checkpoint.update(every_steps=1000, keep=3)
  config.log.update(every_steps=50)
  config.sample.update(every_steps=2500, count=4, num_inference_steps=25)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config
