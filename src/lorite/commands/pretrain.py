"""``lorite pretrain``: pre-train a small LLaMA from scratch (the GaLore/Fira sizes) on the token cache of
public-domain corpora; validation perplexity per corpus against tokens seen."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.blocks import SAMPLERS
from ..errors import LoriteError
from ..models.llama import LLAMA_SIZES
from ..optim import available
from ..runtime import SCHEDULES, check_output_dir, run_lock
from ..train.pretrain import DEFAULT_CORPORA, PretrainConfig, pretrain, saved_config
from ._options import add_keep_last, add_report_to, json_object, parse_list


def parse_tokens(text: str) -> int:
    """``20000000``, ``2e7``, ``20M``, ``1.5B`` → an integer token count."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise LoriteError(f"--tokens {text!r} is not a number (e.g. 20000000, 2e7, 20M)") from None
    if not (value >= 1 and value < 1e15):
        raise LoriteError(f"--tokens must be a positive count, got {text!r}")
    return int(value)


def run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        out = Path(args.resume)
        config = saved_config(out)  # the run's own settings
        config.progress = True
        if args.report_to is not None:  # a view of the run, not part of it: may change on resume
            config.report_to = args.report_to
    else:
        out = Path(args.out)
        check_output_dir(out, resume=False)
        if args.tokens is None:
            raise LoriteError("--tokens is required (or --resume DIR)")
        corpora = parse_list(args.corpora, "corpora")
        config = PretrainConfig(
            size=args.size, optimizer=args.optimizer, lr=args.lr,
            optimizer_kwargs=json_object(args.optimizer_args, "--optimizer-args"),
            tokens=parse_tokens(args.tokens), block_length=args.block_length, batch_size=args.batch_size,
            grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule, grad_clip=args.grad_clip,
            sampler=args.sampler, sampler_options=json_object(args.sampler_args, "--sampler-args"),
            eval_every=args.eval_every, seed=args.seed, device=args.device, bf16=not args.no_bf16,
            checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, corpora=corpora,
            train_corpora=parse_list(args.train_corpora, "train-corpora") if args.train_corpora else None,
            data=args.data, time_limit=args.time_limit, progress=True, report_to=args.report_to or "none",
        )  # fmt: skip
    with run_lock(out, "--resume" if args.resume is not None else "--out"):  # one process per run dir
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


def add_parser(sub) -> None:
    pre = sub.add_parser("pretrain", help="pre-train a small LLaMA from scratch (GaLore/Fira sizes)")
    pre.add_argument(
        "--size", default="60m", choices=LLAMA_SIZES, help="the Llama size (lorite.models.llama)"
    )
    pre.add_argument(
        "--optimizer", default="adamw", choices=list(available()), metavar="NAME", help="%(choices)s"
    )
    pre.add_argument("--tokens", default=None, help="training budget: 20000000, 2e7 or 20M")
    pre.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    pre.add_argument("--optimizer-args", default="{}", help='JSON, e.g. \'{"rank": 128, "scale": 0.25}\'')
    pre.add_argument("--sampler", default="random", choices=SAMPLERS, help="how training blocks are drawn")
    pre.add_argument("--sampler-args", default="{}", help="the sampler's options as JSON")
    pre.add_argument(
        "--corpora",
        default=",".join(DEFAULT_CORPORA),
        help="comma list built into the token cache; each is evaluated on its held-out documents",
    )
    pre.add_argument("--train-corpora", default=None, help="comma list trained on (default: all --corpora)")
    pre.add_argument("--data", default=None, help="an existing token cache directory")
    pre.add_argument("--block-length", type=int, default=256, help="tokens per training block")
    pre.add_argument("--batch-size", type=int, default=64, help="blocks per micro-batch (per GPU)")
    pre.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    pre.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of the steps")
    pre.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="the lr after warmup")
    pre.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    pre.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: at the end)")
    pre.add_argument(
        "--checkpoint-every", type=int, default=0, help="write RUN/checkpoint every N steps (0: when stopped)"
    )
    add_keep_last(pre)
    pre.add_argument("--time-limit", type=float, default=None, help="seconds; then checkpoint and stop")
    pre.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    pre.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:1, …")
    pre.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    pre.add_argument("--out", default="lorite-pretrain", help="the run's directory (new)")
    pre.add_argument("--resume", default=None, help="continue the run whose checkpoint is in this dir")
    add_report_to(pre, default=None)  # None: none, or on --resume the run's own setting
    pre.set_defaults(func=run)
