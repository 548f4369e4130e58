#!/usr/bin/env bash
# Train the shapes-world autoencoder (configs/vae/shapes-f8.yaml) from scratch, reproducibly:
# make the data, train, and print the held-out PSNR/SSIM and the wall time.
#   scripts/train_vae_shapes.sh [OUT] [extra key=value overrides...]
set -euo pipefail
OUT=${1:-runs/vae-shapes-f8}; shift || true
DATA=${DATA:-runs/data}
[ -f "$DATA/shapes-train/metadata.jsonl" ] || ldm-shapes make --out "$DATA/shapes-train" --num 20000 --size 64 --seed 0
[ -f "$DATA/shapes-val/metadata.jsonl" ] || ldm-shapes make --out "$DATA/shapes-val" --num 512 --size 64 --seed 1
start=$(date +%s)
ldm-train-vae --config configs/vae/shapes-f8.yaml --data "$DATA/shapes-train" --output-dir "$OUT" --resume latest \
  data.validation_path="$DATA/shapes-val" "$@"
end=$(date +%s)
echo "wall time: $((end - start)) s on $(getconf _NPROCESSORS_ONLN) CPU cores ($(python -c 'import torch; print(torch.get_num_threads())') torch threads)"
cat "$OUT/validation.json"
