#!/usr/bin/env bash
# Progress of benchmarks/experiments/gpu_experiments.sh, and everything but the adapters packed into $OUT.
RUNS=${RUNS:-/tmp/runs}
cd "$(dirname "$0")/../.."  # the repo root
for d in "$RUNS"/*/; do
  [ -d "$d" ] || continue
  name=$(basename "$d")
  echo "$name: $(find "$d" -name metrics.json | wc -l) runs$([ -f "$d/results.json" ] && echo ', done')"
  if [ ! -f "$d/results.json" ] && [ -f "benchmarks/configs/$name.json" ]; then  # what is left of it
    python3 -m lorite.cli compare --config "benchmarks/configs/$name.json" --out "$d" --progress | sed -n 3p
  fi
done
for log in "$RUNS"/*.log; do [ -f "$log" ] && { echo "-- $log"; grep -v "it/s" "$log" | tail -n 4; }; done
[ -n "${OUT:-}" ] && tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude=adapter --exclude=checkpoint . && ls -la "$OUT"
