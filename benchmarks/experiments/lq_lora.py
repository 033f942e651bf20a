"""LQ-LoRA experiment (issue 10): SmolLM2-135M quantized at 2.5, 3 and 4 bits per parameter three ways —

* ``qlora``: NF quantization of W with zero-init LoRA (QLoRA-style; formats chosen by the same ILP, on the
  plain quantization error),
* ``lq``: LQ-LoRA, W ≈ Q + L1·L2 (arXiv 2311.12023), formats chosen by the ILP on the decomposition error,
* ``lq_fisher``: LQ-LoRA with the Fisher-weighted decomposition (calibration: Shakespeare training blocks),

each measured by held-out perplexity (Shakespeare documents never used for calibration) and dev-task test
accuracy before and after a short fine-tune (LoRA rank 64 over the frozen quantized Q, AdamW) on one BIG-bench
dev task, with the time to quantize (Fisher + cost table over the format grid + ILP + final decomposition).
The unquantized model (and plain LoRA on it) is the reference.

    python benchmarks/experiments/lq_lora.py --prepare-data            # here, once: tokenized Shakespeare → .gpu/cache
    python benchmarks/experiments/lq_lora.py --out runs/lq_lora        # GPU, ~6-8 min wall on a shared H100
    python benchmarks/experiments/lq_lora.py --out /tmp/lq --quick     # CPU smoke test (tiny random model), ~1-2 min

Work runs as worker processes of this script (``--jobs`` at once): one per method for the quantization (the
cost table is shared by the three budgets; a budget's fine-tune starts as soon as its model is saved), one
per fine-tune, one for the reference. Each worker writes ``parts/*.json``; ``results.json``, ``summary.md``
and the plots are rewritten whenever a part arrives, so a time-out (``--deadline``) still leaves numbers.
Parts that exist are not redone when the experiment is started again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (
    GPU_CACHE,
    Job,
    fmt,
    markdown_table,
    pyplot,
    quick_model,
    quick_task,
    read_json,
    run_jobs,
    save_figure,
    worker_command,
    write_json,
)
from safetensors.torch import load_file, save_file

from lorite.adapters.lq_lora import (
    LQLoRAConfig,
    apply_lq_lora,
    cost_table,
    decompose_matrices,
    estimate_fisher,
    load_lq_lora,
    save_lq_lora,
    storage_report,
    target_linears,
)
from lorite.cache import atomic_write_text, cache_dir
from lorite.models import load_causal_lm
from lorite.runtime import pick_device
from lorite.tasks import calibration_batches, heldout_blocks, load_task, split_examples
from lorite.tasks.evaluation import evaluate_task, perplexity
from lorite.train.finetune import FinetuneConfig, finetune

DATA_FILE = Path("lq_lora") / "shakespeare_blocks.safetensors"  # under $LORITE_CACHE (or .gpu/cache)
METHODS = {
    "qlora": {"init": "zero", "fisher": False, "label": "NF-quant + zero-init LoRA (QLoRA-style)"},
    "lq": {"init": "lq", "fisher": False, "label": "LQ-LoRA"},
    "lq_fisher": {"init": "lq", "fisher": True, "label": "LQ-LoRA + Fisher"},
}
QUICK_GRID = "nf2-b64-s8x256-fp32,nf3-b64-s8x256-fp32,nf4-b64-s8x256-fp32"


# ------------------------------------------------------------------------------------------ settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lq_lora")
    p.add_argument("--quick", action="store_true", help="CPU smoke test on a tiny random model")
    p.add_argument("--prepare-data", action="store_true", help="tokenize the data into .gpu/cache and exit")
    p.add_argument("--budgets", default="2.5,3,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--task", default="social_iqa")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--grid", default="compact")
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks of 512 tokens")
    p.add_argument("--calib", type=int, default=128, help="calibration blocks of 256 tokens (Fisher)")
    p.add_argument("--n-validation", type=int, default=200)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--jobs", type=int, default=6, help="worker processes at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--deadline", type=float, default=560.0, help="seconds; then stop workers and summarise")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the jobs one after another in this process (--quick does)",
    )
    p.add_argument("--subprocesses", action="store_true", help="worker processes even with --quick")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rank, args.grid, args.max_iter, args.steps, args.batch_size = 4, QUICK_GRID, 3, 3, 4
        args.eval_blocks, args.calib, args.n_validation, args.n_test = 2, 4, 8, 8
        args.jobs, args.threads, args.device = 2, 1, "cpu"
        args.in_process = not args.subprocesses
    return args


def budgets(args) -> list[float]:
    return [float(b) for b in args.budgets.split(",")]


def run_id(method: str, budget: float) -> str:
    return f"{method}@{budget:g}"


# ------------------------------------------------------------------------------------------ data
def prepare_data(n_heldout: int = 64, n_calib: int = 128) -> Path:
    """Tokenize held-out Shakespeare blocks (512 tokens; the documents ``lorite finetune --task
    corpus:shakespeare`` holds out) and calibration blocks (256 tokens of the training documents) with
    SmolLM2's tokenizer into ``$LORITE_CACHE/lq_lora`` and ``.gpu/cache/lq_lora`` (the device has no
    corpus download)."""
    _, tokenizer = load_causal_lm(None)
    heldout = heldout_blocks(tokenizer, "shakespeare", 512, n_heldout)
    calib = torch.cat(
        [e["input_ids"] for e in calibration_batches("corpus:shakespeare", tokenizer, n_calib, 256)]
    )
    target = cache_dir() / DATA_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file({"heldout": heldout.int().contiguous(), "calib": calib.int().contiguous()}, str(tmp))
    os.replace(tmp, target)
    mirror = GPU_CACHE / DATA_FILE
    mirror.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(target, mirror)
    print(f"held-out {tuple(heldout.shape)}, calibration {tuple(calib.shape)} → {target} and {mirror}")
    return target


_BLOCKS: dict = {}


def load_blocks(args, tokenizer):
    """``(heldout (N, L), calib (M, L'))`` token blocks: the prepared file (SmolLM2), or built from the
    cached corpus with ``tokenizer`` in quick mode (once per process)."""
    if "blocks" in _BLOCKS:
        return _BLOCKS["blocks"]
    if args.quick:
        heldout = heldout_blocks(tokenizer, "shakespeare", 128, args.eval_blocks)
        calib = torch.cat(
            [e["input_ids"] for e in calibration_batches("corpus:shakespeare", tokenizer, args.calib, 64)]
        )
        _BLOCKS["blocks"] = heldout, calib
        return heldout, calib
    path = cache_dir() / DATA_FILE
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: run `python benchmarks/experiments/lq_lora.py --prepare-data` (with network)"
        )
    data = load_file(str(path))
    return data["heldout"][: args.eval_blocks].long(), data["calib"][: args.calib].long()


def quick_inputs(out: Path) -> tuple[str, str]:
    """A tiny random model directory and a tiny task (the tests' helpers), made once: the orchestrator
    makes them before any worker starts, and workers only read them."""
    model = quick_model(out / "inputs" / "model", hidden=64)
    task = out / "inputs" / "task.json"
    return str(model), f"file:{task}" if task.exists() else quick_task(task, n=80)


# ------------------------------------------------------------------------------------------ workers
def _setup(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return pick_device(args.device)


def _model_and_task(args):
    """``(model_spec, task_spec)``: the real ones, or the quick tiny ones."""
    if args.quick:
        return quick_inputs(Path(args.out))
    return None, args.task


def _test_examples(task_spec: str, args):
    task = load_task(task_spec)
    return task, split_examples(task, 0, args.n_validation, args.n_test).test


def _write_part(args, name: str, data: dict) -> None:
    write_json(Path(args.out) / "parts" / f"{name}.json", data)


def _settings(args, method: str):
    return LQLoRAConfig(  # the budget is set per run; the cost table does not depend on it
        budget=budgets(args)[0], rank=args.rank, alpha=args.alpha, init=METHODS[method]["init"], grid=args.grid,
        max_iter=args.max_iter, rtol=args.rtol,
    )  # fmt: skip


def worker_reference(args) -> None:
    """The unquantized model: held-out perplexity and zero-shot test accuracy."""
    device = _setup(args)
    model_spec, task_spec = _model_and_task(args)
    model, tokenizer = load_causal_lm(model_spec, device=device)
    heldout, _ = load_blocks(args, tokenizer)
    task, test = _test_examples(task_spec, args)
    _write_part(args, "reference", {
        "perplexity": perplexity(model, heldout, 8),
        "test_accuracy": evaluate_task(model, tokenizer, task, test, 32)["accuracy"],
        "parameters": sum(p.numel() for p in model.parameters()),
    })  # fmt: skip


def worker_quantize(args, method: str) -> None:
    """Fisher (lq_fisher) → cost table over the grid → for each budget: ILP, final decomposition, save the
    quantized model, perplexity and accuracy before fine-tuning."""
    device = _setup(args)
    model_spec, task_spec = _model_and_task(args)
    model, tokenizer = load_causal_lm(model_spec, device=device)
    heldout, calib = load_blocks(args, tokenizer)
    task, test = _test_examples(task_spec, args)
    settings = _settings(args, method)
    layers = target_linears(model, settings.target_modules)
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    fisher, fisher_s = None, 0.0
    if METHODS[method]["fisher"]:
        began = time.perf_counter()
        examples = [
            {"input_ids": b[None], "attention_mask": torch.ones_like(b[None]), "labels": b[None]}
            for b in calib
        ]
        fisher = estimate_fisher(model, examples, layers, progress=False)
        fisher_s = time.perf_counter() - began
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    table = cost_table(weights, settings, fisher, progress=True)
    sync()
    costs_s = time.perf_counter() - began
    _write_part(args, f"costs_{method}", {
        "names": table.names, "grid": [c.name for c in table.grid], "costs": table.costs,
        "numels": table.numels, "fisher_s": fisher_s, "costs_s": costs_s,
    })  # fmt: skip
    for budget in budgets(args):
        name = run_id(method, budget)
        if (Path(args.out) / "parts" / f"quant_{name}.json").exists():
            continue
        began = time.perf_counter()
        plan = table.plan(budget)
        ilp_s = time.perf_counter() - began
        began = time.perf_counter()
        decompositions = decompose_matrices(weights, plan.configs, settings, fisher, progress=False)
        sync()
        final_s = time.perf_counter() - began
        errors = [
            float((weights[n].float() - d.reconstruction().to(device)).norm())
            for n, d in decompositions.items()
        ]
        norms = [float(weights[n].float().norm()) for n in decompositions]
        quantized = apply_lq_lora(
            copy.deepcopy(model), decompositions, replace(settings, budget=budget), model_spec
        )
        save_lq_lora(quantized, Path(args.out) / "models" / name)
        storage = storage_report(quantized)
        _write_part(args, f"quant_{name}", {
            "method": method, "budget": budget, "bits_per_param": plan.bits_per_param,
            "bits_per_param_with_lora": storage["bits_per_param_with_lora"],
            "relative_error": math.sqrt(sum(e * e for e in errors) / sum(n * n for n in norms)),
            "format_counts": _counts(plan.configs.values()), "solver": plan.allocation.status,
            "perplexity_before": perplexity(quantized, heldout, 8),
            "test_accuracy_before": evaluate_task(quantized, tokenizer, task, test, 32)["accuracy"],
            "fisher_s": fisher_s, "costs_s": costs_s, "ilp_s": ilp_s, "final_s": final_s,
            "quantize_s": fisher_s + costs_s + ilp_s + final_s,
        })  # fmt: skip
        del quantized
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _counts(configs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for config in configs:
        counts[config.name] = counts.get(config.name, 0) + 1
    return dict(sorted(counts.items()))


def worker_finetune(args, name: str) -> None:
    """Fine-tune ``name`` (``method@budget`` over its saved quantized model, or ``fp``: plain LoRA on the
    unquantized model) with lorite's loop; then held-out perplexity of the saved result."""
    device = _setup(args)
    model_spec, task_spec = _model_and_task(args)
    run_dir = Path(args.out) / "finetune" / name
    if run_dir.exists():  # an earlier attempt that did not finish: start over
        shutil.rmtree(run_dir)
    common = dict(
        task=task_spec, model=model_spec, optimizer=args.optimizer, lr=args.lr, rank=args.rank, alpha=args.alpha,
        steps=args.steps, batch_size=args.batch_size, n_validation=args.n_validation, n_test=args.n_test,
        eval_batch_size=32, max_length=256 if args.quick else 512, device=str(device),
    )  # fmt: skip
    if name == "fp":
        config = FinetuneConfig(method="lora", **common)
    else:
        config = FinetuneConfig(
            method="lq_lora", method_args={"quantized": str(Path(args.out) / "models" / name)}, **common
        )
    results = finetune(config, out=run_dir, progress=False)
    if name == "fp":
        from peft import PeftModel  # peft is heavy: only the plain-LoRA reference run loads it directly

        base, tokenizer = load_causal_lm(model_spec, device=device)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).to(device)
    else:
        model, tokenizer = load_lq_lora(run_dir / "lq_lora", device=device)
    heldout, _ = load_blocks(args, tokenizer)
    losses = results["history"]["loss"]
    _write_part(args, f"ft_{name}", {
        "validation_accuracy": results["validation"].get("accuracy"), "test_accuracy": results["test"]["accuracy"],
        "perplexity_after": perplexity(model, heldout, 8), "seconds_per_step": results["seconds_per_step"],
        "loss_first5": sum(losses[:5]) / len(losses[:5]), "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
    })  # fmt: skip


# ------------------------------------------------------------------------------------------ summary
def summarize(args, plots: bool = True) -> dict:
    out = Path(args.out)
    parts = {p.stem: read_json(p) for p in sorted((out / "parts").glob("*.json"))}
    parts = {name: part for name, part in parts.items() if part is not None}
    reference = parts.get("reference", {})
    runs = {}
    for method in args.methods.split(","):
        for budget in budgets(args):
            name = run_id(method, budget)
            entry = {"method": method, "label": METHODS[method]["label"], "budget": budget}
            entry.update(parts.get(f"quant_{name}", {}))
            entry.update(parts.get(f"ft_{name}", {}))
            runs[name] = entry
    results = {
        "setup": {k: v for k, v in vars(args).items() if k != "worker"},
        "reference": {**reference, **{f"finetuned_{k}": v for k, v in parts.get("ft_fp", {}).items()}},
        "runs": runs,
        "costs": {k[len("costs_"):]: {"fisher_s": v["fisher_s"], "costs_s": v["costs_s"]} for k, v in parts.items() if k.startswith("costs_")},
    }  # fmt: skip
    write_json(out / "results.json", results)
    atomic_write_text(out / "summary.md", markdown(results))
    if plots:
        plot(results, out)
    return results


def markdown(results: dict) -> str:
    setup, ref = results["setup"], results["reference"]
    lines = [
        "# LQ-LoRA experiment",
        "",
        f"Model {'tiny random (quick)' if setup['quick'] else 'SmolLM2-135M-Instruct'}, rank {setup['rank']}, "
        f"grid {setup['grid']}, fine-tune {setup['steps']} steps × batch {setup['batch_size']} on "
        f"{'a tiny task (quick)' if setup['quick'] else setup['task']} "
        f"({setup['optimizer']}, lr {setup['lr']:g}); held-out perplexity on {setup['eval_blocks']} Shakespeare "
        "blocks; test accuracy on the task's test split.",
        "",
        f"Unquantized: perplexity {fmt(ref.get('perplexity'), '.3f')}, zero-shot test accuracy "
        f"{fmt(ref.get('test_accuracy'), '.3f')}; plain LoRA fine-tuned: perplexity "
        f"{fmt(ref.get('finetuned_perplexity_after'), '.3f')}, test accuracy {fmt(ref.get('finetuned_test_accuracy'), '.3f')}.",
        "",
    ]
    header = ["method", "budget", "bits/param Q", "with LoRA", "rel. error", "ppl before", "ppl after",
              "acc before", "acc after", "quantize s"]  # fmt: skip
    columns = (("bits_per_param", ".3f"), ("bits_per_param_with_lora", ".2f"), ("relative_error", ".4f"),
               ("perplexity_before", ".3f"), ("perplexity_after", ".3f"), ("test_accuracy_before", ".3f"),
               ("test_accuracy", ".3f"), ("quantize_s", ".1f"))  # fmt: skip
    rows = [
        [run["label"], f"{run['budget']:g}", *(fmt(run.get(key), spec) for key, spec in columns)]
        for run in results["runs"].values()
    ]
    lines += [markdown_table(header, rows).rstrip("\n")]
    lines += ["", "Time to quantize = Fisher + cost table (every matrix × every format; shared by the budgets) + "
              "ILP + final decomposition. Formats chosen:", ""]  # fmt: skip
    for name, run in results["runs"].items():
        if run.get("format_counts"):
            lines.append(f"- {name}: " + ", ".join(f"{n}× {k}" for k, n in run["format_counts"].items()))
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (axes[0], "perplexity_before", "perplexity_after"),
        (axes[1], "test_accuracy_before", "test_accuracy"),
    )
    for color, method in zip(("C0", "C1", "C2"), METHODS):
        runs = [r for r in results["runs"].values() if r["method"] == method]
        for ax, key_before, key_after in panels:
            for key, style, when in ((key_before, "-o", "before"), (key_after, "--s", "after fine-tune")):
                points = [(r["budget"], r[key]) for r in runs if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, label=f"{METHODS[method]['label']} ({when})")
    ref = results["reference"]
    for ax, key in ((axes[0], "perplexity"), (axes[1], "test_accuracy")):
        if ref.get(key) is not None:
            ax.axhline(ref[key], color="gray", lw=1, label="unquantized")
    axes[0].set(
        xlabel="budget (bits/param of Q)", ylabel="held-out perplexity", yscale="log", title="perplexity"
    )
    task = "tiny task (quick)" if results["setup"]["quick"] else results["setup"]["task"]
    axes[1].set(xlabel="budget (bits/param of Q)", ylabel="test accuracy", title=task)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "lq_lora.png")


