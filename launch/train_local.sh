#!/usr/bin/env bash
# Train on this machine's devices (CPU, one or more GPUs, or a single TPU VM).
#   bash launch/train_local.sh CONFIG WORKDIR [--config.x=y ...]
#   bash launch/train_local.sh configs/sd15_stage1.py runs/stage1 --config.data.path=data/vox
# Rerunning the same command resumes from WORKDIR's newest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
export HF_HUB_OFFLINE=1
# Let XLA use the whole GPU memory pool (the state is donated; fragmentation is the risk, not the size).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec mimajax train --config "$config" --workdir "$workdir" "$@"
