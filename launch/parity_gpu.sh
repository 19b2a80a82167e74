#!/usr/bin/env bash
# End-to-end parity of the full-size MIMAFace (SD1.5 U-Net + AnimateDiff motion modules, CLIP ViT-L/14, MIA) on one
# GPU: random weights, exported to the PyTorch layout (docs/export_layout.md), then CLIP, MIA, render latents, one
# U-Net step, a 10-step DDIM loop with CFG + ICA and the decoded frames compared stage by stage; last line rel_err=,
# exit 1 above 1e-4. Needs CUDA builds of JAX (pip install -U "jax[cuda12]") and torch (with diffusers, transformers).
# fp32 matmuls on both sides: TF32 would cost more than the tolerance.
#   launch/parity_gpu.sh                      random weights
#   launch/parity_gpu.sh --pretrained runs/x  a trained checkpoint (workdir, step folder or release folder)
set -euo pipefail
export HF_HUB_OFFLINE=1
export JAX_DEFAULT_MATMUL_PRECISION=highest
export NVIDIA_TF32_OVERRIDE=0
mimajax parity --component mimaface --size sd15 "$@"
