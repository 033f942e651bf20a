"""LiGO experiment (issue 12): pretrain a ~20M Llama, grow it to ~60M with LiGO and with stacking, train a 60M
from scratch; validation loss against training FLOPs; FLOPs LiGO/stacking save to reach scratch's final loss.

    python benchmarks/experiments/ligo.py --out runs/ligo            # GPU, ~8 min wall on a shared H100
    python benchmarks/experiments/ligo.py --out /tmp/ligo --quick    # CPU smoke test (tiny sizes), ~1-2 min

Phases: (1) ``pretrain`` the small model (``20m``); (2) ``lorite grow`` it to ``60m`` twice — LiGO (operator
trained ``--ligo-steps`` steps) and stacking (no learning); (3) three ``pretrain`` runs of the large model
*concurrently* (separate processes): from the LiGO model, from the stacked model, from scratch — identical
settings (tokens, lr schedule, data order), only the initial weights differ.

FLOPs per training token (forward + backward = 3 × forward, Kaplan et al. 2020 style):

    C = 3 · (2 · N_matmul + 4 · L · T · H · d_head)

N_matmul = the weights used in matrix products (attention, MLP and the LM head; the input embedding lookup
costs nothing), the second term the attention scores and weighted values at context T (no causal
discount). The LiGO operator's cost is measured with ``torch.utils.flop_counter`` on one operator step
(large forward + backward and building the fused weights) × steps. The small model's pretraining FLOPs are
reported separately; savings are given both without and with them.

Outputs in ``--out``: ``results.json`` (rewritten as runs progress), ``loss_vs_flops.png``, ``summary.md``,
``runs/{small,ligo,stack,scratch}/`` (pretrain run dirs: metrics.json, model/), ``grown/{ligo,stack}/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    DASH,
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

from lorite.growth.grow import GrowConfig, grow_run
from lorite.growth.ligo import LiGOConfig, LiGOOperator
from lorite.models.llama import build_llama, llama_config
from lorite.runtime import pick_device
from lorite.train.pretrain import PretrainConfig, pretrain, resolve_data

# sizes and budgets -------------------------------------------------------------------------------
FULL = {
    "small_size": "20m", "large_size": "60m", "size_overrides": {},
    "small_tokens": 10_000_000, "large_tokens": 16_000_000,
    "block_length": 256, "batch_size": 32, "grad_accum": 2, "small_lr": 2e-3, "large_lr": 1e-3,
    "ligo_steps": 100, "ligo_batch_size": 16, "ligo_lr": 3e-3, "ligo_warmup": 10,
    "eval_points": 16, "eval_blocks": 128, "small_time_limit": 120, "large_time_limit": 300,
    "corpora": None, "max_corpus_tokens": "default",
}  # fmt: skip
# CPU smoke test: "tiny" (hidden 32, 2 layers, 4 heads) grown to tiny ×2 (hidden 64, 4 layers, 8 heads)
QUICK = {
    "small_size": "tiny", "large_size": "tiny",
    "size_overrides": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
                       "num_attention_heads": 8, "num_key_value_heads": 8},
    "small_tokens": 8_192, "large_tokens": 4_096,
    "block_length": 32, "batch_size": 8, "grad_accum": 1, "small_lr": 3e-3, "large_lr": 3e-3,
    "ligo_steps": 4, "ligo_batch_size": 4, "ligo_lr": 3e-3, "ligo_warmup": 1,
    "eval_points": 2, "eval_blocks": 8, "small_time_limit": 120, "large_time_limit": 120,
    "corpora": ["shakespeare"], "max_corpus_tokens": {"shakespeare": 40_000},
}  # fmt: skip
RUNS = ("ligo", "stack", "scratch")


def train_flops_per_token(config, block_length: int) -> float:
    """C = 3·(2·N_matmul + 4·L·T·H·d_head) for a LlamaConfig (see the module docstring)."""
    L, D, F = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    H, K = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or D // H
    n_matmul = L * (2 * D * H * d + 2 * D * K * d + 3 * D * F) + config.vocab_size * D
    return 3.0 * (2 * n_matmul + 4 * L * block_length * H * d)


def parameter_count(config) -> int:
    from transformers import LlamaForCausalLM  # heavy optional dependency: imported when used

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def measured_flops(fn) -> float:
    """FLOPs of ``fn()`` counted by torch.utils.flop_counter (matmuls, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def pretrain_config(settings: dict, which: str, data: str | None, device: str):
    small = which == "small"
    tokens = settings["small_tokens"] if small else settings["large_tokens"]
    steps = tokens // (settings["batch_size"] * settings["grad_accum"] * settings["block_length"])
    fields = dict(
        size=settings["small_size"] if small else settings["large_size"],
        lr=settings["small_lr"] if small else settings["large_lr"],
        tokens=tokens, block_length=settings["block_length"], batch_size=settings["batch_size"],
        grad_accum=settings["grad_accum"],
        warmup=0.1, schedule="cosine", grad_clip=1.0, eval_every=max(1, steps // settings["eval_points"]),
        eval_blocks=settings["eval_blocks"], seed=0, device=device, data=data, log_every=10,
        time_limit=settings["small_time_limit"] if small else settings["large_time_limit"],
    )  # fmt: skip
    if settings["corpora"] is not None:
        fields["corpora"] = list(settings["corpora"])
    if settings["max_corpus_tokens"] != "default":
        fields["max_corpus_tokens"] = settings["max_corpus_tokens"]
    return PretrainConfig(**fields)


def operator_flops(out: Path, settings: dict, large_llama, vocab: int, device: str) -> dict:
    """Measured FLOPs of one LiGO operator step (large forward + backward, including building the fused
    weights) and of one plain large-model step on the same batch (a check of the formula)."""
    from transformers import LlamaForCausalLM  # heavy optional dependency: imported when used

    where = pick_device(device)
    small = LlamaForCausalLM.from_pretrained(out / "runs" / "small" / "model", dtype=torch.float32).to(where)
    operator = LiGOOperator(small, large_llama, LiGOConfig()).to(where)
    ids = torch.randint(0, vocab, (settings["ligo_batch_size"], settings["block_length"]), device=where)
    step = measured_flops(lambda: operator(input_ids=ids, labels=ids).loss.backward())
    large_model = LlamaForCausalLM(large_llama).to(where)
    plain = measured_flops(lambda: large_model(input_ids=ids, labels=ids).loss.backward())
    return {
        "operator_step_flops": step,
        "operator_flops": step * settings["ligo_steps"],
        "large_step_flops_measured": plain,
        "large_step_flops_formula": train_flops_per_token(large_llama, settings["block_length"])
        * ids.numel(),
    }


# a worker process: one pretrain run --------------------------------------------------------------
def worker(spec: dict) -> None:
    config = PretrainConfig(**spec["config"])
    if spec["init"]:
        from transformers import LlamaForCausalLM  # heavy optional dependency: only a grown start needs it

        model = LlamaForCausalLM.from_pretrained(spec["init"], dtype=torch.float32)
    else:
        model = build_llama(config.size, vocab_size=spec["vocab_size"], seed=config.seed, **spec["overrides"])
    pretrain(config, spec["out"], model=model)


# summary --------------------------------------------------------------------------------------------
def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """First x where the piecewise-linear curve (x, loss) reaches ``target`` (None: never)."""
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y0 <= target:
            return x0
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    if points and points[-1][1] <= target:
        return points[-1][0]
    return None


def summarize(out: Path, info: dict) -> dict:
    """Read every run's metrics; write results.json, loss_vs_flops.png and summary.md (partial-safe)."""
    runs = {}
    per_token = info["flops_per_token"]
    for name in ("small", *RUNS):
        metrics = read_json(out / "runs" / name / "metrics.json")  # None: not started (or mid-write)
        if metrics is None:
            continue
        size = "small" if name == "small" else "large"
        offset = info.get("operator_flops", 0.0) if name == "ligo" else 0.0
        curve = [
            {"tokens": v["tokens"], "flops": offset + per_token[size] * v["tokens"], "loss": v["loss"]}
            for v in metrics["validation"]
        ]
        runs[name] = {
            "curve": curve, "final": metrics.get("final"), "stopped": metrics.get("stopped"),
            "tokens_per_second": metrics.get("tokens_per_second"), "total_steps": metrics.get("total_steps"),
        }  # fmt: skip
    results = {**info, "runs": runs}
    small_flops = per_token["small"] * info["settings"]["small_tokens"]
    results["small_pretraining_flops"] = small_flops
    scratch = runs.get("scratch")
    if scratch and scratch["final"] and "loss" in scratch["final"]:
        target = scratch["final"]["loss"]
        scratch_flops = scratch["curve"][-1]["flops"]
        savings = {"target_loss": target, "scratch_flops": scratch_flops}
        for name in ("ligo", "stack"):
            if name not in runs or not runs[name]["final"]:
                continue
            reach = crossing([(p["flops"], p["loss"]) for p in runs[name]["curve"]], target)
            entry = {"flops_to_reach": reach}
            if reach is not None:
                entry["saving_excluding_small"] = 1 - reach / scratch_flops
                entry["saving_including_small"] = 1 - (reach + small_flops) / scratch_flops
            savings[name] = entry
        results["savings"] = savings
    write_json(out / "results.json", results)
    plot(out, results)
    atomic_write_text(out / "summary.md", summary_text(results))
    return results


def plot(out: Path, results: dict) -> None:
    runs = {name: run for name, run in results["runs"].items() if name in RUNS}
    if not runs:
        return
    small_flops = results["small_pretraining_flops"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, include in zip(axes, (False, True)):
        for name, colour in (("scratch", "k"), ("stack", "tab:orange"), ("ligo", "tab:blue")):
            if name not in runs:
                continue
            shift = small_flops if include and name != "scratch" else 0.0
            xs = [p["flops"] + shift for p in runs[name]["curve"]]
            ax.plot(xs, [p["loss"] for p in runs[name]["curve"]], "-o", ms=3, color=colour, label=name)
        if "savings" in results:
            ax.axhline(results["savings"]["target_loss"], color="grey", ls=":", lw=1)
        ax.set_xlabel("training FLOPs" + (" incl. the small model's pretraining" if include else ""))
        ax.set_title("small-model pretraining " + ("included" if include else "not counted"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend()
    top = max(p["loss"] for r in runs.values() for p in r["curve"][1:] or r["curve"])
    low = min(p["loss"] for r in runs.values() for p in r["curve"])
    axes[0].set_ylim(low - 0.1, min(top + 0.3, low + 4))
    fig.tight_layout()
    save_figure(fig, out / "loss_vs_flops.png")


def summary_text(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# LiGO: grow a pretrained small Llama vs stacking vs scratch",
        "",
        f"Small `{s['small_size']}` ({results['parameters']['small']:,} params) pretrained on "
        f"{s['small_tokens']:,} tokens; grown to `{s['large_size']}` ({results['parameters']['large']:,} "
        f"params); each large run {s['large_tokens']:,} tokens (batch {s['batch_size'] * s['grad_accum']}×{s['block_length']}, "
        f"lr {s['large_lr']:g}, 10% warmup, cosine). LiGO operator: {results.get('operator_parameters', 0):,} "
        f"parameters, {s['ligo_steps']} steps of {s['ligo_batch_size']} blocks, lr {s['ligo_lr']:g}.",
        "",
        f"FLOPs/token (training): small {results['flops_per_token']['small']:.3g}, large "
        f"{results['flops_per_token']['large']:.3g} (C = 3·(2·N_matmul + 4·L·T·H·d_head)); "
        f"LiGO operator training {results.get('operator_flops', float('nan')):.3g} FLOPs (measured); "
        f"small pretraining {results['small_pretraining_flops']:.3g} FLOPs (counted separately).",
        "",
    ]
    rows = []
    for name in ("small", *RUNS):
        run = results["runs"].get(name)
        if not run:
            rows.append([name, DASH, "(not run / not finished)", "", ""])
            continue
        final = run["final"] or {}
        first = run["curve"][0]["loss"] if run["curve"] else None
        stopped = run["stopped"]["reason"] if run["stopped"] else ""
        rows.append(
            [name, fmt(first, ".4f"), fmt(final.get("loss"), ".4f"), final.get("tokens", ""), stopped]
        )
    header = ["run", "loss at step 0", "final validation loss", "tokens", "stopped early"]
    lines += markdown_table(header, rows).splitlines()
    if "growth" in results:
        lines += ["", "Growth (held-out loss of the grown model before large-model training):", ""]
        for name, g in results["growth"].items():
            parts = [f"{k} {g[k]:.4f}" for k in ("small_validation_loss", "grown_validation_loss_at_init",
                                                  "grown_validation_loss") if k in g]  # fmt: skip
            lines.append(f"- {name}: " + ", ".join(parts))
    if "savings" in results:
        sv = results["savings"]
        lines += ["", f"FLOPs to reach scratch's final loss {sv['target_loss']:.4f} "
                  f"(scratch used {sv['scratch_flops']:.3g}):", ""]  # fmt: skip
        for name in ("ligo", "stack"):
            entry = sv.get(name)
            if entry is None:
                continue
            if entry["flops_to_reach"] is None:
                lines.append(f"- {name}: not reached within its budget")
            else:
                lines.append(
                    f"- {name}: {entry['flops_to_reach']:.3g} FLOPs → saving "
                    f"{100 * entry['saving_excluding_small']:.1f}% (small pretraining not counted), "
                    f"{100 * entry['saving_including_small']:.1f}% (counted)"
                )
        lines += ["", "Paper (BERT-Small → BERT-Base): 44.7% fewer FLOPs (small pretraining not counted)."]
    return "\n".join(lines) + "\n"


# the experiment ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=False)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test with tiny sizes")
    parser.add_argument("--data", default=None, help="token cache dir (default: built/found by the harness)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not args.out:
        parser.error("--out is required")
    out = fresh_output_dir(Path(args.out), "ligo")
    (out / "runs").mkdir(exist_ok=True)
    (out / "grown").mkdir(exist_ok=True)

    settings = dict(QUICK if args.quick else FULL)
    device = args.device if not args.quick else "cpu"
    threads = 1 if args.quick else 4
    began = time.time()

    # (1) the small model
    small_config = pretrain_config(settings, "small", args.data, device)
    data = str(resolve_data(small_config))  # build or find the token cache once, before any process
    small_config.data = data
    vocab = json.loads((Path(data) / "meta.json").read_text())["vocab_size"]
    small_llama = llama_config(settings["small_size"], vocab)
    large_llama = llama_config(settings["large_size"], vocab, **settings["size_overrides"])
    info = {
        "settings": settings, "data": data, "device": device,
        "flops_per_token": {"small": train_flops_per_token(small_llama, settings["block_length"]),
                            "large": train_flops_per_token(large_llama, settings["block_length"])},
        "flops_formula": "3*(2*N_matmul + 4*L*T*H*d_head) per training token; N_matmul excludes the input embedding",
        "parameters": {"small": parameter_count(small_llama), "large": parameter_count(large_llama)},
    }  # fmt: skip
    print(
        f"[{time.strftime('%T')}] phase 1: pretrain {settings['small_size']} on {settings['small_tokens']:,} tokens"
    )
    torch.set_num_threads(threads)
    pretrain(small_config, out / "runs" / "small")
    summarize(out, info)

    # (2) grow: LiGO (operator trained) and stacking (no learning), through the `lorite grow` code path
    info["growth"] = {}
    for method in ("ligo", "stack"):
        print(f"[{time.strftime('%T')}] phase 2: grow ({method})", flush=True)
        grow = GrowConfig(
            source=str(out / "runs" / "small"), size=settings["large_size"], method=method,
            ligo_steps=settings["ligo_steps"], data=data, batch_size=settings["ligo_batch_size"],
            lr=settings["ligo_lr"], warmup_steps=settings["ligo_warmup"], eval_blocks=4 * settings["eval_blocks"],
            device=device, progress=False, size_overrides=settings["size_overrides"],
        )  # fmt: skip
        grown = grow_run(grow, out / "grown" / method)
        info["growth"][method] = {k: v for k, v in grown.items() if k != "config"}
        if method == "ligo":
            info["operator_parameters"] = grown["operator_parameters"]
    info.update(operator_flops(out, settings, large_llama, vocab, device))
    summarize(out, info)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the three large runs are other processes: hand this one's cache back

    # (3) three large runs at once
    large_config = pretrain_config(settings, "large", data, device)
    print(
        f"[{time.strftime('%T')}] phase 3: {', '.join(RUNS)} concurrently, {settings['large_tokens']:,} tokens each"
    )
    jobs = []
    for name in RUNS:
        spec = {
            "config": asdict(large_config), "out": str(out / "runs" / name), "vocab_size": vocab,
            "overrides": settings["size_overrides"],
            "init": str(out / "grown" / name) if name != "scratch" else None,
        }  # fmt: skip
        jobs.append(
            Job(name, worker_command(__file__, "--worker", json.dumps(spec)), out / f"{name}.log", threads)
        )
    last = [0.0]

    def tick():  # a partial summary every ~20 s while the runs go on
        if time.time() - last[0] > 20:
            last[0] = time.time()
            summarize(out, info)

    info["exit_codes"] = run_jobs(jobs, len(jobs), on_tick=tick)
    info["wall_seconds"] = time.time() - began
    results = summarize(out, info)
    print((out / "summary.md").read_text())
    if any(info["exit_codes"].values()):
        print(f"some runs failed: {info['exit_codes']} (logs in {out}/*.log)", file=sys.stderr)
        sys.exit(1)
    if "savings" not in results:
        print("no savings computed (scratch did not finish)", file=sys.stderr)
    print(f"done in {info['wall_seconds']:.0f} s; {out}/results.json, loss_vs_flops.png, summary.md")


if __name__ == "__main__":
    main()
