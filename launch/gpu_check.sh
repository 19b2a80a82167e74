#!/usr/bin/env bash
# One GPU check, for one H100 / H200, in under 8 minutes: every figure the project has no GPU number for, written
# to gpu_check.json. A part that fails is recorded (exit code, seconds, the end of its log) and the others still run.
#
#   bash launch/gpu_check.sh [--out gpu_check.json]      on the GPU machine
#   bash launch/gpu_check.sh --dry-run                   here, on the CPU: tiny sizes (CI runs this: tests/test_gpu_check.py)
#   bash launch/gpu_check.sh --fetch-wheels              here, with PyPI: what the GPU machine lacks, as py3.12 wheels
#
# It runs on the GPU machine as that machine is: Python 3.12 with a CUDA build of JAX, flax, optax, orbax, torch and
# transformers, no network, and none of diffusers, ml-collections, grain, array-record, clu or TensorFlow. Those
# travel as wheels in the git-ignored .whl/ (--fetch-wheels fills it here, about 10 MB; carry it with the checkout,
# and the demo data with it: DATA=data/demo512, built here by `python -m data_pipeline.demo_data --resolution 512`,
# since the motion extraction's LiteRT is not there either). Without clu / TensorFlow the loop's metrics go to
# workdir/metrics.jsonl (mimajax/training/reporting.py's PlainWriter).
# The wheels install into a private folder (--target), never over what the machine has; mimajax runs from this
# checkout (PYTHONPATH), not installed.
#
# Parts (full size / --dry-run):
#   parity_unet, parity_vae      SD1.5 U-Net / VAE, fp32, random weights, vs diffusers          rel_err
#   parity_mimaface              MIMAFace end to end vs its PyTorch export (10-step DDIM + ICA)   rel_err
#   parity_mmfa_init             face-vid2vid key map vs the PyTorch transcription               rel_err
#   bench_unet                   U-Net train step, bf16, cuDNN attention, 512 px, batch 8 vs torch: images_per_s, mfu, ratio
#   train_stage1, train_stage2   the full train step (mimajax train, sd15 configs, 512 px, bf16): images_per_s, mfu
#   bench_animate                the JAX clip sampler vs the exported PyTorch pipeline            frames_per_s, ratio
#   mmfa_frames                  MMFA generated frames/s at 256 px (mmfa_vox256)                   frames_per_s
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=gpu_check.json dry=0
# What the GPU machine lacks (its package list: the device tool's KINDS.md), at the versions CI tests here.
WHEELS=(diffusers==0.42.1 importlib-metadata ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10
        more-itertools)
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --fetch-wheels)
      mkdir -p .whl
      exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" ;;
    *) echo "gpu_check.sh: unknown option $1 (expected --dry-run, --out FILE, --fetch-wheels)" >&2; exit 2 ;;
  esac
  shift
done

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
site=""
if compgen -G ".whl/*.whl" >/dev/null && [ $dry = 0 ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || echo "gpu_check.sh: installing .whl/ failed; parts that need those packages will fail" >&2
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
logs=$(mktemp -d)
: >"$logs/parts"

# part NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $logs/NAME.log; records rc and seconds.
part() {
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s%N)
  echo "== $name: $*" >&2
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%s.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$*" >>"$logs/parts"
  [ $rc = 0 ] || echo "   $name failed (exit $rc); the end of its log is in $out" >&2
}

cli=(python3 -m mimajax.cli)
if [ $dry = 1 ]; then
  # The train parts run the loop on the tests' toy GAN family (seconds, not minutes of compiling): the dry run checks
  # this script's plumbing; the configs' own steps are tested by tests/test_train.py.
  size=tiny; res=64; batch=1; bench=(--repeats 2)
  mmfa=(--config tests/mmfa_micro.py --frames 2 --repeats 1)
  train1=(--config tests/gan_family.py) train2=(--config tests/gan_family.py --config.data.batch_size=32)
  common=(--config.total_steps=3 --config.log.every_steps=3 --config.checkpoint.every_steps=100000
          --config.log.progress_bar=False)
  half=()
