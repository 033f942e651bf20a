"""The ``lorite`` command: ``finetune``, ``compare``, ``demo``, ``analyze``, ``grow``, ``pretrain``,
``quantize``.

Bad input is one line on stderr and exit code 2, never a traceback, and nothing half-written is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import LoriteError

DEMO_TASK = "social_iqa"


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="SmolLM2-135M-Instruct (default), a .gguf file or a model dir"
    )
    parser.add_argument(
        "--method",
        default="lora",
        help="what trains: lora (default), full, loldu, …; see lorite.train.methods.METHODS",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha (default: = rank, i.e. scaling 1)"
    )
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--target-modules", default="all-linear", help="'all-linear' or a comma list (q_proj,v_proj)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of steps")
    parser.add_argument("--schedule", default="cosine", help="cosine, linear or constant (after warmup)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="raw-gradient clipping (0: off)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--n-validation", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the end)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--parallel",
        default="none",
        help="under torchrun / accelerate launch: ddp or fsdp2 (same global batch)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward (less memory)",
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="save adapter/model to snapshots/step_N every N steps"
    )
    parser.add_argument(
        "--optimizer-args",
        default="{}",
        help="extra optimizer hyperparameters as JSON, e.g. '{\"escape_mass\": false}'",
    )
    parser.add_argument(
        "--method-args",
        default="{}",
        help='the method\'s own options as JSON, e.g. loldu: \'{"init_method": "lu", "train_scale": true}\'',
    )


def _base_config(args: argparse.Namespace, task: str, optimizer: str, lr: float, seed: int):
    from .train.finetune import FinetuneConfig

    try:
        extra = json.loads(args.optimizer_args)
    except json.JSONDecodeError as error:
        raise LoriteError(f"--optimizer-args is not JSON: {error}") from error
    if not isinstance(extra, dict):
        raise LoriteError("--optimizer-args must be a JSON object")
    try:
        method_args = json.loads(getattr(args, "method_args", "{}"))
    except json.JSONDecodeError as error:
        raise LoriteError(f"--method-args is not JSON: {error}") from error
    if not isinstance(method_args, dict):
        raise LoriteError("--method-args must be a JSON object")
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    return FinetuneConfig(
        task=task, model=args.model, optimizer=optimizer, lr=lr, optimizer_kwargs=extra,
        method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
        method_args=method_args,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        seed=seed, n_validation=args.n_validation, n_test=args.n_test, max_length=args.max_length,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        checkpoint_every=getattr(args, "checkpoint_every", 0), device=args.device, parallel=args.parallel, bf16=not args.no_bf16,
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
    )  # fmt: skip


def _check_names(task_list: list[str], optimizers: list[str]) -> None:
    """Fail fast on unknown optimizers and tasks, before any model is loaded."""
    from .data.bigbench import load_tasks
    from .data.corpora import CORPORA
    from .optim import available

    unknown = [name for name in optimizers if name not in available()]
    if unknown:
        raise LoriteError(f"unknown optimizer {unknown[0]!r}; available: {', '.join(available())}")
    bigbench = [t for t in task_list if not t.startswith(("corpus:", "file:"))]
    for task in task_list:
        if task.startswith("corpus:") and task.split(":", 1)[1] not in CORPORA:
            raise LoriteError(f"unknown corpus {task.split(':', 1)[1]!r}; available: {', '.join(CORPORA)}")
        if task.startswith("file:") and not Path(task.split(":", 1)[1]).exists():
            raise LoriteError(f"task file {task.split(':', 1)[1]!r} does not exist")
    if bigbench:
        load_tasks(bigbench)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .train.finetune import FinetuneConfig, check_output_dir, finetune

    if args.resume is not None:
        out = Path(args.resume)
        state = out / "checkpoint" / "train_state.json"
        if not state.exists():
            raise LoriteError(f"--resume {str(out)!r}: no checkpoint there (run with --checkpoint-every N)")
        config = FinetuneConfig(**json.loads(state.read_text())["config"])  # the run's own settings
    else:
        if not args.task:
            raise LoriteError("--task is required (or --resume DIR)")
        out = Path(args.out)
        check_output_dir(out, resume=False)
        _check_names([args.task], [args.optimizer])
        config = _base_config(args, args.task, args.optimizer, args.lr, args.seed)
    if args.stop_after is not None and args.stop_after < 1:
        raise LoriteError(f"--stop-after must be a positive number of steps, got {args.stop_after}")
    results = finetune(config, out=out, resume=args.resume is not None, stop_after=args.stop_after)
    keys = ("validation", "test", "seconds_per_step", "stopped_at")
    print(json.dumps({k: results[k] for k in keys if k in results}, indent=1, default=str))
    print(f"adapter and metrics in {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Validation and test metrics of the base model on a task (zero-shot), or of a finetune run's adapter."""
    from dataclasses import fields, replace

    from .cache import atomic_write_text
    from .train.finetune import FinetuneConfig, evaluate_model

    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise LoriteError(f"--out {str(out)!r} already exists; give a new file")
    overrides = {
        name: getattr(args, name)
        for name in ("model", "n_validation", "n_test", "max_length", "eval_batch_size", "device")
        if getattr(args, name) is not None
    }
    adapter = None
    if args.run:
        if args.task or args.config:
            raise LoriteError(
                "--run evaluates a run on its own task and settings: leave out --task and --config"
            )
        run = Path(args.run)
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file():
            raise LoriteError(
                f"--run {str(run)!r}: no metrics.json there (not a finished lorite finetune run)"
            )
        saved = json.loads(metrics_file.read_text())["config"]
        known = {f.name for f in fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in saved.items() if k in known})
        if config.method != "lora":
            raise LoriteError(
                f"--run {str(run)!r}: method {config.method!r}; only LoRA adapters are evaluated"
            )
        adapter = run / "adapter"
    else:
        if not args.task:
            raise LoriteError("--task is required (or --run DIR)")
        _check_names([args.task], [])
        training = _compare_config(args.config).get("training", {}) if args.config else {}
        config = FinetuneConfig(task=args.task, **training)
    config = replace(config, **overrides)
    results = evaluate_model(config, adapter=adapter, progress=True)
    text = json.dumps(
        {"task": config.task, "adapter": str(adapter) if adapter else None, **results}, indent=1
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    print(text)


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise LoriteError(f"--{what} is empty")
    return items


def _compare_config(path: str) -> dict:
    """A comparison described in a JSON file (see benchmarks/configs/): ``tasks``, ``optimizers`` (names or
    labelled variants), ``lrs`` (``"auto"`` or label → list), ``seeds``, ``widen`` (extra learning rates
    allowed past each grid edge, see ``lorite compare --widen``) and ``training`` (FinetuneConfig fields).
    Makes each results table reproducible by one command."""
    from .train.finetune import FinetuneConfig

    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise LoriteError(f"--config {path!r} does not exist") from error
    except json.JSONDecodeError as error:
        raise LoriteError(f"--config {path!r} is not valid JSON: {error}") from error
    unknown = set(config) - {"description", "tasks", "optimizers", "lrs", "seeds", "widen", "training"}
    if unknown:
        raise LoriteError(f"--config {path!r}: unknown keys {sorted(unknown)}")
    fields = set(FinetuneConfig.__dataclass_fields__) - {"task", "optimizer", "lr", "seed"}
    bad = set(config.get("training", {})) - fields
    if bad:
        raise LoriteError(f"--config {path!r}: unknown training settings {sorted(bad)}")
    return config


def cmd_compare(args: argparse.Namespace) -> None:
    from .train.compare import (
        compare,
        compare_progress,
        parse_lrs,
        parse_optimizers,
        prepare_output,
        progress_markdown,
    )
    from .train.finetune import FinetuneConfig

    if args.config:
        config = _compare_config(args.config)
        tasks, optimizers = config["tasks"], config["optimizers"]
        grids = parse_lrs(config.get("lrs", "auto"), optimizers)
        seeds = int(config.get("seeds", 1))
        widen = config.get("widen", args.widen)
        base = FinetuneConfig(task=tasks[0], **config.get("training", {}))
    else:
        if not args.tasks:
            raise LoriteError("--tasks is required (or --config FILE)")
        tasks = _parse_list(args.tasks, "tasks")
        optimizers = _parse_list(args.optimizers, "optimizers")
        grids = parse_lrs(args.lrs, optimizers)
        seeds = args.seeds
        widen = args.widen
        base = _base_config(args, tasks[0], optimizers[0], 0.0, 0)
    _check_names(tasks, [spec.optimizer for spec in parse_optimizers(optimizers)])
    out = Path(args.out)
    if args.report and not args.progress:
        raise LoriteError("--report goes with --progress (a finished comparison writes its own report)")
    if args.progress:
        report = compare_progress(tasks, optimizers, grids, seeds, out, widen=widen)
        print(progress_markdown(report), end="")
        if args.report:
            _write_finished_report(tasks, optimizers, grids, seeds, out, base, widen, Path(args.report))
        return
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
    _print_table(results)
    print(f"\nreport: {out / 'report.md'}   results: {out / 'results.json'}   plots: {out}/*.png")


def _write_finished_report(tasks, optimizers, grids, seeds, out, base, widen, folder: Path) -> None:
    """--report: results.json, report.md and plots of the finished tasks, in a folder of their own."""
    from .cache import atomic_write_text
    from .train.compare import compare_finished_tasks
    from .train.report import write_report

    if folder.resolve() == out.resolve():  # a results.json there would mark the comparison as finished
        raise LoriteError(f"--report {str(folder)!r}: give a folder of its own, not the comparison's --out")
    results = compare_finished_tasks(tasks, optimizers, grids, seeds, out, base, widen=widen)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1, default=str))
    write_report(results, folder)
    unfinished = ", ".join(results["unfinished_tasks"]) or "none"
    print(f"\nreport of the finished tasks: {folder / 'report.md'} (unfinished: {unfinished})")


