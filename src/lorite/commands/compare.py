"""``lorite compare``: optimizers × learning-rate grids × seeds on the same data; the best rate per
optimizer chosen on validation; test mean ± std at it; report, results and plots."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from ..cache import atomic_write_text
from ..errors import LoriteError
from ..runtime import run_lock
from ..train.compare import (
    compare,
    compare_finished_tasks,
    compare_progress,
    load_config,
    parse_lrs,
    parse_optimizers,
    prepare_output,
    progress_markdown,
)
from ..train.finetune import FinetuneConfig
from ..train.report import write_report
from ._options import RunFailed, add_training_args, check_names, parse_list, training_config


def run(args: argparse.Namespace) -> None:
    if args.config:
        config = load_config(args.config)
        tasks, optimizers = config["tasks"], config["optimizers"]
        grids = parse_lrs(config.get("lrs", "auto"), optimizers)
        seeds = int(config.get("seeds", 1))
        widen = config.get("widen", args.widen)
        base = FinetuneConfig(task=tasks[0], **config.get("training", {}))
        if config.get("heldout_tasks"):  # every run is scored on them after training (zero-shot transfer)
            base = replace(base, transfer_task="+".join(config["heldout_tasks"]))
    else:
        if not args.tasks:
            raise LoriteError("--tasks is required (or --config FILE)")
        tasks = parse_list(args.tasks, "tasks")
        optimizers = parse_list(args.optimizers, "optimizers")
        grids = parse_lrs(args.lrs, optimizers)
        seeds = args.seeds
        widen = args.widen
        base = training_config(args, tasks[0], optimizers[0], 0.0, 0)
    check_names(
        tasks + ([base.transfer_task] if base.transfer_task else []),
        [spec.optimizer for spec in parse_optimizers(optimizers)],
    )
    out = Path(args.out)
    if args.report and not args.progress:
        raise LoriteError("--report goes with --progress (a finished comparison writes its own report)")
    if args.progress:
        report = compare_progress(tasks, optimizers, grids, seeds, out, widen=widen, base=base)
        print(progress_markdown(report), end="")
        if args.report:
            write_finished_report(tasks, optimizers, grids, seeds, out, base, widen, Path(args.report))
        return
    # one lorite process per comparison: the lock is the comparison folder's; its runs (subfolders,
    # trained in this process or in workers) take none of their own
    with run_lock(out):
        prepare_output(out)
        results = compare(
            tasks,
            optimizers,
            grids,
            seeds,
            base,
            out,
            jobs=args.jobs,
            zero_shot=not args.no_zero_shot,
            widen=widen,
        )
    print_table(results)
    print(f"\nreport: {out / 'report.md'}   results: {out / 'results.json'}   plots: {out}/*.png")
    unusable = [
        f"{name} on {task}"
        for task, entry in results["tasks"].items()
        for name, info in entry["optimizers"].items()
        if not math.isfinite(info["test_score"][0])
    ]
    if unusable:  # exit code 1: the comparison has no result for these
        raise RunFailed(
            f"no usable run for {', '.join(unusable)}: every run at the chosen learning rate diverged or "
            f"failed (see {out / 'report.md'})"
        )


def write_finished_report(tasks, optimizers, grids, seeds, out, base, widen, folder: Path) -> None:
    """--report: results.json, report.md and plots of the finished tasks, in a folder of their own."""
    if folder.resolve() == out.resolve():  # a results.json there would mark the comparison as finished
        raise LoriteError(f"--report {str(folder)!r}: give a folder of its own, not the comparison's --out")
    results = compare_finished_tasks(tasks, optimizers, grids, seeds, out, base, widen=widen)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1, default=str))
    write_report(results, folder)
    unfinished = ", ".join(results["unfinished_tasks"]) or "none"
    print(f"\nreport of the finished tasks: {folder / 'report.md'} (unfinished: {unfinished})")


def print_table(results: dict) -> None:
    """Per task: the zero-shot score, and each optimizer's best lr, test mean ± std and seconds per step."""
    for task, entry in results["tasks"].items():
        zero = entry.get("zero_shot")
        print(f"\n{task}" + (f"  (zero-shot test score {100 * zero['test']['score']:.1f})" if zero else ""))
        print(f"  {'optimizer':<22}{'best lr':>9}  {'test score (×100)':>18}  {'s/step':>7}")
        for name, info in entry["optimizers"].items():
            mean, std = info["test_score"]
            timing = "—" if info["seconds_per_step"] is None else f"{info['seconds_per_step']:.2f}"
            print(f"  {name:<22}{info['best_lr']:>9g}  {100 * mean:>11.1f} ± {100 * std:<4.1f}  {timing:>7}")


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="optimizers × lr grids × seeds; best lr on validation; report")
    parser.add_argument("--config", default=None, help="a JSON comparison (benchmarks/configs/*.json)")
    parser.add_argument("--tasks", default=None, help="comma list of tasks")
    parser.add_argument(
        "--optimizers", default="adamw,lora_rite", help="comma list (see lorite.optim.available())"
    )
    parser.add_argument(
        "--lrs", default="auto", help="'auto', '1e-4,3e-4,…', or 'adamw=1e-4:3e-4,lora_rite=…'"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds at each optimizer's best lr")
    parser.add_argument(
        "--widen",
        type=int,
        default=0,
        help="when a best lr sits at a grid edge, try up to N half-decade steps past it (per side)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default="lorite-compare", help="the comparison's directory")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="train nothing: print what --out holds (partial tables) and which runs are left",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="with --progress: write results.json, report.md and plots of the finished tasks into DIR",
    )
    add_training_args(parser)
    parser.set_defaults(func=run)