# ------------------------------------------------------------------------------------------ scheduler
def jobs(args) -> list[tuple[str, list[Path]]]:
    """``(job, files it needs)`` in launch order: quantization first (longest), then the rest."""
    out = Path(args.out) / "parts"
    methods = args.methods.split(",")
    todo = [(f"quantize:{m}", []) for m in methods]
    todo += [("reference", []), ("finetune:fp", [])]
    todo += [
        (f"finetune:{run_id(m, b)}", [out / f"quant_{run_id(m, b)}.json"])
        for b in budgets(args)
        for m in methods
    ]
    return todo


def done(args, job: str) -> bool:
    parts = Path(args.out) / "parts"
    kind, _, name = job.partition(":")
    if kind == "quantize":
        return all((parts / f"quant_{run_id(name, b)}.json").exists() for b in budgets(args))
    if kind == "reference":
        return (parts / "reference.json").exists()
    return (parts / f"ft_{name}.json").exists()


def run_job(args, job: str) -> None:
    kind, _, name = job.partition(":")
    if kind == "reference":
        worker_reference(args)
    elif kind == "quantize":
        worker_quantize(args, name)
    elif kind == "finetune":
        worker_finetune(args, name)
    else:
        raise SystemExit(f"unknown worker {job!r}")


def orchestrate_in_process(args) -> None:
    """The jobs one after another in this process (no interpreter start-up per job): the CPU smoke test."""
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    began = time.time()
    for job, needs in jobs(args):
        if done(args, job):
            continue
        if not all(n.exists() for n in needs):
            print(f"skipping {job}: its inputs are missing", flush=True)
            continue
        try:
            run_job(args, job)
            print(f"[{time.time() - began:6.0f}s] {job} done", flush=True)
        except Exception:  # one failed job must not lose the others' numbers
            traceback.print_exc()
            print(f"[{time.time() - began:6.0f}s] {job} FAILED", flush=True)
        summarize(args, plots=False)


