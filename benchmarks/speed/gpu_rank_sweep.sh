#!/usr/bin/env bash
# The GPU session of the rank sweep (benchmarks/RESULTS.md, "LoRA-RITE at every rank"): the CUDA tests of
# LoRA-RITE, the Jacobi kernel's launch settings, then rank_sweep.py on both shapes. Results under $OUT.
# Run from the repository root on the GPU machine, with the pytorch-optimizer wheel in .whl/.
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-runs/gpu_rank_sweep}
mkdir -p "$OUT"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_rite_cuda.py tests/optim/test_jacobi.py 2>&1 | tail -15
timeout 60 python3 - <<'PY'
import torch
from lorite.optim import _jacobi
for size in (48, 64, 128):
    x = torch.randn(420, size, size + 3, device="cuda")
    V = x @ x.mT / size
    for warps in (1, 2, 4, 8):
        for sweeps in (8, 12):
            _jacobi.jacobi_eigh(V, sweeps=sweeps, num_warps=warps)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(3):
                start.record(); _jacobi.jacobi_eigh(V, sweeps=sweeps, num_warps=warps); end.record()
                torch.cuda.synchronize(); times.append(start.elapsed_time(end))
            print(f"jacobi r={size} warps={warps} sweeps={sweeps}: {sorted(times)[1]:.2f} ms", flush=True)
PY
timeout 120 python3 benchmarks/speed/rank_sweep.py --config smollm2 --ranks 16,64,128 --peer-ranks 16,64 \
    --no-whole-step --out "$OUT/smollm2_peer.json" 2>&1 | grep -E "^smollm2|^\|" | tail -20
timeout 170 python3 benchmarks/speed/rank_sweep.py --config gemma2b --ranks 4,16,64 --steps 10 \
    --out "$OUT/gemma2b_low.json" 2>&1 | grep -E "^gemma2b|^\|" | tail -20
timeout 100 python3 benchmarks/speed/rank_sweep.py --config gemma2b --ranks 8,32,128,256 --steps 5 \
    --no-whole-step --out "$OUT/gemma2b_high.json" 2>&1 | grep -E "^gemma2b|^\|" | tail -20
