#!/usr/bin/env bash
# Stage-1 and stage-2 training throughput on the GPUs of this machine: images/s and MFU of the full
# train step (VAE encoding + rendering + CLIP/MIA + U-Net forward/backward + AdamW), SD1.5 size at 512 px,
# bf16 compute, cuDNN attention, random weights (throughput does not depend on them), the demo faces.
# Needs a CUDA build of JAX (pip install -U "jax[cuda12]"). The last logged line of each stage has
# images_per_s and mfu (FLOPs from XLA's cost analysis of the compiled step / dense bf16 peak).
#   bash launch/bench_train_gpu.sh [STAGE1_BATCH] [STAGE2_BATCH]
set -euo pipefail
export HF_HUB_OFFLINE=1
b1=${1:-16} b2=${2:-2}
data=${DATA:-data/demo512}
[[ -f $data/manifest.json ]] || python -m data_pipeline.demo_data --output "$data" --resolution 512
common=(--config.data.path="$data" --config.total_steps=40 --config.log.every_steps=10
        --config.checkpoint.every_steps=100000 --config.sample.every_steps=0 --config.log.progress_bar=False)
tmp=$(mktemp -d)
echo "== stage 1: global batch $b1 images"
mimajax train --config configs/sd15_stage1.py --workdir "$tmp/s1" --config.data.batch_size="$b1" "${common[@]}" 2>&1 \
  | grep -E "images_per_s|Error" | tail -2
echo "== stage 2: global batch $b2 clips x 16 frames"
mimajax train --config configs/sd15_stage2.py --workdir "$tmp/s2" --config.data.batch_size="$b2" \
  --config.mesh.fsdp=1 "${common[@]}" 2>&1 | grep -E "images_per_s|Error" | tail -2
rm -rf "$tmp"
