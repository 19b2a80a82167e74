"""The release-compatible variant (the official MIMAFace PyTorch release): its post-fuse MIA, 261-wide
coefficients (with gaze), min-SNR-5 weighting, its batch-level CFG dropout, ICA k distribution, stage-1 clean
conditioning and source-blended coefficients, and its Euler sampler; stage 2 also tunes MIA and CLIP's last two layers.

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
  # How the release trains (train_image.py / train_video.py), each differing from the paper's config:
  config.model.objective.update(
    min_snr_gamma=5.0,  # --snr_gamma 5
    cfg_dropout_scope="batch",  # `if random.random() < 0.1: object_hidden_states = zeros` for the whole batch
    ica_schedule="release",  # prev_frame_num = randint(1, 4) half the steps, else 0
    clean_condition_prob=0.01 if stage == 1 else 0.0,  # stage 1: the clean target latents with mask 1, 1% of steps
  )
  config.data.blend_source = True  # coeffBlendSrcRef: source identity/texture/light + target expression/pose/gaze
  # infer_video.py: EulerDiscreteScheduler (linspace from SD1.5's config), 25 steps, guidance 5.0
  config.sample.update(scheduler="euler", num_inference_steps=25, guidance_scale=5.0, timestep_spacing="linspace")
  return config
