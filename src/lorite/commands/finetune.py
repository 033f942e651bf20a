"""``lorite finetune``: one fine-tuning run (LoRA by default) on a task; evaluate; save the adapter.

``--config FILE.json`` gives the run as a JSON object of :class:`~lorite.train.finetune.FinetuneConfig`
fields (``{"task": "social_iqa", "optimizer": "adamw", "lr": 3e-4, "rank": 8, "steps": 100}``); options
given on the command line override the file, and what neither gives takes the option's default. Without
``--lr`` (in neither), the optimizer's own default rate is used (:func:`lorite.optim.default_lr`); the rate
used is in ``metrics.json``. A run that diverges writes its metrics and exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..errors import LoriteError
from ..optim import available
from ..runtime import check_output_dir, run_lock
from ..train.checkpoint import saved_train_state
from ..train.finetune import FinetuneConfig, finetune
from ._options import RunFailed, add_keep_last, add_training_args, check_names, training_config

# FinetuneConfig fields whose command-line option has another destination
FIELD_OPTIONS = {"optimizer_kwargs": "optimizer_args", "bf16": "no_bf16"}


def _matches(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` fits the type annotation ``hint`` (int for float is fine, bool is no int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def read_config(path: str) -> dict[str, Any]:
    """The :class:`FinetuneConfig` fields that the JSON file ``path`` gives; unknown keys and values of the
    wrong type are a :class:`LoriteError` naming them."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise LoriteError(f"--config {path!r} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoriteError(f"--config {path!r} is not a readable JSON file: {error}") from error
    if not isinstance(values, dict):
        raise LoriteError(f"--config {path!r} must hold a JSON object of FinetuneConfig fields")
    unknown = sorted(set(values) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise LoriteError(
            f"--config {path!r}: unknown keys {unknown} (the keys are lorite.train.finetune.FinetuneConfig's fields)"
        )
    hints = typing.get_type_hints(FinetuneConfig)
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise LoriteError(f"--config {path!r}: {key}={value!r} is not of type {hints[key]}")
    return values


def new_run_config(args: argparse.Namespace) -> FinetuneConfig:
    """The configuration of a new run: the ``--config`` file's fields, overridden by the options given on
    the command line; the options' defaults for the rest."""
    from_options = asdict(training_config(args, args.task, args.optimizer, args.lr, args.seed))
    if args.config is None:
        config = FinetuneConfig(**from_options)
    else:
        from_file = read_config(args.config)
        given = {
            key: value for key, value in from_file.items() if FIELD_OPTIONS.get(key, key) not in args.explicit
        }
        config = FinetuneConfig(**{**from_options, **given})
    if not config.task:
        raise LoriteError("--task is required (or a --config file with a task, or --resume DIR)")
    return config


def run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        if args.config is not None:
            raise LoriteError(
                "--config starts a new run; a resumed run keeps its own settings (drop --config)"
            )
        out = Path(args.resume)
        check_output_dir(out, resume=True)
        # the run's own settings, from the checkpoint the resume continues (checked: a damaged one is a
        # DamagedArtifact, exit 1, or an older kept one is used)
        config = FinetuneConfig(**saved_train_state(out)["config"])
    else:
        out = Path(args.out)
        check_output_dir(out, resume=False)
        config = new_run_config(args)
        check_names(
            [config.task] + ([config.transfer_task] if config.transfer_task else []), [config.optimizer]
        )
    if args.stop_after is not None and args.stop_after < 1:
        raise LoriteError(f"--stop-after must be a positive number of steps, got {args.stop_after}")
    with run_lock(out, "--resume" if args.resume is not None else "--out"):  # one process per run dir
        results = finetune(config, out=out, resume=args.resume is not None, stop_after=args.stop_after)
    summary = {"lr": results["config"]["lr"]}
    summary.update(
        {k: results[k] for k in ("validation", "test", "seconds_per_step", "stopped_at") if k in results}
    )
    print(json.dumps(summary, indent=1, default=str))
    if results.get("diverged"):
        raise RunFailed(
            f"the run diverged at step {results['history'].get('diverged_at')} (non-finite loss) at lr "
            f"{results['config']['lr']:g}; its metrics are in {out / 'metrics.json'}"
        )
    print(f"adapter and metrics in {out}")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "finetune",
        help="LoRA fine-tuning on a BIG-bench task or corpus; evaluate; save",
        description="One fine-tuning run. --config FILE.json gives its settings as a JSON object of "
        "FinetuneConfig fields; options given on the command line override the file. Exit codes: 0 done, 2 "
        "bad input, 1 a failure at run time (out of memory; a diverged run, whose metrics are still written).",
        track_explicit=True,  # --config: the options given on the command line override the file
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a JSON object of FinetuneConfig fields (task, optimizer, lr, rank, steps, …); options given "
        "on the command line override it",
    )
    parser.add_argument(
        "--task",
        help="BIG-bench task, file:PATH/task.json, jsonl:PATH (TRL-style prompt/completion, messages or "
        "prompt/choices/answer rows), hf:PATH[#SPLIT] (a datasets folder or a parquet/JSON file) or "
        "corpus:shakespeare; a mixture of tasks joined by + (BIG-bench globs too: 'natural_instructions/*')",
    )
    parser.add_argument(
        "--optimizer", default="lora_rite", choices=list(available()), metavar="NAME", help="%(choices)s"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the optimizer's own, default_lr)"
    )
    parser.add_argument("--seed", type=int, default=0, help="LoRA init, dropout and data order")
    parser.add_argument("--out", default="lorite-run", help="the run's directory (new)")
    parser.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this dir")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="write RUN/checkpoint every N steps (0: never)"
    )
    add_keep_last(parser)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this session after N steps (as a preempted job would); continue it with --resume",
    )
    add_training_args(parser)
    parser.set_defaults(func=run)
