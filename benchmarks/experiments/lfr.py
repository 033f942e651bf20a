"""GPU experiment (issue 8): LFR — Learn, Focus, Review (arXiv 2409.06131) against uniform random sampling,
pre-training the same model with the same optimizer, token budget, batch and schedule; only the data
schedule differs. Runs are independent processes sharing one GPU (started together).

Setup:
  * model ``20m`` (hidden 256, FFN 688, 4 layers; 28.3M parameters with the 49,152-token SmolLM2
    vocabulary), random init, seeds ``--seeds`` (default 0); AdamW lr 1e-3 (no weight decay), 10% warmup,
    cosine to 10%, bf16 autocast, batch 64 blocks (32 × 2 accumulation) × 256 tokens = 16,384 tokens per
    step;
  * data: the shared token cache (256-token blocks, held-out documents per corpus). **Trained on**
    Shakespeare, the KJV Bible and Webster 1913 (≈26.2k blocks, 6.7M tokens); **never trained on**: Jane
    Austen's novels (English prose of another genre) and the CPython standard library (code) — their
    held-out perplexities show whether focusing on hard blocks costs generality;
  * budget: one full LFR schedule at the paper's defaults, 4.0 passes' worth of the training blocks
    (Learn 1 epoch; Focus on the hardest 50%, 1 epoch; Review 1 epoch; Focus on the hardest 30%, 5
    epochs) ≈ 1,636 steps ≈ 26.8M tokens; random sampling gets the same tokens (4 epochs);
  * arms: ``random``; ``lfr`` — perplexities recorded from the training forward pass (the paper's
    reading and the library default); ``lfr_eval`` — the same schedule, but each block scored by a
    no-grad evaluation pass over all training blocks at the end of Learn and of Review (spec §4.2).
Validation perplexity on every held-out block of every corpus, every ``--eval-every`` steps.

Measured: validation perplexity against tokens seen, per corpus and for the training mix; the tokens LFR
needs to reach random sampling's final training-mix perplexity (the paper: LFR beats its baselines "using
just 5%–19% of the training tokens" — there against baselines trained far longer, here at equal budget,
so the analogue is the fraction of random's tokens); held-out-domain perplexities; which corpora LFR's
keep-sets hold; and how strongly the online (training-forward) perplexity record depends on *when* a
block was drawn within the Learn epoch (the model improves during the epoch, so early blocks look hard).

Time: sized for ≤ 8 minutes wall on a shared H100 (three 20m runs of ~27M tokens; micro-batches of 32
blocks × 2 accumulation keep the 49k-vocabulary logits to a few GB per run); every run also stops
itself after ``--time-limit`` seconds of training (then evaluates and saves), and this script stops
waiting at ``--deadline``. Results are rewritten every ~15 s, so a time-out still leaves numbers.

    python benchmarks/experiments/lfr.py --out runs/exp_lfr                  # GPU
    python benchmarks/experiments/lfr.py --out /tmp/exp_lfr_quick --quick    # CPU smoke test, ~1-2 min

Writes into ``--out``: ``runs/<name>/`` (metrics.json, config.json; checkpoints and models are deleted
after their diagnostics are read, unless ``--keep-runs``), ``logs/``, ``results.json``,
``ppl_vs_tokens.png``, ``lfr_diagnostics.png``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    DASH,
    GPU_CACHE,
    Job,
    atomic_write_text,
    command_line,
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

import lorite.train.pretrain as pretrain_module
from lorite.cache import cache_dir
from lorite.data.blocks import TokenBlocks, build_token_cache
from lorite.data.corpora import Document, load_corpus
from lorite.data.lfr import LFRConfig, LFRSampler, eval_pass_scorer, keep_size
from lorite.models.llama import build_llama
from lorite.runtime import pick_device
from lorite.train.pretrain import PretrainConfig, pretrain, resolve_data

ALL_CORPORA = ("shakespeare", "bible", "austen", "webster", "cpython")  # the shared cache's corpora
TRAIN_CORPORA = ("shakespeare", "bible", "webster")
# arm → (sampler, sampler options); "lfr_eval" scores blocks with a no-grad pass after Learn and Review
ARMS = {"random": ("random", {}), "lfr": ("lfr", {}), "lfr_eval": ("lfr", {"ppl_source": "eval_pass"})}


# ------------------------------------------------------------------------------------------ setup
def char_tokenizer():
    """One token per printable character plus ``<|endoftext|>`` (id 0): the quick mode's tokenizer — a
    ~100-token vocabulary keeps a CPU smoke test fast (the 49k-token SmolLM2 head would dominate it)."""
    # tokenizers/transformers: heavy optional dependencies, needed only by the quick mode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<|endoftext|>", "<pad>", *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")


def quick_documents(n_documents: int = 16, n_chars: int = 2000) -> dict[str, list]:
    """The first ``n_chars`` characters of ``n_documents`` seeded documents of each real corpus."""
    documents = {}
    for name in ALL_CORPORA:
        docs = load_corpus(name)
        picked = random.Random(name).sample(range(len(docs)), min(n_documents, len(docs)))
        documents[name] = [Document(docs[i].title, docs[i].text[:n_chars]) for i in sorted(picked)]
    return documents


def resolve_token_cache(args) -> Path:
    """``--data``, else the shared cache (``$LORITE_CACHE/tokens/…``, or this checkout's ``.gpu/cache``),
    built once if absent; ``--quick`` builds a small character-level one (16 × 2,000 characters per
    corpus, 64-token blocks) in seconds."""
    if args.data is not None:
        return Path(args.data)
    if args.quick:
        docs = quick_documents()
        return build_token_cache(list(ALL_CORPORA), char_tokenizer(), 64, documents=docs)
    prefix = f"{'+'.join(ALL_CORPORA)}-L256-"
    for root in (cache_dir() / "tokens", GPU_CACHE / "tokens"):
        for candidate in sorted(root.glob(prefix + "*")):
            meta_file = candidate / "meta.json"
            meta = read_json(meta_file) or {}
            if meta.get("max_tokens") == {**dict.fromkeys(ALL_CORPORA), "webster": 4_000_000}:
                return candidate
    return resolve_data(PretrainConfig(corpora=list(ALL_CORPORA), block_length=256))


def run_settings(args, data: Path) -> list[tuple[str, dict]]:
    """``(name, PretrainConfig fields)`` of every run: each arm × seed, identical but for the sampler."""
    meta = json.loads((data / "meta.json").read_text())
    block_length = int(meta["block_length"])
    n_train = len(TokenBlocks(data, "train", corpora=list(args.train_corpora)))
    if args.quick:
        common = dict(
            size="tiny", batch_size=16, eval_batch_size=64, device=args.device or "cpu", log_every=5
        )
    else:
        common = dict(size=args.size, batch_size=args.batch_size, eval_batch_size=64, log_every=10)
        if args.device:
            common["device"] = args.device
    batch = common["batch_size"] * args.grad_accum  # blocks per optimizer step
    tokens = args.tokens or LFRConfig().planned_tokens(n_train, block_length, batch)
    total_steps = tokens // (batch * block_length)
    eval_every = args.eval_every or max(1, total_steps // 16)
    common.update(
        optimizer="adamw", lr=args.lr, tokens=tokens, block_length=block_length, grad_accum=args.grad_accum, warmup=0.1,
        schedule="cosine", min_lr_ratio=0.1, eval_every=eval_every, eval_blocks=None, bf16=True,
        corpora=list(ALL_CORPORA), train_corpora=list(args.train_corpora), data=str(data),
        time_limit=args.time_limit, progress=False,
    )  # fmt: skip
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            sampler, options = ARMS[arm]
            settings = {**common, "seed": seed, "sampler": sampler, "sampler_options": dict(options)}
            if sampler == "lfr":
                # a checkpoint one step before the end holds the sampler's records and final keep-set
                settings["checkpoint_every"] = max(1, total_steps - 1)
            runs.append((f"{arm}_seed{seed}", settings))
    return runs


# ------------------------------------------------------------------------------------------ worker
def worker(config_json: str, run_dir: str) -> None:
    config = PretrainConfig.from_dict(json.loads(config_json))
    model = None
    if config.sampler_options.get("ppl_source") == "eval_pass":
        model = attach_evaluation_pass(config)
    pretrain(config, run_dir, model=model)


def attach_evaluation_pass(config):
    """LFR with ``ppl_source="eval_pass"`` under ``pretrain``: build the model ``pretrain`` would build
    (same size, vocabulary, seed) and have every LFR sampler it makes score blocks with that model
    (``LFRSampler.attach_scorer``; the harness itself has no hook for it)."""
    train = TokenBlocks(config.data, "train", corpora=config.train_corpora or config.corpora)
    model = build_llama(config.size, vocab_size=train.vocab_size, seed=config.seed)
    dtype = torch.bfloat16 if config.bf16 and pick_device(config.device).type == "cuda" else None
    make_sampler = pretrain_module.make_sampler

    def make_scoring_sampler(name, **kwargs):
        sampler = make_sampler(name, **kwargs)
        sampler.attach_scorer(eval_pass_scorer(model, train, dtype))
        return sampler

    pretrain_module.make_sampler = make_scoring_sampler  # the name pretrain() looks up when it runs
    return model


# ------------------------------------------------------------------------------------------ analysis
def spearman(x, y) -> float | None:
    """Rank correlation of two 1-D tensors over their finite pairs."""
    keep = torch.isfinite(x) & torch.isfinite(y)
    if keep.sum() < 3:
        return None
    rx = torch.argsort(torch.argsort(x[keep].double())).double()
    ry = torch.argsort(torch.argsort(y[keep].double())).double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def lfr_diagnostics(run_dir: Path, settings: dict, total_steps: int) -> dict | None:
    """What the LFR sampler did, from its state in the run's checkpoint: the phase plan (in tokens), the
    share of each training corpus in the two keep-sets, mean recorded log-perplexity per corpus, and the
    rank correlation between a block's Learn record and *when* it was drawn in the Learn epoch."""
    state_file = run_dir / "checkpoint" / "training_state.pt"
    if not state_file.exists():
        return None
    state = torch.load(state_file, weights_only=True)["extra"]["sampler"]
    blocks = TokenBlocks(settings["data"], "train", corpora=settings["train_corpora"])
    n = len(blocks)
    tokens_per_step = settings["batch_size"] * settings["grad_accum"] * settings["block_length"]
    probe = LFRSampler(n, settings["batch_size"], total_steps * settings["grad_accum"], seed=settings["seed"])
    plan = [
        {**p, "start_tokens": p["start_step"] * tokens_per_step // settings["grad_accum"],
         "end_tokens": p["end_step"] * tokens_per_step // settings["grad_accum"]}
        for p in probe.plan()
    ]  # fmt: skip
    # the order of the Learn epoch (Learn draws need no losses): step at which each block was first drawn
    first_draw = torch.full((n,), math.nan)
    for step in range(plan[0]["end_step"]):
        ids = probe.next_indices()
        fresh = ids[torch.isnan(first_draw[ids])]
        first_draw[fresh] = float(step)
    records = dict(zip(state["record_phases"], state["records"]))

    def keep_from(record, drop):
        scores = torch.nan_to_num(record.double(), nan=math.inf)
        order = torch.sort(scores, stable=True).indices
        return order[n - keep_size(n, drop) :]

    out = {
        "checkpoint_step": state["step"],
        "checkpoint_phase": state["phase_name"],
        "plan": plan,
        "corpora": {},
    }
    keeps = {}
    config = state["config"]
    if 0 in records:
        keeps["focus"] = keep_from(records[0], config["focus_drop"])
        out["learn_record_vs_draw_step_spearman"] = spearman(first_draw, records[0].double().log())
    if 2 in records:
        keeps["final_focus"] = keep_from(records[2], config["final_drop"])
        if 0 in records:
            out["learn_vs_review_record_spearman"] = spearman(records[0].double(), records[2].double())
    for corpus, (start, stop) in blocks.ranges.items():
        info = {"blocks": stop - start}
        for name, keep in keeps.items():
            info[f"kept_in_{name}"] = float(((keep >= start) & (keep < stop)).sum()) / (stop - start)
        for j, label in ((0, "learn"), (2, "review")):
            if j in records:
                info[f"{label}_mean_log_ppl"] = float(records[j][start:stop].double().log().nanmean())
        out["corpora"][corpus] = info
    return out


def collect(out: Path, runs: list[tuple[str, dict]], diagnostics: dict) -> dict:
    results = {}
    for name, settings in runs:
        metrics = read_json(out / "runs" / name / "metrics.json")
        if metrics is None:
            results[name] = {"status": "not started", "settings": settings}
            continue
        final = metrics.get("final")
        status = "running"
        if final:
            status = "finished" if "stopped" not in metrics else f"stopped ({metrics['stopped']['reason']})"
        results[name] = {
            "status": status,
            "settings": settings,
            "total_steps": metrics.get("total_steps"),
            "tokens_per_step": metrics.get("tokens_per_step"),
            "train_blocks": metrics.get("train_blocks"),
            "validation": [
                {
                    "step": v["step"],
                    "tokens": v["tokens"],
                    "ppl": v["ppl"],
                    "by_corpus": {c: r["ppl"] for c, r in v["by_corpus"].items()},
                }
                for v in metrics["validation"]
            ],
            "final": final,
            "tokens_per_second": metrics.get("tokens_per_second"),
            "peak_memory_gb": metrics["peak_memory_bytes"] / 2**30
            if "peak_memory_bytes" in metrics
            else None,
            "model_parameters": metrics.get("model_parameters"),
        }
        if name in diagnostics:
            results[name]["lfr"] = diagnostics[name]
    return results


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which ``curve`` (tokens, ppl) reaches ``target``, interpolating log ppl
    linearly between evaluations; None if it never does."""
    for (t0, p0), (t1, p1) in itertools.pairwise(curve):
        if p1 <= target:
            if p0 <= target:
                return float(t0)
            a = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return t0 + a * (t1 - t0)
    return float(curve[0][0]) if curve and curve[0][1] <= target else None


def compare(results: dict, arms: list[str], seeds: list[int], heldout: list[str]) -> dict:
    """Per LFR arm and seed, against random sampling of the same seed: final perplexities (mix, each
    corpus), ratios, and the tokens each needs to reach the other's final training-mix perplexity."""
    out = {}
    for arm in [a for a in arms if a != "random"]:
        for seed in seeds:
            rnd, lfr = results.get(f"random_seed{seed}"), results.get(f"{arm}_seed{seed}")
            if (
                not rnd
                or not lfr
                or "ppl" not in (rnd.get("final") or {})
                or "ppl" not in (lfr.get("final") or {})
            ):
                continue
            rf, lf = rnd["final"], lfr["final"]
            entry = {
                "random_final_ppl": rf["ppl"],
                "lfr_final_ppl": lf["ppl"],
                "random_tokens": rf["tokens"],
                "lfr_tokens": lf["tokens"],
                "by_corpus": {
                    c: {
                        "random": rf["by_corpus"][c]["ppl"],
                        "lfr": lf["by_corpus"][c]["ppl"],
                        "lfr_over_random": lf["by_corpus"][c]["ppl"] / rf["by_corpus"][c]["ppl"],
                        "heldout_domain": c in heldout,
                    }
                    for c in rf["by_corpus"]
                },
            }
            lfr_curve = [(v["tokens"], v["ppl"]) for v in lfr["validation"]]
            rnd_curve = [(v["tokens"], v["ppl"]) for v in rnd["validation"]]
            reach = tokens_to_reach(lfr_curve, rf["ppl"])
            entry["lfr_tokens_to_reach_random_final"] = reach
            entry["lfr_fraction_of_random_tokens"] = reach / rf["tokens"] if reach is not None else None
            entry["random_tokens_to_reach_lfr_final"] = tokens_to_reach(rnd_curve, lf["ppl"])
            for c in heldout:
                c_lfr = [(v["tokens"], v["by_corpus"][c]) for v in lfr["validation"]]
                entry["by_corpus"][c]["lfr_tokens_to_reach_random_final"] = tokens_to_reach(
                    c_lfr, rf["by_corpus"][c]["ppl"]
                )
            out[f"{arm}_seed{seed}"] = entry
    return out


# ------------------------------------------------------------------------------------------ report
def plot(out: Path, results: dict, heldout: list[str]) -> None:
    runs = {k: r for k, r in results.items() if r.get("validation")}
    if not runs:
        return
    corpora = list(next(iter(runs.values()))["validation"][0]["by_corpus"])
    panels = ["training mix", *corpora]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colors = {"random": "tab:blue", "lfr": "tab:red", "lfr_eval": "tab:green"}
    plan = next((r["lfr"]["plan"] for r in runs.values() if r.get("lfr")), None)
    for ax, panel in zip(axes.flat, panels):
        for name, r in runs.items():
            arm, seed = name.rsplit("_seed", 1)
            xs = [v["tokens"] / 1e6 for v in r["validation"]]
            ys = [v["ppl"] if panel == "training mix" else v["by_corpus"][panel] for v in r["validation"]]
            style = "-" if seed == "0" else "--"
            ax.plot(xs, ys, style, color=colors.get(arm, "k"), label=f"{arm} (seed {seed})", lw=1.4)
        if plan:
            for k, p in enumerate(plan):
                if p["name"] in ("focus", "final_focus"):
                    ax.axvspan(
                        p["start_tokens"] / 1e6,
                        p["end_tokens"] / 1e6,
                        color="tab:red",
                        alpha=0.06 * (k % 2 + 1),
                    )
        # zoom on the part of training where the arms differ (the random-init start is ~vocabulary size)
        late = [
            v["ppl"] if panel == "training mix" else v["by_corpus"][panel]
            for r in runs.values()
            for v in r["validation"]
            if v["tokens"] >= 0.15 * max(w["tokens"] for w in r["validation"])
        ]
        if late:
            ax.set_ylim(0.97 * min(late), 1.15 * max(late))
        title = panel + (" (never trained on)" if panel in heldout else "")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("LFR vs random sampling (shaded: LFR Focus phases)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out / "ppl_vs_tokens.png")

    lfr_runs = {k: r["lfr"] for k, r in runs.items() if r.get("lfr")}
    if not lfr_runs:
        return
    fig, axes = plt.subplots(1, len(lfr_runs), figsize=(5.5 * len(lfr_runs), 3.6), squeeze=False)
    for ax, (name, diag) in zip(axes.flat, lfr_runs.items()):
        names = list(diag["corpora"])
        width = 0.35
        for k, phase in enumerate(("focus", "final_focus")):
            values = [diag["corpora"][c].get(f"kept_in_{phase}", 0.0) for c in names]
            ax.bar(
                [i + (k - 0.5) * width for i in range(len(names))], values, width, label=f"kept in {phase}"
            )
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("fraction of the corpus's blocks")
        rho = diag.get("learn_record_vs_draw_step_spearman")
        ax.set_title(
            f"{name}: keep-sets by corpus\nSpearman(Learn record, draw step) = {fmt(rho)}", fontsize=9
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, out / "lfr_diagnostics.png")


def summary(results: dict, comparison: dict, heldout: list[str]) -> str:
    lines = ["# LFR vs random sampling (issue 8)", ""]
    lines.append(f"Command: `{command_line()}`")
    lines.append("")
    lines += markdown_table(
        ["run", "status", "tokens", "tokens/s", "peak GB", "final validation ppl (training mix)"],
        [
            [
                name,
                r["status"],
                (r.get("final") or {}).get("tokens", DASH),
                fmt(r.get("tokens_per_second"), ".0f"),
                fmt(r.get("peak_memory_gb")),
                fmt((r.get("final") or {}).get("ppl")),
            ]
            for name, r in results.items()
        ],
    ).splitlines()
    for key, c in comparison.items():
        arm, seed = key.rsplit("_seed", 1)
        lines += ["", f"## {arm} vs random, seed {seed}", ""]
        rows = [
            [
                "training mix",
                fmt(c["random_final_ppl"]),
                fmt(c["lfr_final_ppl"]),
                fmt(c["lfr_final_ppl"] / c["random_final_ppl"], ".3f"),
            ]
        ]
        for corpus, v in c["by_corpus"].items():
            tag = " (never trained on)" if v["heldout_domain"] else ""
            rows.append([corpus + tag, fmt(v["random"]), fmt(v["lfr"]), fmt(v["lfr_over_random"], ".3f")])
        lines += markdown_table(["corpus", "random", arm, f"{arm} / random"], rows).splitlines()
        reach = c["lfr_tokens_to_reach_random_final"]
        if reach is None:
            lines.append(
                f"\n{arm} did not reach random sampling's final training-mix perplexity "
                f"({fmt(c['random_final_ppl'])}) within its {c['lfr_tokens']:,} tokens."
            )
        else:
            lines.append(
                f"\n{arm} reached random sampling's final training-mix perplexity ({fmt(c['random_final_ppl'])}) "
                f"after {reach / 1e6:.2f}M tokens = {100 * c['lfr_fraction_of_random_tokens']:.0f}% of random's "
                f"{c['random_tokens'] / 1e6:.2f}M (log-perplexity interpolated between evaluations)."
            )
        back = c["random_tokens_to_reach_lfr_final"]
        if back is not None:
            lines.append(f"Random sampling reached {arm}'s final perplexity after {back / 1e6:.2f}M tokens.")
        if arm == "lfr_eval":
            n_blocks = (results.get(key) or {}).get("train_blocks") or 0
            block_length = results[key]["settings"]["block_length"]
            lines.append(
                f"(Not in its token count: two no-grad evaluation passes over all {n_blocks:,} training "
                f"blocks, {2 * n_blocks * block_length / 1e6:.1f}M tokens forward-only ≈ "
                f"{2 * n_blocks * block_length / 3e6:.1f}M training tokens of compute.)"
            )
    for name, r in results.items():
        diag = r.get("lfr")
        if not diag:
            continue
        lines += [
            "",
            f"## LFR sampler diagnostics ({name}, checkpoint at step {diag['checkpoint_step']})",
            "",
        ]
        lines += markdown_table(
            ["phase", "steps", "tokens (M)", "blocks in set"],
            [
                [
                    p["name"],
                    f"{p['start_step']}–{p['end_step']}",
                    f"{p['start_tokens'] / 1e6:.2f}–{p['end_tokens'] / 1e6:.2f}",
                    p["keep_size"],
                ]
                for p in diag["plan"]
            ],
        ).splitlines()
        lines.append("")
        lines += markdown_table(
            ["corpus", "blocks", "kept in Focus", "kept in final Focus", "Learn log-ppl", "Review log-ppl"],
            [
                [
                    corpus,
                    v["blocks"],
                    fmt(v.get("kept_in_focus")),
                    fmt(v.get("kept_in_final_focus")),
                    fmt(v.get("learn_mean_log_ppl")),
                    fmt(v.get("review_mean_log_ppl")),
                ]
                for corpus, v in diag["corpora"].items()
            ],
        ).splitlines()
        lines.append(
            f"\nSpearman(Learn record, step at which the block was drawn in Learn) = "
            f"{fmt(diag.get('learn_record_vs_draw_step_spearman'), '.3f')} (a negative value means blocks drawn "
            f"later in the epoch, by a better model, recorded lower perplexity: the record then measures *when* "
            f"a block was seen as well as how hard it is); Spearman(Learn record, Review record) = "
            f"{fmt(diag.get('learn_vs_review_record_spearman'), '.3f')}."
        )
    lines.append("")
    return "\n".join(lines)


def write_report(out: Path, runs, diagnostics, args) -> dict:
    heldout = [c for c in ALL_CORPORA if c not in args.train_corpora]
    results = collect(out, runs, diagnostics)
    comparison = compare(results, args.arms, args.seeds, heldout)
    payload = {
        "experiment": "lfr_vs_random",
        "quick": args.quick,
        "train_corpora": list(args.train_corpora),
        "heldout_corpora": heldout,
        "runs": results,
        "comparison": comparison,
    }
    write_json(out / "results.json", payload)
    atomic_write_text(out / "summary.md", summary(results, comparison, heldout))
    try:
        plot(out, results, heldout)
    except Exception as error:  # a plotting failure must not lose the numbers
        print(f"lfr: plotting failed: {error}", file=sys.stderr)
    return payload


def finish_run(run_dir: Path, name: str, settings: dict, diagnostics: dict, keep: bool) -> None:
    """When a run ends (or is killed at the deadline): read the LFR sampler's diagnostics from its
    checkpoint into ``diagnostics``, then, unless ``keep``, delete its checkpoint and saved model."""
    if settings["sampler"] == "lfr":
        step_blocks = settings["batch_size"] * settings["grad_accum"]
        total_steps = settings["tokens"] // (step_blocks * settings["block_length"])
        try:
            diag = lfr_diagnostics(run_dir, settings, total_steps)
        except Exception as error:  # diagnostics are extras; the curves matter more
            print(f"lfr: diagnostics of {name} failed: {error}", file=sys.stderr)
            diag = None
        if diag is not None:
            diagnostics[name] = diag
    if not keep:
        for heavy in ("checkpoint", "model"):
            if (run_dir / heavy).is_dir():
                shutil.rmtree(run_dir / heavy)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=False)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, small cache")
    parser.add_argument("--size", default="20m")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="blocks per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--tokens", type=int, default=None, help="default: one full LFR schedule (4 epochs)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: ~16 evaluations per run")
    parser.add_argument("--seeds", default="0", help="comma list; each seed runs both arms")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--train-corpora", default=",".join(TRAIN_CORPORA))
    parser.add_argument("--data", default=None, help="token cache directory (default: the shared one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds of training per run")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; then stop waiting, report")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: all; quick: 1)")
    parser.add_argument("--keep-runs", action="store_true", help="keep checkpoints and saved models")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not args.out:
        parser.error("--out is required")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = args.arms.split(",")
    if unknown := [a for a in args.arms if a not in ARMS]:
        parser.error(f"unknown arms {unknown}; available: {', '.join(ARMS)}")
    args.train_corpora = args.train_corpora.split(",")
    if args.time_limit is None:
        args.time_limit = 60.0 if args.quick else 390.0
    if args.deadline is None:
        args.deadline = 150.0 if args.quick else 470.0
    parallel = args.jobs or (1 if args.quick else len(args.seeds) * len(args.arms))
    out = fresh_output_dir(Path(args.out), "lfr")
    (out / "runs").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)

    began = time.perf_counter()
    data = resolve_token_cache(args)
    runs = run_settings(args, data)
    print(f"lfr: data {data}; {len(runs)} runs, {parallel} at a time", flush=True)
    settings_of = dict(runs)
    jobs = [
        Job(
            name,
            worker_command(__file__, "--worker", json.dumps(settings), str(out / "runs" / name)),
            out / "logs" / f"{name}.log",
            threads=1 if args.quick else 2,
        )
        for name, settings in runs
    ]
    diagnostics: dict[str, dict] = {}
    last_report = [0.0]

    def on_finish(job: Job, code: int | None) -> None:
        finish_run(out / "runs" / job.name, job.name, settings_of[job.name], diagnostics, args.keep_runs)

    def on_tick() -> None:  # a partial report every ~15 s while runs go on
        if time.perf_counter() - last_report[0] > 15:
            write_report(out, runs, diagnostics, args)
            last_report[0] = time.perf_counter()

    run_jobs(
        jobs,
        parallel,
        deadline=max(0.0, args.deadline - (time.perf_counter() - began)),  # --deadline counts from the start
        poll=1.0 if args.quick else 3.0,
        on_tick=on_tick,
        on_finish=on_finish,
        echo=lambda line: print(f"lfr: {line}", flush=True),
    )
    payload = write_report(out, runs, diagnostics, args)
    print(json.dumps(payload["comparison"], indent=1))
    print(f"lfr: done in {time.perf_counter() - began:.0f}s; {out}/summary.md", flush=True)


if __name__ == "__main__":
    main()
