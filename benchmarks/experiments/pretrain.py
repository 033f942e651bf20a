"""GPU experiment (issue 7): pre-train the 60M LLaMA with full-rank AdamW, GaLore and Fira — the same
data, token budget, batch and schedule — and compare validation perplexity, optimizer-state memory and
step time. Runs are independent processes sharing one GPU (started together, so timings are shared-GPU
timings).

Setup (GaLore arXiv 2403.03507 Table 2 / Fira arXiv 2410.01623 App. B.1, scaled down):
  * model: ``60m`` (hidden 512, FFN 1376, 8 layers, 8 heads; 75.6M parameters with the 49,152-token
    SmolLM2 vocabulary), random init, seed 0;
  * data: the shared token cache (public-domain English — Shakespeare, KJV Bible, Austen, Webster 1913 —
    plus the CPython standard library; 256-token blocks; 10.0M training tokens; held-out documents);
  * batch 128 blocks = 32,768 tokens per step (micro-batch 32 × 4 accumulation), ``--tokens`` 32.8M
    (1000 steps, ~3.3 epochs), 10% warmup then cosine to 10%, bf16 autocast, no weight decay, no clipping;
  * GaLore / Fira: rank 128, update_proj_gap 200, scale (α) 0.25, lr 0.01 on attention/MLP matrices
    (the spec's 60M setting; embeddings, head and norms get AdamW at the same lr), as in both papers;
  * full-rank AdamW: lr 1e-3 (``--adamw-lrs 1e-3,3e-3`` adds a second learning rate as a 4th process).

Time: measured 70k tokens/s per run with three runs sharing an H100 that also ran fine-tuning jobs
(32.8M tokens ≈ 8 min), 126k tokens/s with two; every run also stops itself after ``--time-limit``
seconds of training (default 1000; then evaluates and saves), and this script stops waiting at
``--deadline`` (default 1150). Results are rewritten every ~20 s, so a
time-out still leaves the curves so far.

    python benchmarks/experiments/pretrain.py --out runs/exp_pretrain            # GPU, ~9 min
    python benchmarks/experiments/pretrain.py --out /tmp/exp_pretrain_quick --quick   # CPU smoke test, ~1-2 min

Writes into ``--out``: ``runs/<name>/`` (each run's metrics.json, log, model), ``results.json``,
``validation_ppl.png``, ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    Job,
    atomic_write_text,
    fmt,
    fresh_output_dir,
    markdown_table,
    pyplot,
    read_json,
    run_jobs,
    save_figure,
    worker_command,
    write_json,
)

from lorite.cache import cache_dir
from lorite.data.blocks import build_token_cache
from lorite.models.llama import pretraining_tokenizer
from lorite.train.pretrain import PretrainConfig, pretrain, resolve_data

PAPER_60M_C4 = {"fira_adamw": 31.06, "galore_adamw": 34.88, "adamw": 34.06}  # Fira Table 3, 1.1B tokens
LOWRANK = {"rank": 128, "update_proj_gap": 200}


def run_settings(args) -> list[tuple[str, dict]]:
    """``(name, PretrainConfig fields)`` of every run."""
    if args.quick:
        common = dict(
            size="tiny", tokens=256 * 4 * 8, batch_size=4, grad_accum=1, eval_every=4, eval_blocks=4,
            eval_batch_size=4, device="cpu", log_every=2,
        )  # fmt: skip
        lowrank = {"rank": 8, "update_proj_gap": 4}
    else:
        common = dict(
            size="60m", tokens=args.tokens, batch_size=32, grad_accum=4, eval_every=100, eval_blocks=128,
            eval_batch_size=64, time_limit=args.time_limit, log_every=10,
        )  # fmt: skip
        lowrank = dict(LOWRANK)
    common.update(block_length=256, warmup=0.1, schedule="cosine", min_lr_ratio=0.1, seed=args.seed)
    common.update(data=str(args.data), corpora=list(args.corpora))
    runs = []
    for lr in args.adamw_lrs:
        runs.append((f"adamw_lr{lr:g}", {**common, "optimizer": "adamw", "lr": lr}))
    for lr in args.lowrank_lrs:  # the spec's lr keeps the plain names; other lrs are suffixed
        suffix = "" if lr == 0.01 else f"_lr{lr:g}"
        runs.append((f"galore_adamw{suffix}", {**common, "optimizer": "galore_adamw", "lr": lr,
                                               "optimizer_kwargs": {**lowrank, "scale": 0.25}}))  # fmt: skip
        for variant in args.fira_variants:
            name = f"fira_adamw{'' if variant == 'official' else '_' + variant}{suffix}"
            runs.append((name, {**common, "optimizer": "fira_adamw", "lr": lr,
                                "optimizer_kwargs": {**lowrank, "alpha": 0.25, "variant": variant}}))  # fmt: skip
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in runs})
        if unknown:
            raise SystemExit(f"pretrain: --only names no run: {', '.join(unknown)}")
        runs = [(name, settings) for name, settings in runs if name in args.only]
    return runs


def resolve_token_cache(args) -> Path:
    """``--data``, else the default shared cache (found in the lorite cache; built once if absent). The
    quick mode builds a small one (Shakespeare + CPython, 300k tokens each) in seconds."""
    if args.data is not None:
        return Path(args.data)
    if args.quick:
        caps = dict.fromkeys(args.corpora, 300_000)
        return build_token_cache(list(args.corpora), pretraining_tokenizer(), 256, max_tokens=caps)
    # the shared cache copied in from elsewhere: take it by name (no tokenizer needed to find it)
    pattern = f"{'+'.join(args.corpora)}-L256-*"
    found = [p for p in sorted((cache_dir() / "tokens").glob(pattern)) if (p / "meta.json").exists()]
    if len(found) == 1:
        return found[0]
    return resolve_data(PretrainConfig(corpora=list(args.corpora), block_length=256))


# ------------------------------------------------------------------------------------------ worker
def worker(config_json: str, run_dir: str) -> None:
    pretrain(PretrainConfig.from_dict(json.loads(config_json)), run_dir)


# ------------------------------------------------------------------------------------------ report
def collect(out: Path, runs: list[tuple[str, dict]]) -> dict:
    results = {}
    for name, settings in runs:
        metrics = read_json(out / "runs" / name / "metrics.json")
        if metrics is None:
            results[name] = {"status": "no metrics yet", "settings": settings}
            continue
        final = metrics.get("final")
        results[name] = {
            "status": "finished" if final and "stopped" not in metrics else metrics.get("stopped", "running"),
            "settings": settings,
            "optimizer_groups": metrics.get("optimizer_groups"),
            "validation": [
                {
                    "step": v["step"],
                    "tokens": v["tokens"],
                    "ppl": v["ppl"],
                    "by_corpus": {c: r["ppl"] for c, r in v["by_corpus"].items()},
                }
                for v in metrics["validation"]
            ],
            "train": metrics["train"],
            "final": final,
            "seconds_per_step": metrics.get("seconds_per_step"),
            "tokens_per_second": metrics.get("tokens_per_second"),
            "optimizer_state_mb": metrics["optimizer_state_bytes"] / 2**20
            if "optimizer_state_bytes" in metrics
            else None,
            "peak_memory_gb": metrics["peak_memory_bytes"] / 2**30
            if "peak_memory_bytes" in metrics
            else None,
            "model_parameters": metrics.get("model_parameters"),
        }
    return results


def plot(out: Path, results: dict) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        if not r.get("validation"):
            continue
        points = [v for v in r["validation"] if v["step"] > 0]
        left.plot(
            [v["tokens"] / 1e6 for v in points], [v["ppl"] for v in points], marker="o", ms=3, label=name
        )
        right.plot([t["tokens"] / 1e6 for t in r["train"]], [t["loss"] for t in r["train"]], label=name, lw=1)
    left.set(xlabel="training tokens (M)", ylabel="validation perplexity (held-out documents)", yscale="log")
    left.set_title("validation perplexity, training mix")
    right.set(xlabel="training tokens (M)", ylabel="training loss", title="training loss")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    save_figure(fig, out / "validation_ppl.png")


def markdown(results: dict, args, environment: dict) -> str:
    header = [
        "run", "lr", "status", "tokens", "val ppl (mix)", *args.corpora,
        "opt. state MB", "s/step", "tokens/s", "peak GB",
    ]  # fmt: skip
    rows = []
    for name, r in results.items():
        final = r.get("final") or {}
        by = final.get("by_corpus", {})
        rows.append(
            [
                name,
                fmt(r["settings"]["lr"], "g"),
                str(r["status"] if isinstance(r["status"], str) else r["status"].get("reason")),
                fmt(final.get("tokens"), ",.0f"),
                fmt(final.get("ppl"), ".2f"),
                *[fmt(by.get(c, {}).get("ppl"), ".2f") for c in args.corpora],
                fmt(r.get("optimizer_state_mb"), ".0f"),
                fmt(r.get("seconds_per_step"), ".3f"),
                fmt(r.get("tokens_per_second"), ",.0f"),
                fmt(r.get("peak_memory_gb"), ".1f"),
            ]
        )
    lines = [
        "# Pre-training 60M: full-rank AdamW vs GaLore vs Fira" if not args.quick else "# Pre-training (quick CPU smoke test, tiny model)",
        "",
        f"Environment: {environment}",
        "",
        *markdown_table(header, rows).splitlines(),
        "",
        'Validation perplexity is exp(mean token loss) on held-out documents; "mix" weights each training',
        "corpus by its held-out size. Step times are measured with all runs sharing one GPU.",
        f"Paper context (60M on C4, 1.1B tokens, T5 vocabulary): {PAPER_60M_C4} — not comparable in absolute",
        "terms (other data, tokenizer, ~30× more tokens); compare the ordering and the gaps.",
        "",
        "![curves](validation_ppl.png)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(out: Path, runs, args, environment) -> dict:
    results = collect(out, runs)
    write_json(out / "results.json", {"environment": environment, "runs": results})
    try:
        plot(out, results)
    except Exception as error:  # a plot must never lose the numbers
        print(f"plot failed: {error}", file=sys.stderr)
    atomic_write_text(out / "results.md", markdown(results, args, environment))
    return results


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=False)
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, seconds per run")
    parser.add_argument("--data", default=None, help="token cache dir (default: the shared one)")
    parser.add_argument("--corpora", default="shakespeare,bible,austen,webster,cpython")
    parser.add_argument("--tokens", type=int, default=1000 * 128 * 256, help="training tokens per run")
    parser.add_argument("--adamw-lrs", default="1e-3", help="comma list; one process per lr")
    parser.add_argument("--lowrank-lrs", default="0.01", help="comma list; GaLore and Fira runs per lr")
    parser.add_argument("--fira-variants", default="official", help="comma list of official, paper")
    parser.add_argument("--only", default="", help="comma list of run names to start (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1000.0, help="seconds of training per run")
    parser.add_argument("--deadline", type=float, default=1150.0, help="seconds until the runs are killed")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.run_dir)
        return
    if args.out is None:
        parser.error("--out is required")
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    args.adamw_lrs = [float(x) for x in args.adamw_lrs.split(",") if x.strip()]
    args.lowrank_lrs = [float(x) for x in args.lowrank_lrs.split(",") if x.strip()]
    args.fira_variants = [x.strip() for x in args.fira_variants.split(",") if x.strip()]
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if args.quick:
        args.corpora = ["shakespeare", "cpython"] if args.data is None else args.corpora
        args.deadline = min(args.deadline, 240.0)
    out = fresh_output_dir(Path(args.out), "pretrain")
    (out / "runs").mkdir(exist_ok=True)

    args.data = resolve_token_cache(args)
    environment = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.quick else "cpu",
        "data": args.data.name,
    }
    runs = run_settings(args)
    environment["concurrent_runs"] = len(runs)
    began = time.time()
    jobs = []
    for name, settings in runs:
        run_dir = out / "runs" / name
        command = worker_command(__file__, "--worker", json.dumps(settings), "--run-dir", str(run_dir))
        jobs.append(Job(name, command, out / "runs" / f"{name}.log", threads=1 if args.quick else None))
        print(f"{name}: {settings['optimizer']} lr={settings['lr']:g}", flush=True)
    last_report = [time.time()]

    def on_tick() -> None:  # the report so far, every ~20 s (quick: 5 s) while the runs go on
        if time.time() - last_report[0] < (5 if args.quick else 20):
            return
        last_report[0] = time.time()
        results = write_report(out, runs, args, environment)
        latest = {n: (r.get("validation") or [{}])[-1].get("ppl") for n, r in results.items()}
        print(f"[{time.time() - began:5.0f}s] latest validation ppl: {latest}", flush=True)

    codes = run_jobs(jobs, len(jobs), deadline=args.deadline, on_tick=on_tick)
    for name, code in codes.items():
        if code:  # None: killed at the deadline (run_jobs said so)
            print(f"{name} exited with {code}; see {out}/runs/{name}.log", flush=True)
    results = write_report(out, runs, args, environment)
    print((out / "results.md").read_text())
    failed = [n for n, r in results.items() if not r.get("final")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
