"""``lorite evaluate``: validation and test metrics of the base model on a task (zero-shot), or of a
finetune run's adapter on its own task and settings — or, with ``--task``, on another task or mixture
(transfer: ``lorite evaluate --run RUN --task "A+B"`` scores the adapter on tasks it never trained on, with
the run's split and evaluation settings)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

from ..cache import atomic_write_text
from ..errors import LoriteError
from ..train.compare import load_config
from ..train.finetune import FinetuneConfig, evaluate_model
from ._options import check_names


def run(args: argparse.Namespace) -> None:
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
        if args.config:
            raise LoriteError("--run evaluates a run with its own settings: leave out --config")
        if args.task:  # another task or mixture than the run's (transfer); fail fast on its names
            check_names([args.task], [])
        run_dir = Path(args.run)
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            raise LoriteError(
                f"--run {str(run_dir)!r}: no metrics.json there (not a finished lorite finetune run)"
            )
        saved = json.loads(metrics_file.read_text())["config"]
        saved.setdefault("dtype", "fp32")  # a run from before --dtype trained on an fp32 base
        known = {f.name for f in fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in saved.items() if k in known})
        if config.method != "lora":
            raise LoriteError(
                f"--run {str(run_dir)!r}: method {config.method!r}; only LoRA adapters are evaluated"
            )
        adapter = run_dir / "adapter"
        if args.task:
            config = replace(config, task=args.task)
    else:
        if not args.task:
            raise LoriteError("--task is required (or --run DIR)")
        check_names([args.task], [])
        training = load_config(args.config).get("training", {}) if args.config else {}
        config = FinetuneConfig(task=args.task, **training)
    config = replace(config, **overrides)
    results = evaluate_model(config, adapter=adapter, progress=True)
    text = json.dumps(
        {"task": config.task, "adapter": str(adapter) if adapter else None, **results}, indent=1
    )
    if out is not None:
        atomic_write_text(out, text + "\n")
    print(text)


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "evaluate", help="validation and test metrics: the base model zero-shot, or a finetune run's adapter"
    )
    parser.add_argument(
        "--task",
        default=None,
        help="a task or mixture (A+B, natural_instructions/*): the base model zero-shot, or --run's adapter",
    )
    parser.add_argument(
        "--run",
        default=None,
        help="a lorite finetune run: its adapter, on its task and settings (with --task: on that task or "
        "mixture instead, e.g. held-out tasks)",
    )
    parser.add_argument(
        "--config", default=None, help="with --task: a comparison config's evaluation settings"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="SmolLM2-135M-Instruct (default), a .gguf file, a model dir or a Hugging Face id owner/name",
    )
    parser.add_argument(
        "--n-validation", type=int, default=None, help="validation examples (default: 200, or the run's)"
    )
    parser.add_argument("--n-test", type=int, default=None, help="test examples (default: 400, or the run's)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per example (default: 512, or the run's)"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=None, help="examples per batch (default: 32, or the run's)"
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--out", default=None, help="also write the JSON to this (new) file")
    parser.set_defaults(func=run)
