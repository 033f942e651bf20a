"""What several ``lorite`` subcommands share: the fine-tuning options (``finetune``, ``compare``), their
translation into a :class:`~lorite.train.finetune.FinetuneConfig`, fail-fast name checks and small
parsers. Bad input raises :class:`~lorite.errors.LoriteError`, which the CLI prints as one line (exit 2)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import LoriteError
from ..models import DTYPE_CHOICES
from ..optim import available
from ..runtime import ENGINES, SCHEDULES
from ..tasks import check_task_specs
from ..tasks.evaluation import CLASSIFICATION_SCORES
from ..tasks.mixture import DEFAULT_MAX_EXAMPLES_PER_TASK
from ..train.finetune import FinetuneConfig
from ..train.methods import METHODS
from ..train.run_log import REPORT_TO


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The options of one fine-tuning run (the fields of ``FinetuneConfig``)."""
    parser.add_argument(
        "--model",
        default=None,
        help="SmolLM2-135M-Instruct (default; a dequantized Q4_1 copy), a .gguf file, a local model dir or "
        "a Hugging Face id owner/name[@revision] (through the HF cache; HF_HUB_OFFLINE=1: cache only)",
    )
    parser.add_argument("--method", default="lora", metavar="NAME", help=f"what trains: {', '.join(METHODS)}")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (or the method's rank)")
    parser.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha (default: = rank, i.e. scaling 1)"
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument(
        "--target-modules", default="all-linear", help="'all-linear' or a comma list (q_proj,v_proj)"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch (global)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of steps")
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="the lr after warmup")
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="raw-gradient clipping (0: off)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example at most")
    parser.add_argument("--n-validation", type=int, default=200, help="validation examples held out")
    parser.add_argument("--n-test", type=int, default=400, help="test examples held out")
    parser.add_argument(
        "--max-examples-per-task",
        type=int,
        default=DEFAULT_MAX_EXAMPLES_PER_TASK,
        metavar="N",
        help="a task mixture (--task 'A+B', 'natural_instructions/*'): each member trains on at most N "
        "of its training examples (single tasks: unused)",
    )
    parser.add_argument(
        "--mixture-temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="a task mixture draws member i with p ∝ n_i^(1/T), n_i its capped size: 1 proportional, "
        "inf uniform over the tasks",
    )
    parser.add_argument(
        "--classification-score",
        default="rouge_l",
        choices=CLASSIFICATION_SCORES,
        help="the score of a generation task whose answers form a small label set (Yes/No, categories): "
        "rouge_l like other generation tasks, or exact_match (Super-NaturalInstructions' rule)",
    )
    parser.add_argument(
        "--transfer-task",
        default=None,
        metavar="SPEC",
        help="a task or mixture never trained on, scored on its test split after training (zero-shot "
        "transfer; metrics.json 'transfer')",
    )
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the end)")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation batch")
    parser.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:1, …")
    parser.add_argument(
        "--parallel",
        default="none",
        choices=ENGINES,
        help="under torchrun / accelerate launch: ddp or fsdp2 (same global batch)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the base weights' dtype; auto (default): bf16 for --method lora on CUDA, else fp32 (full, loldu "
        "and lq_lora train or decompose the base: fp32 unless asked). LoRA factors and optimizer state stay fp32",
    )
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: the base's linear layers in 4-bit NF4 (bitsandbytes, CUDA; pip install 'lorite[qlora]')",
    )
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
    add_report_to(parser)


def add_report_to(parser: argparse.ArgumentParser, default: str | None = "none") -> None:
    """``--report-to``: where the run log's scalars go besides ``RUN/log.jsonl``."""
    parser.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default=default,
        help="also write the step and evaluation scalars to TensorBoard (RUN/tensorboard/); default none",
    )


def add_keep_last(parser: argparse.ArgumentParser) -> None:
    """``--keep-last``: how many checkpoints a run keeps (``RUN/checkpoint`` and ``RUN/checkpoint-<step>``)."""
    parser.add_argument(
        "--keep-last",
        type=int,
        default=1,
        metavar="N",
        help="checkpoints kept: RUN/checkpoint (the newest) and the N-1 before it as RUN/checkpoint-<step>",
    )


class RunFailed(RuntimeError):
    """A run that ended without a usable result (it diverged): the CLI prints it as one line, exit code 1."""


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
        max_examples_per_task=args.max_examples_per_task, mixture_temperature=args.mixture_temperature,
        classification_score=args.classification_score, transfer_task=args.transfer_task,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        checkpoint_every=getattr(args, "checkpoint_every", 0), keep_last=getattr(args, "keep_last", 1),
        device=args.device, parallel=args.parallel,
        bf16=not args.no_bf16, gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
        dtype=args.dtype, load_in_4bit=args.load_in_4bit,
        report_to=args.report_to,
    )  # fmt: skip


def check_names(tasks: list[str], optimizers: list[str]) -> None:
    """Fail fast on unknown optimizers and tasks, before any model is loaded."""
    unknown = [name for name in optimizers if name not in available()]
    if unknown:
        raise LoriteError(f"unknown optimizer {unknown[0]!r}; available: {', '.join(available())}")
    check_task_specs(tasks)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, ``(default: 16)``, unless the help already speaks of its
    default or there is none to show (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


_UNSET = object()  # the value of an option not given on the command line, in the probe of ``explicit``


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2, as argparse's), every help shows the
    defaults (:class:`HelpFormatter`, inherited by the subcommands' parsers, which are ``Parser`` s too), and
    with ``track_explicit=True`` (``sub.add_parser(name, track_explicit=True)``) ``args.explicit`` is the set
    of option destinations given on the command line, so that a config file can fill in the rest
    (``finetune --config``)."""

    def __init__(self, *args, formatter_class=HelpFormatter, track_explicit: bool = False, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.track_explicit = track_explicit

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.track_explicit:
            # argparse fills in a default only where the namespace lacks the attribute: a probe that has
            # every option set to _UNSET keeps _UNSET exactly where the command line gave nothing
            dests = {action.dest for action in self._actions if action.option_strings}
            probe = argparse.Namespace(**dict.fromkeys(dests, _UNSET))
            probe, _ = super().parse_known_args(sys.argv[1:] if args is None else list(args), probe)
            namespace.explicit = frozenset(d for d in dests if getattr(probe, d) is not _UNSET)
        return namespace, extras
