#!/usr/bin/env bash
# Progress of benchmarks/gpu_experiments.sh, and everything but the adapters packed into $OUT.
RUNS=${RUNS:-/tmp/runs}
for d in "$RUNS"/*/; do
  [ -d "$d" ] && echo "$(basename "$d"): $(find "$d" -name metrics.json | wc -l) runs$([ -f "$d/results.json" ] && echo ', done')"
done
for log in "$RUNS"/*.log; do [ -f "$log" ] && { echo "-- $log"; grep -v "it/s" "$log" | tail -n 4; }; done
[ -n "${OUT:-}" ] && tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude=adapter --exclude=checkpoint . && ls -la "$OUT"
