#!/usr/bin/env bash
# The demo at this stage of mimajax: every model component (schedulers, VAE, U-Net, CLIP, video U-Net) loaded
# from diffusers-format folders and checked against PyTorch, then one timed training step.
# Later stages grow this into the full MIMAFace pipeline (prepare -> train -> animate).
set -euo pipefail
export HF_HUB_OFFLINE=1
for component in scheduler vae unet clip motion; do
  mimajax parity --component "$component" --size tiny
done
mimajax bench unet --size tiny --batch 2 --resolution 128 --repeats 3
