"""Measured transformation (in)variance of every registry optimizer.

A tiny float64 Llama (hidden 32, 2 layers) with peft LoRA r=4 on q,k,v,o,up,down, B randomised so that
B·A ≠ 0; two copies, (A, B) and (T⁻¹A, B·T), trained 50 steps on the same random-token batches.
Prints the largest relative gap of the effective weight changes s·B·A over the run, for T = 1000·I
(scalar) and a random well-conditioned T (general).

    python benchmarks/speed/invariance.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness  # noqa: F401  (puts src/ on sys.path: a checkout runs without an install)

from lorite.optim import available, create, find_lora_pairs
from lorite.optim.invariance import invariance_deviation, random_transform, scalar_transform

# learning rates that move every optimizer's weights a comparable amount in 50 steps
LR = {
    "adamw": 1e-3,
    "lora_plus": 1e-3,
    "scaled_adam": 1e-3,
    "shampoo": 1e-3,
    "lamb": 1e-2,
    "lora_rite": 1e-2,
    "lora_rite_reference": 1e-3,
}


EXTRA_SCALED_GD = {"adam_normalization": False, "delta": 1e-14}


def tiny_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).double()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets), autocast_adapter_dtype=False
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pair in find_lora_pairs(model).pairs:
            pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=gen, dtype=pair.B.dtype))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, 64, (4, 16), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    model = tiny_model()
    transforms = {"scalar T = 1000·I": scalar_transform(1e3), "general T": random_transform(seed=100)}
    print(f"| optimizer | lr | {' | '.join(transforms)} | weights moved |")
    print("|---|---|" + "---|" * len(transforms) + "---|")
    # GaLore and Fira (in the registry too) update full weight matrices: no (A, B) pair to transform
    rows = [(name, name, {}) for name in available() if name in LR]
    # the properties the paper states hold in the limit: ScaledGD (no Adam normalisation), and Lamb with ε → 0
    rows.insert(
        3, ("scaled_adam, adam_normalization=False (ScaledGD), δ=1e-14", "scaled_adam", EXTRA_SCALED_GD)
    )
    rows.insert(6, ("lamb, eps=1e-30", "lamb", {"eps": 1e-30}))
    for label, name, extra in rows:
        cells, moved = [], 0.0
        lr = 3e-2 if extra is EXTRA_SCALED_GD else LR[name]
        for transform in transforms.values():
            deviation, moved = invariance_deviation(
                model,
                lambda m, name=name, lr=lr, extra=extra: create(name, m, lr=lr, **extra),
                batches,
                transform,
            )
            cells.append(f"{deviation:.1e}")
        print(f"| {label} | {lr:g} | {' | '.join(cells)} | {moved:.2f} |")


if __name__ == "__main__":
    main()
