#!/usr/bin/env bash
# GPU check of the Jacobi eigensolvers (issue 24): the CUDA tests of LoRA-RITE and of the kernels (sync-free,
# graph capture, accuracy), then linalg_primitives.py's method/warps/warm-vs-cold table. Output under $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=${JACOBI_SRC:-$PWD/src}:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_jacobi}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# PART: tests, timings (the kernels), sweep (LoRA-RITE's step at r = 16, 64), compile (compile_check.py and
# graph_check.py: torch.compile's graph breaks, compiled/graph-replayed/state_dict-rebuilt steps against
# eager ones) or all (default)
PART=${PART:-all}
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_rite_cuda.py tests/optim/test_jacobi.py \
    2>&1 | tee "$OUT/tests.txt" | tail -25
fi
if [ "$PART" = timings ] || [ "$PART" = all ]; then
  timeout 90 python3 benchmarks/speed/linalg_primitives.py --jacobi-methods 32,64,128,256 2>&1 \
    | tee "$OUT/jacobi_methods.md" | grep -v "^$"
fi
if [ "$PART" = sweep ] || [ "$PART" = all ]; then  # the step with warm-started eigendecompositions
  timeout 100 python3 benchmarks/speed/rank_sweep.py --config smollm2 --ranks 16,64 --peer-ranks 0 --steps 10 \
    --no-whole-step --out "$OUT/rank_warm.json" 2>&1 | grep -E "^smollm2|^\|" | tail -12
fi
if [ "$PART" = compile ] || [ "$PART" = all ]; then
  timeout 150 python3 benchmarks/speed/compile_check.py --device cuda --json "$OUT/compile_check.json" 2>&1 \
    | grep -E "^\||^cuda|: " | grep -v Warning | tee "$OUT/compile_check.txt"
  timeout 60 python3 benchmarks/speed/graph_check.py 2>&1 | grep "max abs diff" | tee "$OUT/graph_check.txt"
fi
