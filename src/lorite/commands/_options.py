"""What several ``lorite`` subcommands share: the fine-tuning options (``finetune``, ``compare``), their
translation into a :class:`~lorite.train.finetune.FinetuneConfig`, fail-fast name checks and small
parsers. Bad input raises :class:`~lorite.errors.LoriteError`, which the CLI prints as one line (exit 2)."""

from __future__ import annotations

import argparse
import json

from ..errors import LoriteError
from ..optim import available
from ..tasks import check_task_specs
from ..train.finetune import FinetuneConfig


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The options of one fine-tuning run (the fields of ``FinetuneConfig``)."""
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


def json_object(text: str, option: str) -> dict:
    """``text`` parsed as a JSON object, or a LoriteError naming ``option``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoriteError(f"{option} is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise LoriteError(f"{option} must be a JSON object")
    return value


def parse_list(text: str, what: str) -> list[str]:
    """A comma list, stripped, empty items dropped; an empty list is an error naming ``--what``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise LoriteError(f"--{what} is empty")
    return items


def training_config(
    args: argparse.Namespace, task: str, optimizer: str, lr: float, seed: int
) -> FinetuneConfig:
    """The :class:`FinetuneConfig` that the options of :func:`add_training_args` describe."""
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    return FinetuneConfig(
        task=task, model=args.model, optimizer=optimizer, lr=lr,
        optimizer_kwargs=json_object(args.optimizer_args, "--optimizer-args"),
        method=args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
        method_args=json_object(args.method_args, "--method-args"),
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        seed=seed, n_validation=args.n_validation, n_test=args.n_test, max_length=args.max_length,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        checkpoint_every=getattr(args, "checkpoint_every", 0), device=args.device, parallel=args.parallel,
        bf16=not args.no_bf16, gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
    )  # fmt: skip


def check_names(tasks: list[str], optimizers: list[str]) -> None:
    """Fail fast on unknown optimizers and tasks, before any model is loaded."""
    unknown = [name for name in optimizers if name not in available()]
    if unknown:
        raise LoriteError(f"unknown optimizer {unknown[0]!r}; available: {', '.join(available())}")
    check_task_specs(tasks)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
