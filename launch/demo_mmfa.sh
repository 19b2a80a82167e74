#!/usr/bin/env bash
# The MMFA demo: the keypoint GAN animator trained on the demo's real faces on this CPU, nothing downloaded.
#   1. the demo dataset (as launch/demo.sh; built once, shared)
#   2. `mimajax train --config configs/mmfa_tiny.py`: generator (appearance, canonical keypoints, head s / t,
#      expression encoder-decoder, dense motion, multi-scale generator) and discriminator, two identities held out
#   3. `mimajax animate`: the astronaut portrait driven by the talking-head clip, and an edit (yaw, then scale)
#   4. `mimajax evaluate` on the two held-out identities: the model against copy-source and copy-driver
# Rerunning resumes from the newest checkpoint; extra arguments go to the training, e.g. --config.total_steps=50.
set -euo pipefail
export HF_HUB_OFFLINE=1
data=${DATA:-data/demo}
workdir=${WORKDIR:-runs/mmfa_tiny}
if [[ ! -f $data/manifest.json ]]; then
  python -m data_pipeline.demo_data --output "$data" --resolution 64
fi
mimajax train --config configs/mmfa_tiny.py --workdir "$workdir" --config.data.path="$data" "$@"
portrait=$(python -c "from data_pipeline import demo_data; print(demo_data.portrait_path('astronaut'))")
driver=$(python -c "from data_pipeline import demo_data; print(demo_data.carphone_clip())")
mimajax animate --checkpoint "$workdir" --source "$portrait" --driving "$driver" --frames 48 \
  --out "$workdir/animation.mp4" --side-by-side "$workdir/animation_side_by_side.mp4"
mimajax animate --checkpoint "$workdir" --source "$portrait" --edit yaw=25,scale=1.15 --frames 24 \
  --out "$workdir/edit_yaw_scale.mp4"
# the identities configs/mmfa_tiny.py leaves out of training (config.data.exclude_identities)
mimajax evaluate --checkpoint "$workdir" --data "$data" --out "$workdir/eval" --identities grace_hopper,lfw_0005 \
  --frames 16 --overwrite --no-progress
echo "MMFA demo: checkpoints and samples in $workdir, videos $workdir/{animation,edit_yaw_scale}.mp4, scores in $workdir/eval"