else
  size=sd15; res=512; batch=${BATCH:-8}; bench=(--bf16 --attention-impl cudnn --repeats 5)
  data=${DATA:-data/demo512}
  mmfa=(--config configs/mmfa_vox256.py)
  train1=(--config configs/sd15_stage1.py --config.data.batch_size="${STAGE1_BATCH:-16}")
  train2=(--config configs/sd15_stage2.py --config.data.batch_size="${STAGE2_BATCH:-2}" --config.mesh.fsdp=1)
  half=(--config.model.dtype=bfloat16 --config.model.attention_impl=cudnn)
  [ -f "$data/manifest.json" ] || part demo_data 300 python3 -m data_pipeline.demo_data --output "$data" --resolution $res
  common=(--config.data.path="$data" --config.total_steps=30 --config.log.every_steps=10
          --config.checkpoint.every_steps=100000 --config.sample.every_steps=0 --config.log.progress_bar=False)
fi

JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 part parity_unet 240 "${cli[@]}" parity --component unet --size $size
JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 part parity_vae 240 "${cli[@]}" parity --component vae --size $size
JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 \
  part parity_mimaface 300 "${cli[@]}" parity --component mimaface --size $size
part parity_mmfa_init 120 "${cli[@]}" parity --component mmfa_init
part bench_unet 300 "${cli[@]}" bench unet --size $size --batch "$batch" --resolution $res "${bench[@]}"
part train_stage1 300 "${cli[@]}" train "${train1[@]}" --workdir "$logs/stage1" "${common[@]}" "${half[@]}"
part train_stage2 300 "${cli[@]}" train "${train2[@]}" --workdir "$logs/stage2" "${common[@]}" "${half[@]}"
part bench_animate 300 "${cli[@]}" bench animate --size $size
part mmfa_frames 300 python3 -m mimajax.mmfa.bench "${mmfa[@]}"

python3 - "$logs" "$out" "$dry" <<'PY'
"""gpu_check.json: the machine, then per part its exit code, seconds, the figures its log printed and its log's end."""
import json, re, subprocess, sys
from pathlib import Path

logs, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
KEYS = ("rel_err", "ratio", "frames_per_s", "jax_frames_per_s", "torch_frames_per_s", "images_per_s", "mfu",
        "steps_per_s")


def figures(text):
  found = {}
  for key in KEYS:  # `key=value` lines (the commands' last lines) and `key: value` / `'key': value` in metric logs
    for m in re.finditer(rf"\b{key}['\"]?\s*[=:]\s*([-+0-9.eE]+)", text):
      try:
        found[key] = float(m.group(1))  # the last one printed wins
      except ValueError:
        pass
  return found


def gpu():
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


parts = {}
for line in (logs / "parts").read_text().splitlines():
  name, rc, seconds, command = line.split("\t", 3)
  text = (logs / f"{name}.log").read_text(errors="replace") if (logs / f"{name}.log").exists() else ""
  parts[name] = {"ok": rc == "0", "exit": int(rc), "seconds": round(float(seconds), 1), "command": command,
                 "figures": figures(text), "log_tail": text[-1500:] if rc != "0" else text[-400:]}
try:
  import jax
  devices = [f"{d.platform} {getattr(d, 'device_kind', '')}" for d in jax.devices()]
except Exception as e:  # noqa: BLE001
  devices = [f"jax unavailable: {e}"]
report = {"dry_run": dry, "gpu": gpu(), "jax_devices": devices, "parts": parts,
          "failed": sorted(n for n, p in parts.items() if not p["ok"])}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}: {len(parts) - len(report['failed'])} of {len(parts)} parts ok; failed: {report['failed'] or 'none'}")
PY
rm -rf "$logs" ${site:+"$site"}
