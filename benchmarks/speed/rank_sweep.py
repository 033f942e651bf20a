"""LoRA-RITE against fused AdamW at every LoRA rank: optimizer step, whole training step, state memory,
and the plot of step time against rank (issue "LoRA-RITE at AdamW speed at every rank").

For each ``--config`` (``gemma2b``, ``smollm2``; the shapes of :mod:`optimizer_step`) and rank, it measures
with :func:`optimizer_step.optimizer_step_ms` and :func:`optimizer_step.whole_step_ms` (CUDA-event
medians after warm-up): AdamW (fused), both LoRA-RITE variants eager and with ``cuda_graph=True``, and
pytorch-optimizer's LoRARite (when installed) at the ``--peer-ranks``.

    python benchmarks/speed/rank_sweep.py --config smollm2 --out runs/rank_sweep_smollm2.json
    python benchmarks/speed/rank_sweep.py --plot runs/rank_sweep_*.json --figure docs/results/rank_sweep.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # optimizer_step, next to this file
from harness import command_line, fmt, markdown_table, pyplot, read_json, save_figure, write_json
from optimizer_step import CONFIGS, lora_shapes, optimizer_step_ms, whole_step_ms

OURS = ["lora_rite", "lora_rite+graph", "lora_rite_reference", "lora_rite_reference+graph"]
PEER = "pytorch_optimizer.LoRARite"
BATCH = {"gemma2b": (8, 512), "smollm2": (16, 512)}


def measure(
    config: str, ranks: list[int], peer_ranks: list[int], whole_ranks: list[int], steps: int, out: Path | None
) -> dict:
    """Every rank's rows; with ``out``, the JSON is rewritten after each rank, so a run stopped by a time
    limit keeps what it measured."""
    device = torch.device("cuda")
    try:
        import pytorch_optimizer  # noqa: F401  (the peer, where installed)

        has_peer = True
    except ImportError:
        has_peer = False
    rows = []
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": command_line(), "pairs": len(lora_shapes(CONFIGS[config])), "rows": rows,
    }  # fmt: skip
    for rank in ranks:
        names = ["adamw", *OURS] + ([PEER] if has_peer and rank in peer_ranks else [])
        for name in names:
            began = time.perf_counter()
            ms, state = optimizer_step_ms(name, CONFIGS[config], rank, device, steps, 5)
            rows.append(
                {"config": config, "rank": rank, "optimizer": name, "step_ms": ms, "state_bytes": state}
            )
            print(f"{config} r={rank} {name}: step {ms:.2f} ms, state {state / 2**20:.1f} MB "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
        if rank in whole_ranks:
            timings = whole_step_ms(names, config, rank, device, 10, 3, *BATCH[config])
            for row in rows:
                if row["rank"] == rank and row["optimizer"] in timings:
                    row["whole_ms"] = timings[row["optimizer"]]
            print(f"{config} r={rank} whole step: {timings}", flush=True)
        if out:
            write_json(out, result)
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    base = {(r["rank"]): r for r in rows if r["optimizer"] == "adamw"}
    cells = []
    for row in rows:
        adamw = base[row["rank"]]
        whole, whole_adamw = row.get("whole_ms"), adamw.get("whole_ms")
        cells.append([
            row["rank"], row["optimizer"], fmt(row["step_ms"]), fmt(row["step_ms"] / adamw["step_ms"], ".1f") + "×",
            fmt(whole, ".1f"), f"{100 * (whole / whole_adamw - 1):+.1f} %" if whole and whole_adamw else "—",
            fmt(row["state_bytes"] / 2**20, ".1f"), f"{100 * (row['state_bytes'] / adamw['state_bytes'] - 1):+.1f} %",
        ])  # fmt: skip
    header = [
        "r",
        "optimizer",
        "step ms",
        "× AdamW",
        "whole step ms",
        "whole vs AdamW",
        "state MB",
        "state vs AdamW",
    ]
    return markdown_table(header, cells)


def plot(results: list[dict], figure_path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        config = result["rows"][0]["config"]
        for name in ["adamw", *OURS, PEER]:
            points = sorted((r["rank"], r["step_ms"]) for r in result["rows"] if r["optimizer"] == name)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank r", ylabel="optimizer step, ms (median)",
               title=f"{config} ({result['pairs']} pairs), {result['device']}")  # fmt: skip
        ax.set_xticks(sorted({r["rank"] for r in result["rows"]}), labels=None)
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figure_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(BATCH), default="smollm2")
    parser.add_argument("--ranks", default="4,8,16,32,64,128,256")
    parser.add_argument("--peer-ranks", default="16,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-whole-step", action="store_true", help="no whole training step at any rank")
    parser.add_argument(
        "--whole-ranks", default=None, help="whole training step at these ranks (default: all)"
    )
    parser.add_argument("--out", default=None, help="write the measurements (JSON) here")
    parser.add_argument("--plot", nargs="*", default=None, help="JSON files of earlier runs: table + figure")
    parser.add_argument("--figure", default="rank_sweep.png")
    args = parser.parse_args()
    if args.plot is not None:
        results = [read_json(Path(p)) for p in args.plot]
        for result in results:
            print(
                f"\n{result['rows'][0]['config']} — {result['device']}, {result['date']}: {result['command']}\n"
            )
            print(table(result), end="")
        plot(results, Path(args.figure))
        return
    if not torch.cuda.is_available():
        sys.exit("rank_sweep: needs a CUDA device")
    ranks = [int(r) for r in args.ranks.split(",")]
    whole_ranks = [] if args.no_whole_step else ranks
    if args.whole_ranks and not args.no_whole_step:
        whole_ranks = [int(r) for r in args.whole_ranks.split(",")]
    peer_ranks = [int(r) for r in args.peer_ranks.split(",")]
    result = measure(
        args.config, ranks, peer_ranks, whole_ranks, args.steps, Path(args.out) if args.out else None
    )
    print("\n" + table(result), end="")


if __name__ == "__main__":
    main()
