#!/usr/bin/env bash
# The GPU experiments of docs/results.md, in order. Each is one `lorite compare --config` command; a
# comparison that was interrupted resumes from the runs whose metrics.json exist. Runs that two configs
# share exactly (same task, optimizer label, lr, seed and training settings) are reused, not redone, and so
# are the runs committed in docs/results/NAME_runs (a fresh machine resumes where the last session stopped).
#
#   benchmarks/experiments/gpu_experiments.sh [names...]     (default: all, in the order below)
#   env: RUNS (output root, default /tmp/runs), JOBS (parallel runs, default 6), LORITE_CACHE
# JOBS: runs on the 512-token tasks (multirc, cosmosqa) peak at 6-11 GB each on SmolLM2-135M; 9 of them
# filled an 80 GB H100 and ran out of memory together (2026-11-25), 6 kept it at 100 % use with ~70 GB.
# (Each worker used to keep its largest run's cached blocks, 13.8 GB after a cosmosqa run; compare's
# workers now hand them back after every run.)
set -u
cd "$(dirname "$0")/../.."  # the repo root
RUNS=${RUNS:-/tmp/runs}
JOBS=${JOBS:-6}
mkdir -p "$RUNS"

share() {  # share FROM TO: copy the finished runs of FROM that TO would run identically
  [ -d "$RUNS/$1" ] || return 0
  (cd "$RUNS/$1" && find . -mindepth 4 -name metrics.json) | while read -r file; do
    case "$2:$file" in
      lora_rite_ablation:*/lora_rite/*) ;;
      lora_rite_ablation:*/lora_rite_reference/*) ;;
      paper_table:*) ;;
      *) continue ;;
    esac
    mkdir -p "$RUNS/$2/$(dirname "$file")"
    [ -f "$RUNS/$2/$file" ] || cp "$RUNS/$1/$file" "$RUNS/$2/$file"
  done
}

seed_from_docs() {  # seed_from_docs NAME: the finished runs committed in docs/results/NAME_runs (metrics only)
  [ -d "docs/results/$1_runs" ] || return 0
  (cd "docs/results/$1_runs" && find . -name metrics.json) | while read -r file; do
    mkdir -p "$RUNS/$1/$(dirname "$file")"
    [ -f "$RUNS/$1/$file" ] || cp "docs/results/$1_runs/$file" "$RUNS/$1/$file"
  done
}

for name in "${@:-two_tasks paper_table lora_rite_ablation lora_rite_warmup_social_iqa rank_4 rank_64 steps_128_social_iqa steps_128_strategyqa steps_128_cosmosqa rank_64_guarded rank_16_guarded init_scale}"; do
  for one in $name; do
    [ -f "$RUNS/$one/results.json" ] && continue
    seed_from_docs "$one"
    case $one in
      paper_table) ;;  # two_tasks trains longer (250 steps of 16): nothing to share
      lora_rite_ablation) share paper_table lora_rite_ablation ;;
    esac
    echo "== $one $(date +%T)"
    python3 -m lorite.cli compare --config "benchmarks/configs/$one.json" --out "$RUNS/$one" --jobs "$JOBS" \
      >"$RUNS/$one.log" 2>&1
    echo "== $one done rc=$? $(date +%T)"
  done
done
