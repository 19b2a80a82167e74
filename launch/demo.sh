#!/usr/bin/env bash
# The demo: MIMAFace end to end on this machine, on real faces, with nothing downloaded.
#   1. the demo dataset: a real talking-head clip and portraits shipped inside pip packages, motion
#      extracted offline (MediaPipe FaceMesh) and prepared into ArrayRecord shards (data_pipeline/)
#   2. `mimajax train`, tiny config: the VAE stage (the autoencoder on the dataset's frames, two identities held
#      out; L1 + LPIPS + KL), then stage 1 (images) with that VAE frozen, then stage 2 (4-frame clips, motion
#      modules, ICA) initialised from stage 1: Grain loader -> jitted, sharded step (frozen VAE + renderer, CLIP
#      + MIA + U-Net) -> Orbax checkpoints -> TensorBoard metrics and sample frames ($workdir/*/samples/); the
#      VAE's held-out reconstruction PSNR is printed (psnr=)
#   3. `mimajax animate`: the astronaut portrait driven by the talking-head clip, clip by clip with ICA
#   4. `mimajax evaluate`: the papers' metrics of the model and of the two baselines ($workdir/eval/table.md)
# Rerunning resumes each stage from its newest checkpoint; extra arguments go to stages 1 and 2,
# e.g. --config.total_steps=20 for a quick run.
set -euo pipefail
export HF_HUB_OFFLINE=1
data=${DATA:-data/demo}
workdir=${WORKDIR:-runs/tiny_demo}
if [[ ! -f $data/manifest.json ]]; then
  python -m data_pipeline.demo_data --output "$data" --resolution 64
fi
mimajax train --config configs/tiny.py:vae --workdir "$workdir/vae" --config.data.path="$data"
python -m mimajax.mimaface.vae_stage --eval "$workdir/vae" --data "$data"
mimajax train --config configs/tiny.py:1 --workdir "$workdir/stage1" --config.data.path="$data" \
  --config.model.vae_from="$workdir/vae" "$@"
mimajax train --config configs/tiny.py:2 --workdir "$workdir/stage2" --config.data.path="$data" \
  --config.train.init_from="$workdir/stage1" --config.total_steps=100 "$@"
portrait=$(python -c "from data_pipeline import demo_data; print(demo_data.portrait_path('astronaut'))")
driver=$(python -c "from data_pipeline import demo_data; print(demo_data.carphone_clip())")
mimajax animate --checkpoint "$workdir/stage2" --source "$portrait" --driving "$driver" --frames 24 --steps 10 \
  --out "$workdir/animation.mp4" --side-by-side "$workdir/animation_side_by_side.mp4"
# 4 same- and 4 cross-identity pairs of the demo data, which the model was trained on (the report says so)
mimajax evaluate --checkpoint "$workdir/stage2" --data "$data" --out "$workdir/eval" --limit 4 --frames 8 --overwrite \
  --no-progress
echo "demo: checkpoints and samples in $workdir/{vae,stage1,stage2}, video in $workdir/animation.mp4, scores in $workdir/eval"
