"""Optimizer state memory of LoRA-RITE against AdamW at every LoRA rank (issue "LoRA-RITE at AdamW speed at
every rank": state ≤ AdamW + 5 %).

State bytes are counted after one step over the pairs of :mod:`optimizer_step` (random factors and
gradients of the Gemma-2B and SmolLM2 shapes, LoRA on all 7 linear types). The state holds the same tensors
on every device, so this runs on the CPU; no timing is taken.

    python benchmarks/speed/state_memory.py --configs smollm2,gemma2b --out runs/state_memory.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # optimizer_step, next to this file
from harness import command_line, markdown_table, write_json
from optimizer_step import CONFIGS, build_optimizer, make_pairs, set_grads, state_bytes

OPTIMIZERS = ("adamw", "lora_rite", "lora_rite_reference")


def measure(config: str, rank: int, name: str) -> int:
    """State bytes of ``name`` after one step at this shape and rank."""
    device = torch.device("cpu")
    pairs = make_pairs(CONFIGS[config], rank, device)
    optimizer = build_optimizer(name, pairs, device)
    set_grads(pairs, seed=1)
    optimizer.step()
    return state_bytes(optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="smollm2,gemma2b")
    parser.add_argument("--ranks", default="4,8,16,32,64,128,256")
    parser.add_argument("--out", default=None, help="write the measurements (JSON) here")
    args = parser.parse_args()
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"--configs: unknown shape {config!r}; choose from {sorted(CONFIGS)}")
        narrowest = min(CONFIGS[config]["kv_heads"] * CONFIGS[config]["head_dim"], CONFIGS[config]["hidden"])
        for rank in (int(r) for r in args.ranks.split(",")):
            if rank > narrowest:  # LoRA-RITE needs r ≤ min(in, out) of every layer
                print(f"{config} r={rank}: skipped (above the narrowest layer, {narrowest})", flush=True)
                continue
            sizes = {name: measure(config, rank, name) for name in OPTIMIZERS}
            gc.collect()
            row = {"config": config, "rank": rank, **{f"{name}_bytes": size for name, size in sizes.items()}}
            rows.append(row)
            excess = ", ".join(
                f"{name} {100 * (sizes[name] / sizes['adamw'] - 1):+.1f} %" for name in OPTIMIZERS[1:]
            )
            print(f"{config} r={rank}: AdamW {sizes['adamw'] / 2**20:.1f} MB; {excess}", flush=True)
    table = markdown_table(
        ["shape", "r", "AdamW MB", "LoRA-RITE MB", "vs AdamW", "reference variant vs AdamW"],
        [
            [
                row["config"], row["rank"], f"{row['adamw_bytes'] / 2**20:.1f}",
                f"{row['lora_rite_bytes'] / 2**20:.1f}",
                f"{100 * (row['lora_rite_bytes'] / row['adamw_bytes'] - 1):+.1f} %",
                f"{100 * (row['lora_rite_reference_bytes'] / row['adamw_bytes'] - 1):+.1f} %",
            ]
            for row in rows
        ],
    )  # fmt: skip
    print(table)
    if args.out:
        write_json(
            Path(args.out),
            {
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
                "command": command_line(),
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