def _print_table(results: dict) -> None:
    for task, entry in results["tasks"].items():
        zero = entry.get("zero_shot")
        print(f"\n{task}" + (f"  (zero-shot test score {100 * zero['test']['score']:.1f})" if zero else ""))
        print(f"  {'optimizer':<22}{'best lr':>9}  {'test score (×100)':>18}  {'s/step':>7}")
        for name, info in entry["optimizers"].items():
            mean, std = info["test_score"]
            timing = "—" if info["seconds_per_step"] is None else f"{info['seconds_per_step']:.2f}"
            print(f"  {name:<22}{info['best_lr']:>9g}  {100 * mean:>11.1f} ± {100 * std:<4.1f}  {timing:>7}")


def cmd_demo(args: argparse.Namespace) -> None:
    """adamw vs lora_rite on SmolLM2 and one dev task, sized for 2 CPU cores and ~10 minutes."""
    import torch

    from .train.compare import compare, prepare_output
    from .train.finetune import FinetuneConfig

    if args.device == "auto" and not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2 if args.threads is None else args.threads)))
    out = Path(args.out or f"lorite-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_output(out)
    base = FinetuneConfig(
        task=args.task, optimizer="adamw", lr=0.0, rank=16, steps=args.steps, batch_size=8, n_validation=60,
        n_test=args.n_test, eval_batch_size=32, max_length=256, device=args.device,
    )  # fmt: skip
    grids = {"adamw": [args.adamw_lr], "lora_rite": [args.lora_rite_lr]}  # one lr each: no selection
    print(
        f"lorite demo: LoRA r=16 on SmolLM2-135M-Instruct, BIG-bench {args.task}; {args.steps} steps of batch 8 "
        f"per optimizer, then test accuracy on {args.n_test} held-out examples",
        flush=True,
    )
    results = compare([args.task], ["adamw", "lora_rite"], grids, 1, base, out)
    _print_table(results)
    entry = results["tasks"][args.task]["optimizers"]
    print("\ntraining loss (mean over 5-step windows)")
    curves = {name: info["loss_curves"][0] for name, info in entry.items()}
    print(f"  {'steps':>9}  " + "  ".join(f"{name:>10}" for name in curves))
    for start in range(0, args.steps, 5):
        cells = [sum(c[start : start + 5]) / len(c[start : start + 5]) for c in curves.values()]
        print(f"  {start + 1:>4}-{min(start + 5, args.steps):<4}  " + "  ".join(f"{v:>10.4f}" for v in cells))
    print(f"\nreport: {out / 'report.md'}   plots: {out}/loss_{args.task}.png, {out}/test_scores.png")


# ------------------------------------------------------------------------------------------ pretrain
def _parse_tokens(text: str) -> int:
    """``20000000``, ``2e7``, ``20M``, ``1.5B`` → an integer token count."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise LoriteError(f"--tokens {text!r} is not a number (e.g. 20000000, 2e7, 20M)") from None
    if not (value >= 1 and value < 1e15):
        raise LoriteError(f"--tokens must be a positive count, got {text!r}")
    return int(value)


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoriteError(f"{option} is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise LoriteError(f"{option} must be a JSON object")
    return value


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .train.pretrain import PretrainConfig, check_output_dir, pretrain, saved_config

    if args.resume is not None:
        out = Path(args.resume)
        config = saved_config(out)  # the run's own settings
        config.progress = True
    else:
        out = Path(args.out)
        check_output_dir(out, resume=False)
        if args.tokens is None:
            raise LoriteError("--tokens is required (or --resume DIR)")
        corpora = _parse_list(args.corpora, "corpora")
        config = PretrainConfig(
            size=args.size, optimizer=args.optimizer, lr=args.lr,
            optimizer_kwargs=_json_object(args.optimizer_args, "--optimizer-args"),
            tokens=_parse_tokens(args.tokens), block_length=args.block_length, batch_size=args.batch_size,
            grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule, grad_clip=args.grad_clip,
            sampler=args.sampler, sampler_options=_json_object(args.sampler_args, "--sampler-args"),
            eval_every=args.eval_every, seed=args.seed, device=args.device, bf16=not args.no_bf16,
            checkpoint_every=args.checkpoint_every, corpora=corpora,
            train_corpora=_parse_list(args.train_corpora, "train-corpora") if args.train_corpora else None,
            data=args.data, time_limit=args.time_limit, progress=True,
        )  # fmt: skip
    results = pretrain(config, out, resume=args.resume is not None)
    final = results.get("final", {})
    summary = {
        "tokens": final.get("tokens"),
        "validation_ppl": final.get("ppl"),
        "by_corpus": {c: round(v["ppl"], 3) for c, v in final.get("by_corpus", {}).items()},
        "tokens_per_second": results.get("tokens_per_second"),
        "optimizer_state_mb": results.get("optimizer_state_bytes", 0) / 2**20,
    }
    print(json.dumps(summary, indent=1))
    print(f"model and metrics in {out}")


def _add_pretrain_parser(sub) -> None:
    pre = sub.add_parser("pretrain", help="pre-train a small LLaMA from scratch (GaLore/Fira sizes)")
    pre.add_argument("--size", default="60m", help="tiny, 20m, 60m, 130m or 350m (lorite.models.llama)")
    pre.add_argument("--optimizer", default="adamw", help="a lorite.optim name, e.g. adamw, fira_adamw")
    pre.add_argument("--tokens", default=None, help="training budget: 20000000, 2e7 or 20M")
    pre.add_argument("--lr", type=float, default=1e-3)
    pre.add_argument("--optimizer-args", default="{}", help='JSON, e.g. \'{"rank": 128, "scale": 0.25}\'')
    pre.add_argument("--sampler", default="random", help="random or lfr")
    pre.add_argument("--sampler-args", default="{}", help="the sampler's options as JSON")
    pre.add_argument(
        "--corpora",
        default="shakespeare,bible,austen,webster,cpython",
        help="comma list built into the token cache; each is evaluated on its held-out documents",
    )
    pre.add_argument("--train-corpora", default=None, help="comma list trained on (default: all --corpora)")
    pre.add_argument("--data", default=None, help="an existing token cache directory")
    pre.add_argument("--block-length", type=int, default=256)
    pre.add_argument("--batch-size", type=int, default=64, help="blocks per micro-batch (per GPU)")
    pre.add_argument("--grad-accum", type=int, default=1)
    pre.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of the steps")
    pre.add_argument("--schedule", default="cosine", help="cosine, linear or constant after warmup")
    pre.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    pre.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: at the end)")
    pre.add_argument("--checkpoint-every", type=int, default=0)
    pre.add_argument("--time-limit", type=float, default=None, help="seconds; then checkpoint and stop")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="auto")
    pre.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    pre.add_argument("--out", default="lorite-pretrain")
    pre.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this dir")
    pre.set_defaults(func=cmd_pretrain)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorite", description="Efficient LLM training around LoRA-RITE.")
    sub = parser.add_subparsers(dest="command", required=True)

    finetune = sub.add_parser(
        "finetune", help="LoRA fine-tuning on a BIG-bench task or corpus; evaluate; save"
    )
    finetune.add_argument("--task", help="BIG-bench task, file:PATH/task.json or corpus:shakespeare")
    finetune.add_argument("--optimizer", default="lora_rite")
    finetune.add_argument("--lr", type=float, default=1e-3)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", default="lorite-run")
    finetune.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this dir")
    finetune.add_argument("--checkpoint-every", type=int, default=0)
    finetune.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this session after N steps (as a preempted job would); continue it with --resume",
    )
    _add_training_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    comp = sub.add_parser("compare", help="optimizers × lr grids × seeds; best lr on validation; report")
    comp.add_argument("--config", default=None, help="a JSON comparison (benchmarks/configs/*.json)")
    comp.add_argument("--tasks", default=None, help="comma list of tasks")
    comp.add_argument(
        "--optimizers", default="adamw,lora_rite", help="comma list (see lorite.optim.available())"
    )
    comp.add_argument("--lrs", default="auto", help="'auto', '1e-4,3e-4,…', or 'adamw=1e-4:3e-4,lora_rite=…'")
    comp.add_argument("--seeds", type=int, default=1, help="seeds at each optimizer's best lr")
    comp.add_argument(
        "--widen",
        type=int,
        default=0,
        help="when a best lr sits at a grid edge, try up to N half-decade steps past it (per side)",
    )
    comp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    comp.add_argument("--out", default="lorite-compare")
    comp.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline")
    comp.add_argument(
        "--progress",
        action="store_true",
        help="train nothing: print what --out holds (partial tables) and which runs are left",
    )
    comp.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="with --progress: write results.json, report.md and plots of the finished tasks into DIR",
    )
    _add_training_args(comp)
    comp.set_defaults(func=cmd_compare)

    ev = sub.add_parser(
        "evaluate", help="validation and test metrics: the base model zero-shot, or a finetune run's adapter"
    )
    ev.add_argument("--task", default=None, help="a task: evaluates the base model (zero-shot)")
    ev.add_argument(
        "--run", default=None, help="a lorite finetune run: its adapter, on its task and settings"
    )
    ev.add_argument("--config", default=None, help="with --task: a comparison config's evaluation settings")
    ev.add_argument(
        "--model", default=None, help="SmolLM2-135M-Instruct (default), a .gguf file or a model dir"
    )
    ev.add_argument("--n-validation", type=int, default=None)
    ev.add_argument("--n-test", type=int, default=None)
    ev.add_argument("--max-length", type=int, default=None)
    ev.add_argument("--eval-batch-size", type=int, default=None)
    ev.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    ev.add_argument("--out", default=None, help="also write the JSON to this (new) file")
    ev.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="adamw vs lora_rite on SmolLM2 and one task, CPU-sized (~10 min)")
    demo.add_argument("--task", default=DEMO_TASK)
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--n-test", type=int, default=200)
    demo.add_argument("--adamw-lr", type=float, default=1e-3)
    demo.add_argument("--lora-rite-lr", type=float, default=3e-2)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--out", default=None)
    demo.set_defaults(func=cmd_demo)
    _add_pretrain_parser(sub)

    from .analysis.commands import add_analyze_parser

    add_analyze_parser(sub)

    from .growth.commands import add_grow_parser

    add_grow_parser(sub)

    from .adapters.lq_lora import add_quantize_parser

    add_quantize_parser(sub)

    from .federated.command import add_federate_parser

    add_federate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (one line, code 2) and --help (code 0)
        return int(exit_.code or 0)
    try:
        args.func(args)
    except LoriteError as error:
        print(f"lorite {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorite {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
