#!/usr/bin/env bash
# The demo: MIMAFace end to end on this machine, on real faces, with nothing downloaded.
#   1. the demo dataset: a real talking-head clip and portraits shipped inside pip packages, motion
#      extracted offline (MediaPipe FaceMesh) and prepared into ArrayRecord shards (data_pipeline/)
#   2. `mimajax train` of the tiny config: Grain loader -> jitted, sharded step (frozen VAE + renderer,
#      CLIP + MIA + U-Net) -> Orbax checkpoints -> metrics and sample frames (runs/tiny_demo/samples/)
# Rerunning resumes from the newest checkpoint; pass overrides through, e.g. --config.total_steps=20.
set -euo pipefail
export HF_HUB_OFFLINE=1
data=${DATA:-data/demo}
workdir=${WORKDIR:-runs/tiny_demo}
if [[ ! -f $data/manifest.json ]]; then
  python -m data_pipeline.demo_data --output "$data" --resolution 64
fi
mimajax train --config configs/tiny.py --workdir "$workdir" --config.data.path="$data" "$@"
echo "demo: checkpoints in $workdir/checkpoints, samples in $workdir/samples, TensorBoard logs in $workdir"
