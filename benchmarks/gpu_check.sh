#!/usr/bin/env bash
# One-shot device script (see README "Benchmarks"): GPU benchmarks + a CUDA smoke run of the demo.
# Expects pure-python wheels for the packages the device image lacks under .whl/.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm, diffusers, webdataset; print('torch', torch.__version__, 'timm', timm.__version__, 'diffusers', diffusers.__version__)"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -5   # the CUDA-only tests (fp16 decode vs the bar)
python3 benchmarks/bench_codecs.py --device cuda > /dev/null 2>&1 && cp benchmarks/results/codecs-cuda.* "$OUT"/   # decode images/s on the GPU
python3 benchmarks/bench_train.py --device cuda --model SiT-XL/2 --batch 32 --reps 10 --loader-samples 256 --out "$OUT/train-cuda-xl2.json"
python3 benchmarks/bench_train.py --device cuda --model SiT-B/2 --batch 64 --reps 10 --loader-samples 256 --out "$OUT/train-cuda-b2.json"
python3 benchmarks/bench_train.py --device cuda --model MMDiT-24/2 --batch 32 --reps 10 --loader-samples 256 --out "$OUT/train-cuda-mmdit24.json"
python3 benchmarks/bench_preprocess.py --device cuda --images 128 384 --batch 64 --workers 8 --precision bf16 --out "$OUT/preprocess-cuda.json"
[ "${SMOKE:-1}" = 1 ] || exit 0
python3 -m stages.cli preprocess --config configs/demo.yaml --set out=/tmp/democache --set device=cuda > /dev/null \
  && python3 -m stages.cli train --config configs/demo.yaml --set data.cache=/tmp/democache --set run_dir=/tmp/demorun \
     --set device=cuda --set precision=bf16 --set total_steps=80 --set align.stop_step=40 2>&1 | grep -E "phase|Error" | tail -6
