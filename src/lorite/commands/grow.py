"""``lorite grow``: grow a pretrained small Llama (an HF model dir or a ``lorite pretrain`` run) into a larger
size with LiGO or plain stacking (:mod:`lorite.growth.grow`), and save it in HF format."""

from __future__ import annotations

import argparse
import json

from ..growth.grow import GrowConfig, grow_run
from ..growth.ligo import DEPTH_INITS, METHODS, WIDTH_FORMS, WIDTH_INITS
from ..models.llama import LLAMA_SIZES


def add_parser(sub) -> None:
    grow = sub.add_parser("grow", help="grow a pretrained small Llama into a larger size (LiGO or stacking)")
    grow.add_argument("--from", dest="source", required=True, help="HF model dir or a `lorite pretrain` run")
    grow.add_argument("--to-size", default="60m", help=f"target size: {', '.join(LLAMA_SIZES)}")
    grow.add_argument("--out", required=True, help="new directory for the grown model (HF format)")
    grow.add_argument("--method", default="ligo", choices=METHODS, help="LiGO (learned) or stacking")
    grow.add_argument("--ligo-steps", type=int, default=100, help="operator training steps (LiGO)")
    grow.add_argument("--data", default=None, help="token cache dir (default: the pretrain run's)")
    grow.add_argument("--corpora", default=None, help="comma list, when a token cache has to be built")
    grow.add_argument("--block-length", type=int, default=256, help="when a token cache has to be built")
    grow.add_argument(
        "--batch-size", type=int, default=32, help="blocks per operator step and evaluation batch"
    )
    grow.add_argument("--lr", type=float, default=3e-3, help="operator learning rate (AdamW)")
    grow.add_argument("--warmup-steps", type=int, default=10, help="operator lr warmup (LiGO)")
    grow.add_argument("--width-init", default="rand", choices=WIDTH_INITS, help="width operator init (LiGO)")
    grow.add_argument("--depth-init", default="stack_noisy", choices=DEPTH_INITS, help="depth operator init")
    grow.add_argument(
        "--width-form", default="identity_plus_C", choices=WIDTH_FORMS, help="width operator form"
    )
    grow.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks for before/after losses")
    grow.add_argument("--seed", type=int, default=0, help="operator init and data order")
    grow.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, …")
    grow.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    grow.add_argument("--no-progress", action="store_true", help="no progress bar")
    grow.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()] if args.corpora else None
    config = GrowConfig(
        source=args.source, size=args.to_size, method=args.method, ligo_steps=args.ligo_steps, data=args.data,
        corpora=corpora, block_length=args.block_length, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, width_init=args.width_init, depth_init=args.depth_init,
        width_form=args.width_form, eval_blocks=args.eval_blocks, seed=args.seed, device=args.device,
        bf16=not args.no_bf16, progress=not args.no_progress,
    )  # fmt: skip
    info = grow_run(config, args.out)
    keys = ("small_validation_loss", "grown_validation_loss_at_init", "grown_validation_loss")
    summary = {k: round(info[k], 4) for k in keys if k in info}
    print(json.dumps({"method": config.method, "operator_parameters": info["operator_parameters"],
                      "large_parameters": info["large_parameters"], **summary}))  # fmt: skip
    print(f"grown model in {args.out} (from_pretrained-loadable; growth.json has the details)")
