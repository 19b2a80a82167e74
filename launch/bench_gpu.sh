#!/usr/bin/env bash
# U-Net training-step throughput on one GPU: images/s and MFU of the SD1.5 U-Net at 512 px.
# Needs a CUDA build of JAX (pip install -U "jax[cuda12]") and, for the ratio against PyTorch,
# a CUDA build of torch with diffusers. Extra arguments go to `mimajax bench unet`.
set -euo pipefail
export HF_HUB_OFFLINE=1
mimajax bench unet --size sd15 --batch "${BATCH:-8}" --resolution 512 --bf16 --attention-impl cudnn "$@"
