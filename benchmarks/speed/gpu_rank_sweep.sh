#!/usr/bin/env bash
# The GPU session of the rank sweep (benchmarks/RESULTS.md, "LoRA-RITE at every rank"): rank_sweep.py on
# both shapes at r = 4 … 256, the peer (pytorch-optimizer 4.1.0, its wheel in .whl/) at r = 16 and 64, the
# whole training step at r = 16, 64 and 256. Each segment rewrites its JSON after every rank, so one that
# runs into its time limit keeps what it measured. Results under $OUT (default runs/gpu_rank_sweep).
# Run from the repository root on the GPU machine, on an idle GPU (the timings are what it is for).
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_rank_sweep}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
sweep() {  # config seconds rank_sweep-args...
  local config=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 benchmarks/speed/rank_sweep.py --config "$config" --out "$OUT/$config.json" "$@" \
    2>&1 | tee "$OUT/$config.log" | grep -E "^$config|^\|" | tail -n 60
}
sweep smollm2 ${SMOLLM2_S:-250} --ranks 4,8,16,32,64,128,256 --peer-ranks 16,64 --whole-ranks 16,64,256 --steps 10
sweep gemma2b ${GEMMA2B_S:-250} --ranks 4,8,16,32,64,128,256 --peer-ranks 16,64 --whole-ranks 16,64,256 --steps 10
