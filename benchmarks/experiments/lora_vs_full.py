"""LoRA vs full fine-tuning on SmolLM2-135M-Instruct (issue 9; Biderman et al., "LoRA Learns Less and Forgets
Less", arXiv 2405.09673): how much each learns, how much each forgets, and the rank of each ΔW.

    python benchmarks/experiments/lora_vs_full.py --prepare                    # here, once: data → .gpu/cache/ (~5 MiB)
    python benchmarks/experiments/lora_vs_full.py --out runs/lora_vs_full      # GPU: 30 runs, ~6-8 min wall (6 jobs)
    python benchmarks/experiments/lora_vs_full.py --out /tmp/lvf --quick       # CPU smoke test, tiny model, ~1-2 min

Targets (the paper's two regimes, at 135M scale):

* **code, continued pretraining (CPT)**: packed 256-token blocks of CPython standard-library source
  (``lorite.data.corpora`` "cpython": a deterministic ~3.5 MB subset of its files, whole files held out for
  validation/test); target metric: held-out perplexity (lower = learned more);
* **math, instruction tuning (IFT)**: BIG-bench ``elementary_math_qa/question_only`` (question → the correct
  answer's text, chat template); target metric: multiple-choice accuracy.

Methods, each at its best learning rate on the target's **validation** split from a 3-value grid (seed 0):
full fine-tuning (AdamW, lr 3e-5 / 1e-4 / 3e-4), LoRA r = 16, 64, 256 with AdamW (α = 2r, all linear layers,
lr 3e-4 / 1e-3 / 3e-3; at r = 256 k_proj and v_proj, 192 wide, are left out: a rank-256 factor exceeds them)
and LoRA-RITE at r = 16 (lr 3e-3 / 1e-2 / 3e-2). 200 steps of batch 16, cosine schedule with 10% warmup, bf16
autocast; gradient clipping at 1 for AdamW runs (the paper's setting), none for LoRA-RITE (clipping the raw
gradient breaks its invariance). Every run saves its weights every 50 steps (``--save-every``). A grid whose
best learning rate lies at an edge is widened one half-decade step past that edge (up to two steps per side),
so every best learning rate ends inside its grid or is reported as at the edge.

For every run and every saved step (``lorite.analysis.forgetting``): the target metric on validation, the
perplexity of held-out Jane Austen chapters (English prose no run trains on) and length-normalised accuracy on
three commonsense BIG-bench tasks outside the training data (``winowhy``, ``social_iqa``: 200 examples each;
``general_knowledge``: all 70) — their mean is the forgetting score. For every final model
(and full fine-tuning's snapshots): rank90 of ΔW per matrix beside a Gaussian matrix of the same shape
(``lorite.analysis.spectrum``).

Output in ``--out``: ``runs/<target>/<method>/lr<lr>/`` (each a ``lorite finetune`` run dir with
``forgetting.json`` and ``spectrum/``), ``base_<target>.json``, and — rewritten after every finished job, so a
time-out still leaves numbers — ``results.json``, ``summary.md``, ``learning_vs_forgetting_best.png`` (best
learning rates), ``learning_vs_forgetting_all.png`` (every run) and ``rank90.png``. Jobs still queued at
``--time-limit`` (default 480 s) are not started; a second invocation with the same ``--out`` resumes
(finished parts are read back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    DASH,
    GPU_CACHE,
    command_line,
    fmt,
    markdown_table,
    pyplot,
    quick_model,
    read_json,
    run_calls,
    save_figure,
    write_json,
)

from lorite.analysis.forgetting import (
    DEFAULT_COMMONSENSE,
    ForgettingConfig,
    ForgettingEvaluator,
    write_forgetting_report,
)
from lorite.analysis.spectrum import analyze_spectrum, write_spectrum_report
from lorite.cache import atomic_write_text, cache_dir
from lorite.data import corpora
from lorite.data.corpus_sources import cpython_version
from lorite.models import load_causal_lm, resolve_model_dir
from lorite.tasks import bigbench, split_documents
from lorite.train.compare import neighbour_lr
from lorite.train.finetune import FinetuneConfig, evaluate, finetune

DATA_NAME = "lora_vs_full"
MATH_TASK = "elementary_math_qa/question_only"
CODE_BYTES = 3_500_000  # the CPython subset carried to the GPU
PROSE_CORPUS = "austen"  # held-out chapters; "shakespeare" when austen cannot be read


@dataclass(frozen=True)
class Variant:
    label: str
    method: str  # "full" | "lora"
    optimizer: str
    rank: int
    grid: tuple[float, ...]


def variants(quick: bool) -> list[Variant]:
    if quick:
        return [
            Variant("full", "full", "adamw", 0, (1e-3,)),
            Variant("lora_r4", "lora", "adamw", 4, (1e-2,)),
            Variant("lora_r32", "lora", "adamw", 32, (1e-2,)),  # > k/v width 16 of the tiny model: excluded
            Variant("lora_r4_rite", "lora", "lora_rite", 4, (3e-2,)),
        ]
    lora_grid = (3e-4, 1e-3, 3e-3)  # 10× full fine-tuning's (the paper: LoRA's best lr is 1-10× FFT's)
    return [
        Variant("full", "full", "adamw", 0, (3e-5, 1e-4, 3e-4)),
        Variant("lora_r16", "lora", "adamw", 16, lora_grid),
        Variant("lora_r64", "lora", "adamw", 64, lora_grid),
        Variant("lora_r256", "lora", "adamw", 256, lora_grid),
        Variant("lora_r16_rite", "lora", "lora_rite", 16, (3e-3, 1e-2, 3e-2)),
    ]


# ------------------------------------------------------------------------------------------ data
def data_dir(given: str | None) -> Path:
    """Where the prepared data is: ``--data``, ``$LORITE_CACHE/lora_vs_full`` (the GPU machine, after the
    lead copies ``.gpu/cache``) or this checkout's ``.gpu/cache/lora_vs_full``."""
    candidates = [Path(given)] if given else [cache_dir() / DATA_NAME, GPU_CACHE / DATA_NAME]
    for candidate in candidates:
        if (candidate / "meta.json").exists():
            return candidate
    raise SystemExit(f"no prepared data in {', '.join(map(str, candidates))}: run with --prepare first")


