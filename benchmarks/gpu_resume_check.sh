#!/usr/bin/env bash
# Device check: preprocess benchmark, then a CUDA bf16 train that is resumed across tau, compared
# with an uninterrupted run (CUDA RNG state, pinned memory, on-device NaN reduction exercised).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 benchmarks/bench_preprocess.py --device cuda --images 128 384 --batch 64 --workers 8 --precision bf16 --out "$OUT/preprocess-cuda.json"
python3 -m stages.cli preprocess --config configs/demo.yaml --set out=/tmp/dc --set device=cuda > /dev/null 2>&1 || exit 1
A="--config configs/demo.yaml --set data.cache=/tmp/dc --set device=cuda --set precision=bf16 --set align.stop_step=20 --set ckpt_every=10 --set log_every=10 --set sample_every=1000"
python3 -m stages.cli train $A --set run_dir=/tmp/ra --set total_steps=30 2>&1 | tail -1
python3 -m stages.cli train $A --set run_dir=/tmp/rb --set total_steps=10 2>&1 | tail -1
python3 -m stages.cli train $A --set run_dir=/tmp/rb --set total_steps=30 2>&1 | grep -E "resumed|phase II|Error" | head -3
python3 - <<'PY'
import torch
a = torch.load("/tmp/ra/checkpoints/step-0000030.pt", weights_only=True)
b = torch.load("/tmp/rb/checkpoints/step-0000030.pt", weights_only=True)
for part in ("model", "ema"):
    d = max((a[part][k].float() - b[part][k].float()).abs().max().item() for k in a[part])
    print(f"resumed vs uninterrupted, {part}: max abs diff {d:.3e}")
PY
