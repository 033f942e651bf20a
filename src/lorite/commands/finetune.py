"""``lorite finetune``: one fine-tuning run (LoRA by default) on a task; evaluate; save the adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LoriteError
from ..runtime import CHECKPOINT_DIR, check_output_dir
from ..train.finetune import FinetuneConfig, finetune
from ._options import add_training_args, check_names, training_config


def run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        out = Path(args.resume)
        check_output_dir(out, resume=True)
        state = out / CHECKPOINT_DIR / "train_state.json"
        config = FinetuneConfig(**json.loads(state.read_text())["config"])  # the run's own settings
    else:
        if not args.task:
            raise LoriteError("--task is required (or --resume DIR)")
        out = Path(args.out)
        check_output_dir(out, resume=False)
        check_names([args.task], [args.optimizer])
        config = training_config(args, args.task, args.optimizer, args.lr, args.seed)
    if args.stop_after is not None and args.stop_after < 1:
        raise LoriteError(f"--stop-after must be a positive number of steps, got {args.stop_after}")
    results = finetune(config, out=out, resume=args.resume is not None, stop_after=args.stop_after)
    keys = ("validation", "test", "seconds_per_step", "stopped_at")
    print(json.dumps({k: results[k] for k in keys if k in results}, indent=1, default=str))
    print(f"adapter and metrics in {out}")


def add_parser(sub) -> None:
    parser = sub.add_parser("finetune", help="LoRA fine-tuning on a BIG-bench task or corpus; evaluate; save")
    parser.add_argument("--task", help="BIG-bench task, file:PATH/task.json or corpus:shakespeare")
    parser.add_argument("--optimizer", default="lora_rite")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lorite-run")
    parser.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this dir")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this session after N steps (as a preempted job would); continue it with --resume",
    )
    add_training_args(parser)
    parser.set_defaults(func=run)