def prepare(dest: Path) -> None:
    """The code subset, the held-out prose and the commonsense task files, into ``dest`` and
    ``.gpu/cache/bigbench/tasks`` (the GPU machine has no network)."""
    documents = corpora.load_corpus("cpython")
    order = list(range(len(documents)))
    random.Random(0).shuffle(order)
    code, size = [], 0
    for i in order:
        if size + len(documents[i].text) > CODE_BYTES:
            continue
        code.append(documents[i])
        size += len(documents[i].text)
    code.sort(key=lambda d: d.title)
    prose_name = PROSE_CORPUS
    try:
        prose_docs = corpora.load_corpus(prose_name)
    except Exception as error:  # any failure to read austen: fall back, and say so
        print(f"austen unavailable ({error}); using shakespeare", file=sys.stderr)
        prose_name, prose_docs = "shakespeare", corpora.load_corpus("shakespeare")
    heldout = split_documents(prose_docs, seed=0).heldout  # whole documents: max(2, N // 10) of N
    dest.mkdir(parents=True, exist_ok=True)
    texts = {
        "code.json": json.dumps([d.__dict__ for d in code]),
        "prose.json": json.dumps([d.__dict__ for d in heldout]),
    }
    for name, text in texts.items():
        atomic_write_text(dest / name, text)
    tasks_dir = GPU_CACHE / "bigbench" / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    bigbench.load_tasks([MATH_TASK, *DEFAULT_COMMONSENSE])  # cached here (reads the sdist once)
    source = bigbench._cache_folder()
    for name in [MATH_TASK, *DEFAULT_COMMONSENSE]:
        file = name.replace("/", "__") + ".json"
        if not (tasks_dir / file).exists():
            shutil.copyfile(source / "tasks" / file, tasks_dir / file)
    if not (GPU_CACHE / "bigbench" / "index.json").exists():
        shutil.copyfile(source / "index.json", GPU_CACHE / "bigbench" / "index.json")
    digest = hashlib.sha256((texts["code.json"] + texts["prose.json"]).encode()).hexdigest()[:10]
    meta = {
        "digest": digest, "cpython": cpython_version(), "code_files": len(code), "code_chars": size,
        "prose_corpus": prose_name, "prose_documents": [d.title for d in heldout],
    }  # fmt: skip
    write_json(dest / "meta.json", meta)
    total = sum((dest / n).stat().st_size for n in texts) / 2**20
    print(f"prepared {dest}: {len(code)} CPython files ({size / 1e6:.2f} MB), {len(heldout)} {prose_name} "
          f"documents; {total:.1f} MiB; task files in {tasks_dir}")  # fmt: skip


