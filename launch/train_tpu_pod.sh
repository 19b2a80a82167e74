#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker (jax.distributed discovers the slice).
#   bash launch/train_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   bash launch/train_tpu_pod.sh mima-v5p-64 us-east5-a configs/sd15_stage1.py gs://bucket/runs/stage1 \
#     --config.model.attention_impl=xla --config.mesh.fsdp=4 --config.data.path=/mnt/data/vox
# Assumes the repository is checked out at ~/mimajax on every worker and `pip install -e ".[data]"` was run
# there (e.g. with: gcloud compute tpus tpu-vm ssh TPU --worker=all --command="cd mimajax && pip install -e .[data]").
# WORKDIR should be a gs:// path (Orbax writes it from every host); data should be on each worker or GCS.
# cuDNN attention is GPU-only: pass --config.model.attention_impl=xla on TPUs.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
overrides=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/mimajax && HF_HUB_OFFLINE=1 mimajax train --config $config --workdir $workdir --config.distributed=True$overrides"
