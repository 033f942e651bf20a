#!/usr/bin/env bash
# The GPU session of the Super-NaturalInstructions mixture comparison (docs/results.md, "Multi-task
# instruction tuning"): benchmarks/configs/sni_mixture.json on the real SmolLM2-135M-Instruct.
#
# The device machine has no network, so the model and the 61 BIG-bench natural_instructions task files
# travel in three calls (each call carries at most 64 MiB), each within 30 s of the last:
#   1. carry .gpu/a:             mkdir -p /tmp/stage && cp .gpu/a/part_00 /tmp/stage/
#   2. carry .gpu/bb:            bash benchmarks/experiments/gpu_sni.sh data
#   3. carry .gpu/b .gpu/whl:    bash benchmarks/experiments/gpu_sni.sh run [SECONDS] [PART]
# (.gpu/whl also holds the wheels of rouge_score 0.1.2 (`pip wheel` of its sdist), nltk and defusedxml.)
# (.gpu/a, .gpu/b, .gpu/whl from ../shared/tools/gpu-stage; .gpu/bb/ni.tar.xz is
#  `tar cf - tasks/natural_instructions__* | xz` of ~/.cache/lorite/bigbench.)
# With PART `tests` or `compile` the same call also runs that part of benchmarks/speed/gpu_jacobi.sh (issue 24)
# beside the comparison (both check values, synchronisation and graph breaks, not time; timings need an idle GPU).
# `run` again on the warm machine resumes the comparison from its finished runs (lorite compare does);
# on a cold one, the finished runs' metrics committed in docs/results/sni_mixture_runs seed it
# (gpu_experiments.sh). Everything but adapters and checkpoints comes back as $OUT/runs.tgz.
set -u
cd "$(dirname "$0")/../.."  # the repo root
# JOBS: training peaks near 10 GB a run (batch 16 × 512 tokens), but with the default CUDA allocator some
# runs held 15-30 GB after a while (blocks reserved for the many shapes of variable-length batches and
# of generation), and 10 runs filled the H200's 140 GB (2026-12-03; 4 fit). Expandable segments let the
# allocator grow and reuse one mapping instead of keeping a block per shape.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export LORITE_CACHE=/tmp/lc RUNS=/tmp/runs JOBS=${JOBS:-8} PYTHONUNBUFFERED=1
case ${1:-run} in
  data)
    mkdir -p "$LORITE_CACHE/bigbench" && tar xJf .gpu/bb/ni.tar.xz -C "$LORITE_CACHE/bigbench"
    ls "$LORITE_CACHE/bigbench/tasks" | wc -l
    ;;
  run)
    seconds=${2:-520}
    if [ ! -f /tmp/stage/converted ]; then
      cat /tmp/stage/part_00 .gpu/b/part_01 > /tmp/stage/smol.gguf \
        && (cd /tmp/stage && sha256sum -c "$OLDPWD/.gpu/b/SHA256SUMS") || exit 1
    fi
    # .gpu/whl: gguf (gpu-stage) and what the image lacks for evaluation: rouge_score, nltk, defusedxml
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
    # fail in seconds, not after the first training steps, when an evaluation dependency is missing
    python3 -c "from lorite.tasks.evaluation import rouge_l; assert rouge_l('a b c', ['a b c']) == 1.0" || exit 1
    # the default model's cache entry, converted once from the staged file (no download there)
    python3 - <<'PY' || exit 1
from pathlib import Path
from lorite.cache import cache_dir
from lorite.models.loading import DEFAULT_MODEL, _convert_gguf
target = cache_dir() / "models" / DEFAULT_MODEL
if not (target / "config.json").exists():
    _convert_gguf(Path("/tmp/stage/smol.gguf"), target)
Path("/tmp/stage/converted").touch()
print("model:", target)
PY
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    case ${3:-} in
      tests|compile) (PART=$3 OUT=$OUT/jacobi benchmarks/speed/gpu_jacobi.sh >/dev/null 2>&1 &) ;;
    esac
    mkdir -p "$RUNS"
    # memory per process every 30 s (comes back in runs.tgz): what JOBS the next session can afford
    (while sleep 30; do
       echo "$(date +%T) $(nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits | tr '\n' ' ')"
     done >>"$RUNS/gpu_memory.log" 2>&1) &
    monitor=$!
    # the time limit stops the whole process group (compare and its workers): `timeout` on the script
    # alone would wait for bash, which waits for compare, and the call would run past its own limit
    setsid benchmarks/experiments/gpu_experiments.sh sni_mixture &
    group=$!
    (sleep "$seconds" && kill -TERM -- "-$group" 2>/dev/null && echo "stopped by the time limit ($seconds s)") &
    limit=$!
    wait "$group"
    echo "compare rc=$? (it resumes from the finished runs)"
    kill "$limit" "$monitor" 2>/dev/null
    tail -n 3 "$RUNS/gpu_memory.log"
    grep -v "it/s" "$RUNS/sni_mixture.log" | tail -n 30
    case ${3:-} in
      tests) tail -n 25 "$OUT/jacobi/tests.txt" ;;
      compile) cat "$OUT/jacobi/compile_check.txt" "$OUT/jacobi/graph_check.txt" ;;
    esac
    benchmarks/experiments/gpu_progress.sh
    ;;
esac