def register_corpora(data: Path, quick: bool) -> tuple[str, str]:
    """Register the prepared code and prose as lorite corpora (names carry the data's digest, so a cached
    copy of another preparation is never read). Quick: the 40 smallest code files."""
    meta = json.loads((data / "meta.json").read_text())
    code_name = f"lvf_code_{meta['digest']}" + ("_quick" if quick else "")
    prose_name = f"lvf_prose_{meta['digest']}"

    def code():
        docs = [corpora.Document(**d) for d in json.loads((data / "code.json").read_text())]
        # quick: 40 files of 2-6 kB (a few held out; the tiny model reads them character by character)
        return [d for d in docs if 2000 <= len(d.text) <= 6000][:40] if quick else docs

    def prose():
        return [corpora.Document(**d) for d in json.loads((data / "prose.json").read_text())]

    corpora.CORPORA.setdefault(code_name, code)
    corpora.CORPORA.setdefault(prose_name, prose)
    return code_name, prose_name


# ------------------------------------------------------------------------------------------ plan
def target_modules(model_dir: Path, rank: int) -> str | list[str]:
    """All linear layers, less those narrower than ``rank`` (a rank-r factor of a narrower matrix only adds
    parameters: its ΔW rank is capped by the width anyway)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    widths = {
        "q_proj": min(hidden, heads * head_dim), "o_proj": min(hidden, heads * head_dim),
        "k_proj": min(hidden, config.get("num_key_value_heads", heads) * head_dim),
        "v_proj": min(hidden, config.get("num_key_value_heads", heads) * head_dim),
        "gate_proj": min(hidden, config["intermediate_size"]), "up_proj": min(hidden, config["intermediate_size"]),
        "down_proj": min(hidden, config["intermediate_size"]),
    }  # fmt: skip
    kept = [name for name, width in widths.items() if width >= rank]
    return "all-linear" if len(kept) == len(widths) else kept


def plan(args, model_dir: Path, code_task: str) -> tuple[list[dict], dict[str, dict]]:
    """The base-model jobs (one per target) and the run jobs, largest first."""
    quick = args.quick
    steps = args.steps or (4 if quick else 200)
    common = dict(
        model=args.model, steps=steps, batch_size=2 if quick else 16, save_every=max(1, steps // (2 if quick else 4)),
        eval_batch_size=16 if quick else 32, n_validation=16 if quick else 200, n_test=16 if quick else 400,
        max_length=64 if quick else 256, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    targets = {"code": {"task": code_task, "regime": "CPT"}, "math": {"task": MATH_TASK, "regime": "IFT"}}
    if args.only_targets:
        targets = {k: v for k, v in targets.items() if k in args.only_targets}
    base_jobs, run_jobs = [], []
    for target, info in targets.items():
        base_jobs.append({"kind": "base", "target": target, "config": {"task": info["task"], **common}})
        for variant in variants(quick):
            for lr in variant.grid:
                config = {
                    **common, "task": info["task"], "method": variant.method, "optimizer": variant.optimizer,
                    "lr": lr, "max_grad_norm": 1.0 if variant.optimizer == "adamw" else 0.0,
                }  # fmt: skip
                if variant.method == "lora":
                    config.update(
                        rank=variant.rank,
                        alpha=2.0 * variant.rank,
                        target_modules=target_modules(model_dir, variant.rank),
                    )
                run_jobs.append(
                    {
                        "kind": "run",
                        "target": target,
                        "variant": asdict(variant),
                        "lr": lr,
                        "config": config,
                        "dir": f"runs/{target}/{variant.label}/lr{lr:g}",
                    }
                )
    # full fine-tuning and high ranks take longest: start them first
    run_jobs.sort(key=lambda j: (j["variant"]["method"] != "full", -j["variant"]["rank"]))
    return base_jobs + run_jobs, targets


MAX_WIDENING = 2  # learning rates added beyond each edge of a grid, at most


def widen(jobs: list[dict], out: Path) -> list[dict]:
    """New run jobs for every (target, method) whose grid has finished with its best validation score at an
    edge: one learning rate beyond that edge (at most :data:`MAX_WIDENING` per side beyond the planned grid).
    Reads finished runs from disk, so a resumed invocation widens the same way."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for job in jobs:
        if job["kind"] == "run":
            groups.setdefault((job["target"], job["variant"]["label"]), []).append(job)
    added = []
    for group in groups.values():
        scores = {}
        for job in group:
            metrics = read_json(out / job["dir"] / "metrics.json")
            if metrics is None:
                break
            scores[job["lr"]] = -math.inf if metrics.get("diverged") else metrics["validation"]["score"]
        else:
            if len(scores) < 2:
                continue
            best = max(scores, key=lambda lr: (scores[lr], -lr))
            planned = group[0]["variant"]["grid"]
            if (
                best == max(scores)
                and best >= max(planned)
                and len([lr for lr in scores if lr > max(planned)]) < MAX_WIDENING
            ):
                lr = neighbour_lr(best, upward=True)
            elif (
                best == min(scores)
                and best <= min(planned)
                and len([lr for lr in scores if lr < min(planned)]) < MAX_WIDENING
            ):
                lr = neighbour_lr(best, upward=False)
            else:
                continue
            job = dict(group[0], lr=lr, config={**group[0]["config"], "lr": lr})
            job["dir"] = job["dir"].rsplit("/lr", 1)[0] + f"/lr{lr:g}"
            added.append(job)
    return added


