"""LoLDU experiment (issue 11): trainable-parameter counts and test scores of LoLDU (arXiv 2410.13618) vs LoRA
r = 16 on two BIG-bench dev tasks, each method at its best learning rate (chosen on validation).

    python benchmarks/experiments/loldu.py --out runs/loldu --jobs 6         # GPU, ~8-10 min wall on a shared H100
    python benchmarks/experiments/loldu.py --out /tmp/loldu --quick          # CPU smoke test (tiny model), ~1-2 min

The comparison is ``lorite compare --config benchmarks/configs/loldu.json`` (one entry per method, each with
its own ``training`` overrides and learning-rate grid; AdamW for all; the paper-table protocol: 64 steps of
batch 32 × 2, warmup 6, cosine, the same data order for every run). This script adds what the issue asks on
top of it:

* ``param_counts.json``: trainable parameters of every entry, LoRA's ``r·(m + n)`` per adapted matrix and
  LoLDU's ``r`` measured on the adapted model, with LoLDU's frozen buffers (``r·(m + n)``) and the smallest
  pivot ``min |D_r|``;
* ``summary.md`` / ``summary.json``: parameters, best lr, validation per lr and test mean ± std per task,
  rewritten every 30 s from the runs' ``metrics.json`` files (a time-out still leaves numbers) and at the end;
* ``validation_vs_lr.png`` and ``score_vs_parameters.png``; compare's own ``report.md``, ``results.json``,
  ``loss_*.png`` and ``test_scores.png``.

An interrupted experiment resumes: runs whose ``metrics.json`` exists are read back, not redone.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    REPO,
    fmt,
    fmt_mean_std,
    markdown_table,
    mean_std,
    pyplot,
    quick_model,
    quick_task,
    read_json,
    save_figure,
    usable,
    write_json,
)

from lorite.adapters.loldu import loldu_summary
from lorite.cache import atomic_write_text
from lorite.commands._options import check_names
from lorite.models import load_causal_lm
from lorite.runtime import pick_device
from lorite.train.compare import RunSpec, compare, load_config, parse_lrs, parse_optimizers
from lorite.train.finetune import FinetuneConfig
from lorite.train.methods import get_method

CONFIG = REPO / "benchmarks" / "configs" / "loldu.json"


# ------------------------------------------------------------------------------------------ inputs
def quick_config(inputs: Path) -> dict:
    """A tiny model directory and task (the tests' helpers) and a config sized for a CPU smoke test."""
    model = quick_model(inputs / "model")
    task = quick_task(inputs / "task" / "task.json", n=80)
    return {
        "description": "CPU smoke test of experiments/loldu.py",
        "tasks": [task],
        "optimizers": [
            {"label": "lora_r4", "optimizer": "adamw", "training": {"method": "lora", "rank": 4, "alpha": 4}},
            {"label": "loldu_r4", "optimizer": "adamw", "training": {"method": "loldu", "rank": 4, "alpha": 1}},
            {"label": "loldu_r16", "optimizer": "adamw", "training": {"method": "loldu", "rank": 16, "alpha": 1}},
        ],
        "lrs": {"lora_r4": [1e-3, 1e-2], "loldu_r4": [1e-2, 1e-1], "loldu_r16": [1e-2, 1e-1]},
        "seeds": 2,
        "training": {
            "model": str(model), "steps": 4, "batch_size": 4, "grad_accum": 2, "warmup_steps": 1,
            "n_validation": 16, "n_test": 16, "eval_batch_size": 16, "max_length": 64, "device": "cpu",
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ parameter counts
def parameter_counts(config: dict, device: str) -> dict:
    """Trainable parameters per entry on the real model: LoRA counted as peft builds it, LoLDU measured on
    the adapted model (its decomposition is part of what is checked)."""
    counts = {}
    for spec in parse_optimizers(config["optimizers"]):
        settings = {**config["training"], **spec.training}
        finetune_config = FinetuneConfig(task=config["tasks"][0], optimizer="adamw", **settings)
        model, _ = load_causal_lm(finetune_config.model)
        model.to(pick_device(device if finetune_config.device == "auto" else finetune_config.device))
        began = time.perf_counter()
        model = get_method(finetune_config.method).prepare(model, finetune_config)
        entry = {
            "method": finetune_config.method,
            "rank": finetune_config.rank,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "prepare_seconds": round(time.perf_counter() - began, 2),
        }
        if finetune_config.method == "loldu":
            entry.update(loldu_summary(model))
        counts[spec.label] = entry
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return counts


# ------------------------------------------------------------------------------------------ summary
def collect(out: Path, config: dict) -> dict:
    """Everything the runs on disk say: per task and entry, validation/test per lr and seed."""
    specs = parse_optimizers(config["optimizers"])
    grids = parse_lrs(config["lrs"], config["optimizers"])
    table: dict = {}
    for task in config["tasks"]:
        for spec in specs:
            runs = {}
            for lr in grids[spec.label]:
                for seed in range(config.get("seeds", 1)):
                    metrics = read_json(out / RunSpec(task, spec, lr, seed).folder / "metrics.json")
                    if metrics is not None:
                        runs[(lr, seed)] = {
                            "validation": metrics.get("validation", {}).get("score"),
                            "test": metrics.get("test", {}).get("score"),
                            "diverged": metrics.get("diverged", False),
                            "trainable_parameters": metrics.get("trainable_parameters"),
                        }
            table[(task, spec.label)] = runs
    return {"specs": specs, "grids": grids, "runs": table}


def summarise(out: Path, config: dict, counts: dict | None, final: bool) -> dict:
    """``summary.json`` and ``summary.md`` from the runs on disk (partial while runs are going)."""
    data = collect(out, config)
    summary: dict = {"final": final, "parameter_counts": counts, "tasks": {}}
    for task in config["tasks"]:
        entries = {}
        for spec in data["specs"]:
            runs = data["runs"][(task, spec.label)]
            grid = {f"{lr:g}": runs.get((lr, 0), {}).get("validation") for lr in data["grids"][spec.label]}
            scored = [(runs[(lr, 0)]["validation"], -lr, lr) for lr in data["grids"][spec.label]
                      if (lr, 0) in runs and usable(runs[(lr, 0)]["validation"])]  # fmt: skip
            best = max(scored)[2] if scored else None
            tests = [r["test"] for (lr, _), r in runs.items() if lr == best and usable(r["test"])]
            test_mean, test_std = mean_std(tests) or (None, None)
            entries[spec.label] = {
                "grid_done": sum((lr, 0) in runs for lr in data["grids"][spec.label]),
                "grid_size": len(data["grids"][spec.label]),
                "validation_by_lr": grid,
                "best_lr": best,
                "best_lr_at_grid_edge": best
                in (min(data["grids"][spec.label]), max(data["grids"][spec.label])),
                "test_scores": tests,
                "test_mean": test_mean,
                "test_std": test_std,
            }
        summary["tasks"][task] = entries
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", _markdown(summary, config))
    return summary


def _markdown(summary: dict, config: dict) -> str:
    counts = summary["parameter_counts"] or {}
    state = "final" if summary["final"] else f"partial, {time.strftime('%H:%M:%S')}"
    lines = [f"# LoLDU vs LoRA ({state})", "", config.get("description", ""), ""]
    if counts:
        header = ["entry", "method", "rank", "trainable parameters", "LoLDU frozen buffers", "min abs pivot"]
        rows = [
            [
                label, c["method"], c["rank"], fmt(c["trainable_parameters"], ",.0f"),
                fmt(c["buffer_elements"], ",.0f") if "buffer_elements" in c else "",
                fmt(c["min_abs_pivot"], ".3g") if "min_abs_pivot" in c else "",
            ]
            for label, c in counts.items()
        ]  # fmt: skip
        lines.append(markdown_table(header, rows))  # ends in a newline: a blank line after the table
    lines += ["Test score ×100 at the validation-best lr (mean ± std over seeds; n = seeds done):", ""]
    labels = list(next(iter(summary["tasks"].values())))
    rows = []
    for task, entries in summary["tasks"].items():
        cells = []
        for label in labels:
            e = entries[label]
            if e["test_mean"] is None:
                cells.append(f"— ({e['grid_done']}/{e['grid_size']} lrs done)")
            else:
                edge = ", grid edge" if e["best_lr_at_grid_edge"] else ""
                cells.append(
                    f"{fmt_mean_std((e['test_mean'], e['test_std']), '.1f', 100)} "
                    f"(lr {e['best_lr']:g}{edge}; n = {len(e['test_scores'])})"
                )
        rows.append([task, *cells])
    lines += [
        markdown_table(["task", *labels], rows),
        "Validation score ×100 per learning rate (seed 0):",
        "",
    ]
    for task, entries in summary["tasks"].items():
        for label, e in entries.items():
            grid = ", ".join(f"{lr}: {fmt(v, '.1f', 100)}" for lr, v in e["validation_by_lr"].items())
            lines.append(f"- {task} / {label}: {grid}")
    return "\n".join(lines) + "\n"


def plots(out: Path, summary: dict) -> None:
    plt = pyplot()
    tasks = summary["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, (task, entries) in zip(axes[0], tasks.items()):
        for label, e in entries.items():
            points = [(float(lr), 100 * v) for lr, v in e["validation_by_lr"].items() if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation score ×100 (seed 0)")
        ax.set_title(task.split("/")[-1][:40], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "validation_vs_lr.png")
    plt.close(fig)

    counts = summary["parameter_counts"] or {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task, entries in tasks.items():
        points = sorted((counts[label]["trainable_parameters"], 100 * e["test_mean"], label)
                  for label, e in entries.items() if e["test_mean"] is not None and label in counts)  # fmt: skip
        if points:
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, marker="o", linestyle=":", label=task.split("/")[-1][:30])
            for x, y, name in points:
                ax.annotate(name, (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test score ×100 (best lr)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "score_vs_parameters.png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on a tiny random model")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument(
        "--jobs", type=int, default=None, help="parallel runs sharing the GPU (default 6; --quick: 1)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="override the config's seeds")
    parser.add_argument("--only", default=None, help="comma list of entry labels to run (default: all)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = quick_config(out / "quick_inputs") if args.quick else load_config(args.config)
    if args.seeds is not None:
        config["seeds"] = args.seeds
    if args.only:
        keep = set(args.only.split(","))
        config["optimizers"] = [e for e in config["optimizers"] if e["label"] in keep]
        config["lrs"] = {k: v for k, v in config["lrs"].items() if k in keep}
    specs = parse_optimizers(config["optimizers"])
    grids = parse_lrs(config["lrs"], config["optimizers"])
    if not args.quick:
        check_names(config["tasks"], [s.optimizer for s in specs])
    device = "cpu" if args.quick else "auto"
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 6)
    write_json(out / "config.json", config)

    began = time.time()
    counts_file = out / "param_counts.json"
    counts = read_json(counts_file)
    if counts is None:
        counts = parameter_counts(config, device)
        write_json(counts_file, counts)
    print(json.dumps(counts, indent=1), flush=True)

    stop = threading.Event()

    def flush_partial() -> None:  # a time-out still leaves a summary of the finished runs
        while not stop.wait(30):
            try:
                summarise(out, config, counts, final=False)
            except Exception as error:  # a half-written file mid-run: try again next time
                print(f"partial summary skipped: {error}", flush=True)

    threading.Thread(target=flush_partial, daemon=True).start()
    base = FinetuneConfig(task=config["tasks"][0], **config["training"])
    try:
        if not (out / "results.json").exists():
            compare(config["tasks"], config["optimizers"], grids, config.get("seeds", 1), base, out,
                    jobs=jobs, progress=True)  # fmt: skip
    finally:
        stop.set()
        summary = summarise(out, config, counts, final=(out / "results.json").exists())
        plots(out, summary)
    print((out / "summary.md").read_text())
    print(f"done in {time.time() - began:.0f} s; everything in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
