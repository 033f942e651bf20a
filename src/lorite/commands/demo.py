"""``lorite demo``: AdamW against LoRA-RITE on SmolLM2-135M-Instruct and one BIG-bench task, sized for two
CPU cores; prints the test scores and the two loss curves."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ..train.compare import compare, prepare_output
from ..train.finetune import FinetuneConfig
from .compare import print_table

DEMO_TASK = "social_iqa"


def run(args: argparse.Namespace) -> None:
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
    print_table(results)
    entry = results["tasks"][args.task]["optimizers"]
    print("\ntraining loss (mean over 5-step windows)")
    curves = {name: info["loss_curves"][0] for name, info in entry.items()}
    print(f"  {'steps':>9}  " + "  ".join(f"{name:>10}" for name in curves))
    for start in range(0, args.steps, 5):
        cells = [sum(c[start : start + 5]) / len(c[start : start + 5]) for c in curves.values()]
        print(f"  {start + 1:>4}-{min(start + 5, args.steps):<4}  " + "  ".join(f"{v:>10.4f}" for v in cells))
    print(f"\nreport: {out / 'report.md'}   plots: {out}/loss_{args.task}.png, {out}/test_scores.png")


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="adamw vs lora_rite on SmolLM2 and one task, CPU-sized (~10 min)")
    parser.add_argument("--task", default=DEMO_TASK, help="the BIG-bench task")
    parser.add_argument("--steps", type=int, default=40, help="training steps per optimizer")
    parser.add_argument("--n-test", type=int, default=200, help="held-out test examples")
    parser.add_argument("--adamw-lr", type=float, default=1e-3, help="AdamW's learning rate")
    parser.add_argument("--lora-rite-lr", type=float, default=3e-2, help="LoRA-RITE's learning rate")
    parser.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, …")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2 on CPU)")
    parser.add_argument("--out", default=None, help="the output directory (default: lorite-demo-<time>)")
    parser.set_defaults(func=run)