# ------------------------------------------------------------------------------------------ one job
def forgetting_config(prose_name: str, quick: bool, device: str) -> dict:
    return asdict(
        ForgettingConfig(
            prose=prose_name, prose_split="all", prose_blocks=4 if quick else 64, block_length=64 if quick else 256,
            n_examples=8 if quick else 200, device=device, batch_size=16 if quick else 32,
        )
    )  # fmt: skip


def run_job(job: dict, out: str, data: str, quick: bool, keep_snapshots: bool) -> dict:
    """One job, in a worker process: the base model's evaluation, or a run (train → forgetting across its
    snapshots → spectrum of its final ΔW and, for full fine-tuning, of its snapshots). Finished parts are
    read back from disk, not redone."""
    if not torch.cuda.is_available() or quick:
        torch.set_num_threads(1 if quick else 2)
    _, prose_name = register_corpora(Path(data), quick)
    out = Path(out)
    began = time.time()
    config = FinetuneConfig(**job["config"])
    evaluator = ForgettingEvaluator(
        ForgettingConfig(**forgetting_config(prose_name, quick, config.device)), progress=False
    )
    if job["kind"] == "base":
        path = out / f"base_{job['target']}.json"
        if (point := read_json(path)) is not None:
            return point
        point = evaluator.evaluate_base(asdict(config))
        model, tokenizer = load_causal_lm(config.model, device=evaluator.device)
        test = evaluate(
            model, tokenizer, evaluator.target_data(asdict(config), tokenizer)[1], "test", config, False
        )
        point["test"] = {k: v for k, v in test.items() if k != "samples"}
        point["seconds"] = time.time() - began
        write_json(path, point)
        return point

    run_dir = out / job["dir"]
    if not (run_dir / "metrics.json").exists():
        if run_dir.exists():  # an interrupted earlier attempt (no checkpoints): start over
            shutil.rmtree(run_dir)
        finetune(config, out=run_dir, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not (run_dir / "forgetting.json").exists() and not metrics.get("diverged"):
        write_json(run_dir / "forgetting.json", evaluator.evaluate_run(run_dir))
    if not (run_dir / "spectrum" / "spectrum.json").exists() and not metrics.get("diverged"):
        kind = {"tuned": run_dir} if config.method == "full" else {"adapter": run_dir}
        spectrum = analyze_spectrum(base=config.model, device=config.device, **kind)
        by_step = {}
        for snapshot in sorted((run_dir / "snapshots").glob("step_*")) if config.method == "full" else []:
            step_result = analyze_spectrum(base=config.model, tuned=snapshot, device=config.device)
            by_step[int(snapshot.name[5:])] = {k: v["rank_mean"] for k, v in step_result["modules"].items()}
        by_step[config.steps] = {k: v["rank_mean"] for k, v in spectrum["modules"].items()}
        write_spectrum_report(spectrum, run_dir / "spectrum")
        write_json(run_dir / "spectrum" / "rank_by_step.json", by_step)
    if config.method == "full" and not keep_snapshots:  # 0.5 GB each: the curves and spectra are computed
        for snapshot in (run_dir / "snapshots").glob("step_*"):
            shutil.rmtree(snapshot, ignore_errors=True)
    return {"dir": job["dir"], "seconds": time.time() - began}


# ------------------------------------------------------------------------------------------ summary
def _target_value(entry: dict | None) -> tuple[str, float] | None:
    if not entry:
        return None
    for name in ("perplexity", "accuracy"):
        if name in entry:
            return name, entry[name]
    return None


def collect(out: Path, jobs: list[dict], targets: dict) -> dict:
    """Everything finished so far, read from disk; best learning rate per (target, method) on validation."""
    results: dict[str, Any] = {"targets": {}}
    for target, info in targets.items():
        base = read_json(out / f"base_{target}.json")
        entry: dict[str, Any] = {"task": info["task"], "regime": info["regime"], "base": base, "methods": {}}
        for job in jobs:
            if job["kind"] != "run" or job["target"] != target:
                continue
            label = job["variant"]["label"]
            method = entry["methods"].setdefault(label, {"variant": job["variant"], "grid": {}, "runs": {}})
            run_dir = out / job["dir"]
            metrics = read_json(run_dir / "metrics.json")
            score = None
            if metrics is not None:
                score = -math.inf if metrics.get("diverged") else metrics["validation"]["score"]
            method["grid"][f"{job['lr']:g}"] = score
            method["runs"][f"{job['lr']:g}"] = {
                "dir": job["dir"], "metrics": metrics, "forgetting": read_json(run_dir / "forgetting.json"),
                "spectrum": read_json(run_dir / "spectrum" / "spectrum.json"),
                "rank_by_step": read_json(run_dir / "spectrum" / "rank_by_step.json"),
            }  # fmt: skip
        for method in entry["methods"].values():
            finished = {lr: s for lr, s in method["grid"].items() if s is not None}
            if not finished:
                continue
            best = max(finished, key=lambda lr: (finished[lr], -float(lr)))
            method["best_lr"] = best
            method["complete_grid"] = len(finished) == len(method["grid"])
            method["best_at_grid_edge"] = len(method["grid"]) > 1 and best in (
                min(method["grid"], key=float),
                max(method["grid"], key=float),
            )
            method["best"] = best_row(method["runs"][best], base)
        results["targets"][target] = entry
    return results


def best_row(run: dict, base: dict | None) -> dict:
    """Target gain, forgetting and ΔW rank of one run (relative to the base model where it exists)."""
    row: dict[str, Any] = {"dir": run["dir"]}
    metrics = run["metrics"] or {}
    test = _target_value(metrics.get("test"))
    base_test = _target_value((base or {}).get("test"))
    if test:
        row["test_metric"], row["test"] = test
        if base_test:
            if test[0] == "perplexity":
                row["gain"] = math.log(base_test[1]) - math.log(test[1])  # nats per token
            else:
                row["gain"] = test[1] - base_test[1]
    forgetting = run["forgetting"]
    if forgetting and forgetting["points"]:
        final = forgetting["points"][-1]["source"]
        row["forgetting_score"] = final["forgetting_score"]
        row["prose_perplexity"] = final.get("prose_perplexity")
        if base:
            source = base["source"]
            if final["forgetting_score"] is not None and source["forgetting_score"] is not None:
                row["forgetting_delta"] = final["forgetting_score"] - source["forgetting_score"]
            if final.get("prose_perplexity") and source.get("prose_perplexity"):
                row["prose_nats_delta"] = math.log(final["prose_perplexity"]) - math.log(
                    source["prose_perplexity"]
                )
    spectrum = run["spectrum"]
    if spectrum:
        modules = spectrum["modules"]
        row["rank90"] = {m: v["rank_mean"] for m, v in modules.items()}
        row["rank90_over_random"] = statistics.fmean(v["rank_over_random"] for v in modules.values())
        row["random_rank90"] = {m: v["random_rank"] for m, v in modules.items()}
    row["trainable_parameters"] = metrics.get("trainable_parameters")
    row["seconds_per_step"] = metrics.get("seconds_per_step")
    return row


def summary_markdown(results: dict, args, elapsed: float) -> str:
    lines = [
        "# LoRA vs full fine-tuning on SmolLM2-135M-Instruct (issue 9)",
        "",
        f"`{command_line()}` — this invocation: {elapsed / 60:.1f} min (runs finished by earlier invocations "
        "with the same --out are read back, not redone). Best learning rate per method on validation; "
        "test metrics at that rate. Gain: code = drop of held-out CPython test loss in nats/token (ln ppl_base − "
        "ln ppl); math = test accuracy − base. Forgetting score = mean length-normalised accuracy on the three "
        "commonsense tasks at the end of training (Δ vs base; higher = less forgetting); prose = change of the "
        "held-out Austen loss in nats/token (lower = less forgetting). rank90 = mean over layers of the rank "
        "explaining 90% of ΔW's variance (σ²); ratio = ΔW rank90 / same-shape Gaussian rank90, averaged.",
    ]
    for target, entry in results["targets"].items():
        base = entry.get("base") or {}
        base_test = _target_value(base.get("test"))
        lines += [
            "",
            f"## {target} ({entry['regime']}: `{entry['task']}`)",
            "",
            f"Base model: test {base_test[0]} {base_test[1]:.4g}" if base_test else "Base model: pending",
        ]
        if base.get("source"):
            lines[-1] += (
                f"; forgetting score {fmt(base['source']['forgetting_score'], '.1f', 100)}; prose ppl "
                f"{fmt(base['source'].get('prose_perplexity'), '.2f')}"
            )
        header = [
            "method", "validation score per lr", "best lr", "test", "gain", "forgetting score (Δ)", "prose Δ nats",
            "rank90 q / k / v / o / gate / up / down", "ratio", "trainable", "s/step",
        ]  # fmt: skip
        rows = []
        for label, method in entry["methods"].items():
            grid = ", ".join(f"{lr}: {_score(s)}" for lr, s in method["grid"].items())
            best = method.get("best")
            if not best:
                rows.append([label, grid, "pending", *[""] * (len(header) - 3)])
                continue
            ranks = best.get("rank90") or {}
            order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            cells = [next((fmt(v, ".0f") for m, v in ranks.items() if m.endswith(o)), DASH) for o in order]
            edge = " (edge)" if method.get("best_at_grid_edge") else ""
            rows.append([
                label, grid, f"{method['best_lr']}{edge}", fmt(best.get("test"), ".4g"),
                fmt(best.get("gain"), "+.4f"),
                f"{fmt(best.get('forgetting_score'), '.1f', 100)} ({fmt(best.get('forgetting_delta'), '+.1f', 100)})",
                fmt(best.get("prose_nats_delta"), "+.4f"), " / ".join(cells),
                fmt(best.get("rank90_over_random"), ".3f"), fmt(best.get("trainable_parameters"), ",.0f"),
                fmt(best.get("seconds_per_step"), ".3f"),
            ])  # fmt: skip
        lines += ["", markdown_table(header, rows).rstrip("\n")]
        random_ranks = next(
            (
                m["best"]["random_rank90"]
                for m in entry["methods"].values()
                if m.get("best", {}).get("random_rank90")
            ),
            None,
        )
        if random_ranks:
            lines.append("")
            lines.append(
                "Gaussian rank90 per module: "
                + ", ".join(f"{m.split('.')[-1]} {r}" for m, r in random_ranks.items())
            )
    return "\n".join(lines) + "\n"


def _score(score: float | None) -> str:
    """A validation score in the grid column: a diverged run's -inf stays visible (not a dash)."""
    return "-inf" if score == -math.inf else fmt(score, ".4g")


def forgetting_result(results: dict, prose_name: str, quick: bool, best_only: bool) -> dict:
    """The shape :func:`lorite.analysis.forgetting.write_forgetting_report` plots."""
    combined: dict[str, Any] = {
        "config": forgetting_config(prose_name, quick, "auto"),
        "base": {},
        "runs": {},
    }
    combined["config"]["prose"] = "Austen/held-out prose"
    for target, entry in results["targets"].items():
        base = entry.get("base")
        if not base:
            continue
        combined["base"][target] = base
        for label, method in entry["methods"].items():
            for lr, run in method["runs"].items():
                if best_only and lr != method.get("best_lr"):
                    continue
                if run["forgetting"] and run["forgetting"]["points"]:
                    combined["runs"][f"{target}/{label}/lr{lr}"] = {**run["forgetting"], "base": target}
    return combined


def plot_ranks(results: dict, path: Path) -> None:
    """Per target: ΔW rank90 by module for each method (best lr), Gaussian reference as a black tick; and
    full fine-tuning's rank90 against training steps."""
    targets = [
        t
        for t, e in results["targets"].items()
        if any(m.get("best", {}).get("rank90") for m in e["methods"].values())
    ]
    if not targets:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(targets), 2, figsize=(13, 4.2 * len(targets)), squeeze=False)
    for row, target in enumerate(targets):
        methods = {
            k: m for k, m in results["targets"][target]["methods"].items() if m.get("best", {}).get("rank90")
        }
        modules = list(next(iter(methods.values()))["best"]["random_rank90"])
        width = 0.8 / len(methods)
        ax = axes[row][0]
        for k, (label, method) in enumerate(methods.items()):
            ranks = [method["best"]["rank90"].get(m, 0) for m in modules]
            ax.bar(
                [i + k * width for i in range(len(modules))],
                ranks,
                width,
                label=f"{label} (lr {method['best_lr']})",
            )
        for i, module in enumerate(modules):
            reference = next(iter(methods.values()))["best"]["random_rank90"][module]
            ax.plot([i - width / 2, i + 0.8 - width / 2], [reference] * 2, "k-", linewidth=1.5)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modules))], [m.split(".")[-1] for m in modules])
        ax.set(ylabel="ΔW rank90 (mean over layers)", title=f"{target}: rank of ΔW (black: Gaussian)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        full = methods.get("full")
        if full:
            by_step = full["runs"][full["best_lr"]].get("rank_by_step") or {}
            steps = sorted(by_step, key=int)
            for module in modules:
                ax.plot(
                    [int(s) for s in steps],
                    [by_step[s].get(module) for s in steps],
                    marker=".",
                    label=module.split(".")[-1],
                )
        ax.set(
            xlabel="step", ylabel="ΔW rank90", title=f"{target}: full fine-tuning's rank90 during training"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(out: Path, jobs: list[dict], targets: dict, args, began: float, prose_name: str) -> dict:
    results = collect(out, jobs, targets)
    results["settings"] = {
        "argv": sys.argv,
        "quick": args.quick,
        "jobs": args.jobs,
        "elapsed_s": time.time() - began,
    }
    write_json(out / "results.json", results)
    atomic_write_text(out / "summary.md", summary_markdown(results, args, time.time() - began))
    for best_only, name in ((True, "best"), (False, "all")):
        combined = forgetting_result(results, prose_name, args.quick, best_only)
        if combined["runs"]:
            folder = out / f"forgetting_{name}"
            paths = write_forgetting_report(combined, folder)
            if "plot" in paths:
                shutil.copyfile(paths["plot"], out / f"learning_vs_forgetting_{name}.png")
    plot_ranks(results, out / "rank90.png")
    return results


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--prepare", action="store_true", help="write the data into .gpu/cache (here, once)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on a tiny random model")
    parser.add_argument("--data", default=None, help="prepared data dir (default: found automatically)")
    parser.add_argument("--model", default=None, help="default SmolLM2-135M-Instruct")
    parser.add_argument(
        "--jobs", type=int, default=None, help="processes sharing the GPU (default 6; quick 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 200; quick 4)")
    parser.add_argument("--targets", default="code,math", help="subset of code,math")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=480,
        help="seconds; no new job starts after it (running ones finish)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--keep-snapshots", action="store_true", help="keep full fine-tuning's snapshot models"
    )
    args = parser.parse_args(argv)
    args.only_targets = [t for t in args.targets.split(",") if t]
    if args.prepare:
        prepare(GPU_CACHE / DATA_NAME)
        if not args.out:
            return 0
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    data = data_dir(args.data)
    if args.quick:
        args.model, args.device = str(quick_model(out / "tiny_model")), "cpu"
    args.jobs = args.jobs or (1 if args.quick else 6)
    code_name, prose_name = register_corpora(data, args.quick)
    jobs, targets = plan(args, resolve_model_dir(args.model), f"corpus:{code_name}")
    while extra := widen(jobs, out):  # a resumed run: grids that finished at an edge, widened as before
        jobs += extra
    print(f"{len(jobs)} jobs ({args.jobs} at a time), output in {out}", flush=True)

    def echo(line: str) -> None:
        print(line, flush=True)

    def call(job: dict) -> tuple:
        return (job, str(out), str(data), args.quick, args.keep_snapshots)

    def on_done(arguments: tuple, result: Any, error: BaseException | None) -> list[tuple]:
        """Widen the grids that finished at an edge (the new runs go ahead of the rest: the method's grid
        is not finished without them) and rewrite the outputs."""
        extra = widen(jobs, out)  # a job added here is in `jobs`, unfinished: never added twice
        for job in extra:
            echo(f"widening: {job['dir']} (best lr at a grid edge)")
        jobs.extend(extra)
        write_outputs(out, jobs, targets, args, began, prose_name)
        return [call(job) for job in extra]

    # no new job starts after --time-limit (counted from the start of this invocation); running ones finish
    run_calls(
        run_job, [call(job) for job in jobs], args.jobs, args.time_limit - (time.time() - began),
        name=lambda arguments: arguments[0].get("dir", f"base {arguments[0]['target']}"),
        on_done=on_done, echo=echo,
    )  # fmt: skip
    results = write_outputs(out, jobs, targets, args, began, prose_name)
    print((out / "summary.md").read_text())
    print(f"{time.time() - began:.0f} s; results in {out}")
    return 0 if results["targets"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
