#!/usr/bin/env bash
# Issue 8's GPU figures in ONE call of the device tool (about 9 minutes of a 15-minute lease on an
# H200), in order of importance, each under its own time limit so that a slow case cannot take the
# next ones with it, and each writing its log as it goes.
#
# The device image has torch, transformers, accelerate and safetensors but not diffusers, and it
# cannot download: carry diffusers as a wheel. Here, once:
#     pip download --no-deps -d .wheels diffusers==0.42.1 && echo /.wheels/ >> .git/info/exclude
# Then the device tool's run: command "bash scripts/gpu_checks.sh", carry [".wheels"], timeout_s 600.
# The logs (and JSON rows) come back from $OUT: at most 8 files, so keep this list short.
#   1. sampling, SD 1.5 architecture, 512 px fp16, batch 1 and 8, with --compile (CUDA graphs):
#      the ≥ 1.5× and ≥ 70 guided steps/s goals
#   2. U-Net training at 256 px in bf16: the cache ratio, gradient checkpointing, MFU
#   3. VAE decoding at 512-2048 px, fp16: tiled decoding's memory
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-index -q .wheels/*.whl 2>&1 | tail -2
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/versions.txt"

run() {  # run NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log, one status line here
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit)"
  grep -E "^(summary|reference):" "$OUT/$name.log" || tail -3 "$OUT/$name.log"
}

run sampling-compile 240 python3 scripts/bench_sampling.py --case gpu --compile --json "$OUT/sampling-compile.json"
run training 230 python3 scripts/bench_training.py --case gpu --steps 40 --json "$OUT/training.json"
run vae-decode 90 python3 scripts/bench_vae_decode.py --device cuda --dtype fp16 --sizes 512 1024 2048 --whole-up-to 1024