def orchestrate(args, argv: list[str]) -> None:
    """Every job not done yet as a worker process of this script (``--jobs`` at once); a fine-tune starts
    as soon as its quantized model is saved. The summary is rewritten whenever a part arrives; at the
    deadline the running workers are stopped and what they wrote stays."""
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if args.quick:
        quick_inputs(out)  # once, before workers race to build it
    began = time.time()
    forwarded = [a for a in argv if a != "--worker"]
    pending = [
        Job(
            name=job,
            command=worker_command(__file__, *forwarded, "--worker", job),
            log=out / "logs" / f"{job.replace(':', '_')}.log",
            threads=args.threads,
            needs=tuple(needs),
        )
        for job, needs in jobs(args)
        if not done(args, job)
    ]
    seen = -1

    def on_tick() -> None:  # a new part: rewrite the summary
        nonlocal seen
        count = len(list((out / "parts").glob("*.json")))
        if count != seen:
            seen = count
            summarize(args)

    run_jobs(
        pending,
        args.jobs,
        args.deadline,
        poll=1.0,
        on_tick=on_tick,
        echo=lambda line: print(line, flush=True),
    )
    report(args, began)


def report(args, began: float) -> None:
    out = Path(args.out)
    results = summarize(args)
    print((out / "summary.md").read_text())
    print(f"results: {out / 'results.json'}   plot: {out / 'lq_lora.png'}   wall {time.time() - began:.0f}s")
    missing = [name for name, run in results["runs"].items() if run.get("perplexity_after") is None]
    if missing:
        print(f"unfinished: {missing} (see {out / 'logs'})")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.prepare_data:
        prepare_data()
        return
    if args.worker is not None:
        run_job(args, args.worker)
    elif args.in_process:
        began = time.time()
        if args.quick:
            quick_inputs(Path(args.out))
        orchestrate_in_process(args)
        report(args, began)
    else:
        orchestrate(args, argv)


if __name__ == "__main__":
    main()
