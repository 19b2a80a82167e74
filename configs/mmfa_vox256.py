"""MMFA at the paper's scale: face-vid2vid's vox-256 networks at 256 px, batch 32, on VoxCeleb.

  mimajax prepare --input /data/voxceleb1 --output /data/vox256 --resolution 256
  mimajax train --config configs/mmfa_vox256.py --workdir gs://bucket/runs/mmfa --config.data.path=/data/vox256 \
    [--config.model.init_from_face_vid2vid=/models/00000189-checkpoint.pth.tar] [--config.mesh.fsdp=8]
  mimajax train --config configs/mmfa_vox256.py:expression_vae --workdir gs://bucket/runs/mmfa_vae \
    --config.train.init_from=gs://bucket/runs/mmfa
  mimajax evaluate --checkpoint gs://bucket/runs/mmfa --data /data/vox256_test --pairs pairs.json   # table 1
"""

import ml_collections

from configs import mmfa


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = mmfa.base_config("vox256", name="mmfa_vox256")
  # face-vid2vid's schedule: 300 epochs of 75 repeats over VoxCeleb's ~18.5k training videos at batch 32 (about
  # 13M steps on its 8 GPUs); MMFA trained on 4 RTX 3090s and gives no step count. Ours: 1M steps.
  config.total_steps = 1_000_000
  config.data.update(resolution=256, batch_size=32, workers=8, read_threads=8)
  config.checkpoint.update(every_steps=5000, keep=3)
  config.sample.update(every_steps=5000, count=4)
  config.stage = mmfa.stage(arg)
  if config.stage == mmfa.EXPRESSION_VAE:
    config.name = "mmfa_vox256_expression_vae"
    config.total_steps = 100_000
  return config
