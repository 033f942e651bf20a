"""CPU experiment (issue 13): FedEP against FedAvg (and FedSEP, FedPA), test accuracy against rounds, on
non-IID splits of two datasets at two heterogeneity levels, three seeds each.

Setup (the paper's protocol, Guo et al. arXiv 2302.04228 §5, at toy scale):
  * data: ``digits`` (scikit-learn's 8×8 digits, 1,438 train / 359 test; MLP 64→64→10) and ``text``
    (BIG-bench ``multiemo/products_sentence_en``, 4 sentiment classes; 4,000 sentences embedded once with
    all-MiniLM-L6-v2; a linear head on the 384-d embeddings); a Dirichlet(α) label split over M = 20
    clients, α ∈ {0.1, 1.0}; 20% of the examples held out as the test set;
  * every client round: 5 local epochs of SGD (batch 20, lr 0.05, momentum 0.9), weight decay 1e-3 as the
    N(0, (wd·n_k)⁻¹) prior; K = 5 clients sampled per round;
  * warm start: FedAvg for ``--warmup`` rounds (20), then each method continues for ``--rounds`` (40)
    from that model, as the paper starts FedEP from a FedAvg checkpoint; FedAvg's continuation is the
    baseline;
  * methods: ``fedavg`` (server SGD lr 1: plain FedAvg); ``fedep`` (stateful EP, scaled-identity precision,
    scale 10, δ = 1/K, SGD lr 1 on the natural parameters); ``fedep_laplace`` (the same with the
    diagonal-Fisher Laplace estimator); ``fedsep`` (stateless, scale 10); ``fedpa`` (shrinkage ρ = 0.01,
    1 burn-in epoch); ``fedavg_iterate_avg`` (FedPA with ρ = 0 = FedAvg sending the mean of the epoch-end
    iterates: separates FedEP's gain from plain iterate averaging);
  * seeds 1, 2, 3 (partition, initialisation, client sampling, batches); FedEP's scale was chosen on
    seed 0 of digits α = 0.1 from {1, 10, 100} (10; 100 was as good) and is not tuned per dataset.

Measured per run: test accuracy after every round. Reported: final accuracy and the mean over the last 10
rounds (mean ± std over seeds), the mean accuracy over the 40 continued rounds (area under the curve, a
convergence-speed proxy) and the first continued round at which a method reaches FedAvg's mean over
its last 10 rounds on the same seed; plots of accuracy vs round (mean ± std band).

    OMP_NUM_THREADS=1 python benchmarks/experiments/federated.py --out runs/exp_federated          # ~10 min CPU
    OMP_NUM_THREADS=1 python benchmarks/experiments/federated.py --out /tmp/exp_fed_quick --quick  # ~1 min

Writes into ``--out``: ``runs/<data>-a<α>-s<seed>/<method>/`` (each a ``lorite federate`` run directory),
``results.json`` (rewritten after every run), ``accuracy_<data>.png``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    command_line,
    fmt_mean_std,
    markdown_table,
    mean_std,
    pyplot,
    read_json,
    save_figure,
    write_json,
)

from lorite.cache import atomic_write_text
from lorite.federated.data import DataSpec
from lorite.federated.runner import run
from lorite.federated.server import RunSpec

LOCAL = {"epochs": 5, "batch_size": 20, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
METHODS = {
    "fedavg": ("fedavg", {}),
    "fedep": ("fedep", {"scale": 10.0}),
    "fedep_laplace": ("fedep", {"scale": 10.0, "estimator": "laplace"}),
    "fedsep": ("fedep", {"scale": 10.0, "mode": "sep"}),
    "fedpa": ("fedpa", {"shrinkage": 0.01, "burn_in_epochs": 1}),
    "fedavg_iterate_avg": ("fedpa", {"shrinkage": 0.0, "burn_in_epochs": 0}),
}
DATASETS = {
    "digits": {"name": "digits", "model": "mlp", "hidden": 64},
    "text": {"name": "bigbench:multiemo/products_sentence_en", "model": "linear", "max_examples": 4000},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke test: digits, 1 seed, 3+5 rounds, 3 methods"
    )
    p.add_argument("--data", default="digits,text", help="comma list of: digits, text")
    p.add_argument("--alphas", default="0.1,1.0")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20, help="FedAvg rounds before the methods fork")
    p.add_argument("--rounds", type=int, default=40, help="rounds of each method after the warm start")
    return p.parse_args()


def run_one(spec_kwargs: dict, out: Path) -> list[float]:
    """One ``lorite federate`` run (in process); returns its accuracy per round."""
    metrics = read_json(out / "metrics.json")
    if metrics and metrics["complete"]:  # reuse a finished run
        return [h["accuracy"] for h in metrics["history"]]
    if out.exists():
        shutil.rmtree(out)
    run(RunSpec(**spec_kwargs), out, progress=None)
    return [h["accuracy"] for h in read_json(out / "metrics.json")["history"]]


def main() -> None:
    torch.set_num_threads(1)
    args = parse_args()
    if args.quick:
        args.data, args.seeds, args.warmup, args.rounds = "digits", "1", 3, 5
        args.methods = "fedavg,fedep,fedsep"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.data.split(",") if d]
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS] + [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown methods or datasets: {unknown}")
    results = {
        "command": command_line(),
        "setup": {
            "clients": args.clients, "per_round": args.per_round, "warmup": args.warmup, "rounds": args.rounds,
            "local": LOCAL, "methods": {m: METHODS[m] for m in methods}, "datasets": {d: DATASETS[d] for d in datasets},
        },
        "runs": {},
    }  # fmt: skip
    started = time.time()
    for data in datasets:
        for alpha in alphas:
            for seed in seeds:
                key = f"{data}-a{alpha:g}-s{seed}"
                base = out / "runs" / key
                data_spec = DataSpec(clients=args.clients, alpha=alpha, seed=seed, **DATASETS[data])
                common = {"data": data_spec, "seed": seed}
                t = time.time()
                warm = run_one(
                    {**common, "algorithm": "fedavg", "rounds": args.warmup,
                     "algorithm_config": {"clients_per_round": args.per_round, "local": LOCAL}},
                    base / "warmup",
                )  # fmt: skip
                entry = {"warmup": warm, "methods": {}}
                for method in methods:
                    algorithm, extra = METHODS[method]
                    config = {"clients_per_round": args.per_round, "local": LOCAL, **extra}
                    entry["methods"][method] = run_one(
                        {**common, "algorithm": algorithm, "algorithm_config": config, "rounds": args.rounds,
                         "warm_start_from": str(base / "warmup")},
                        base / method,
                    )  # fmt: skip
                results["runs"][key] = entry
                results["seconds"] = time.time() - started
                finals = "  ".join(f"{m} {v[-1]:.3f}" for m, v in entry["methods"].items())
                print(f"{key}: warm-up {warm[-1]:.3f} → {finals}  ({time.time() - t:.0f}s)", flush=True)
                _write(out, results, args, datasets, alphas, seeds, methods)
    print(f"done in {time.time() - started:.0f}s; summary: {out / 'summary.md'}")


def _write(out: Path, results: dict, args, datasets, alphas, seeds, methods) -> None:
    write_json(out / "results.json", results)
    lines = [
        "# FedEP vs FedAvg (issue 13)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"M = {args.clients} clients, K = {args.per_round} per round; FedAvg warm-up {args.warmup} rounds, then "
        f"{args.rounds} rounds per method. Accuracy on the held-out test set, mean ± std over seeds {seeds}.",
        "",
    ]
    last = min(10, args.rounds)
    for data in datasets:
        panels = {}
        for alpha in alphas:
            keys = [f"{data}-a{alpha:g}-s{s}" for s in seeds if f"{data}-a{alpha:g}-s{s}" in results["runs"]]
            if not keys:
                continue
            runs = [results["runs"][k] for k in keys]
            lines += [
                f"## {data}, α = {alpha:g} ({len(keys)} seed(s); accuracy at the end of the warm-up "
                f"{_fmt(mean_std(r['warmup'][-1] for r in runs))})",
                "",
            ]
            header = [
                "method", "final", f"mean of last {last}", f"mean over all {args.rounds} (speed)",
                f"first round ≥ FedAvg's last-{last} mean (same seed), per seed",
            ]  # fmt: skip
            rows = []
            # per seed: the mean of FedAvg's last rounds on that seed
            targets = (
                [sum(r["methods"]["fedavg"][-last:]) / last for r in runs] if "fedavg" in methods else None
            )
            curves = {}
            for method in methods:
                series = [r["methods"][method] for r in runs if method in r["methods"]]
                if not series:
                    continue
                final = mean_std(s[-1] for s in series)
                tail = mean_std(sum(s[-last:]) / last for s in series)
                area = mean_std(sum(s) / len(s) for s in series)
                reach = "—"
                if targets is not None:
                    hits = [
                        next((i + 1 for i, v in enumerate(s) if v >= t), None)
                        for s, t in zip(series, targets)
                    ]
                    reach = ", ".join("never" if h is None else str(h) for h in hits)
                rows.append([method, _fmt(final), _fmt(tail), _fmt(area), reach])
                curves[method] = series
            warm = [sum(r["warmup"][i] for r in runs) / len(runs) for i in range(len(runs[0]["warmup"]))]
            panels[alpha] = (warm, curves)
            lines.append(markdown_table(header, rows))  # ends in a newline: a blank line after the table
        if panels:
            _plot(out / f"accuracy_{data}.png", data, panels, len(seeds))
            lines += [f"![accuracy vs round, {data}](accuracy_{data}.png)", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))


def _plot(path: Path, data: str, panels: dict, n_seeds: int) -> None:
    """One panel per α: the FedAvg warm-up (grey), then each method's mean ± std over seeds."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for axis, (alpha, (warm, curves)) in zip(axes[0], panels.items()):
        w = len(warm)
        axis.plot(range(1, w + 1), warm, color="0.5", label="FedAvg warm-up")
        for method, series in curves.items():
            n = len(series[0])
            mean = [sum(s[i] for s in series) / len(series) for i in range(n)]
            std = [mean_std(s[i] for s in series)[1] for i in range(n)]
            x = list(range(w, w + n + 1))
            (line,) = axis.plot(x, [warm[-1], *mean], label=method)
            low = [warm[-1], *(m - d for m, d in zip(mean, std))]
            high = [warm[-1], *(m + d for m, d in zip(mean, std))]
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        axis.axvline(w, color="0.7", linestyle=":")
        axis.set_title(f"{data}, α = {alpha:g} ({n_seeds} seeds)", fontsize=10)
        axis.set_xlabel("round")
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)


def _fmt(stat: tuple[float, float] | None) -> str:
    return fmt_mean_std(stat, ".1f", scale=100)


if __name__ == "__main__":
    main()
