"""LoRA-RITE in a plain PyTorch loop, on the real model and a real task.

python examples/plain_loop.py --task social_iqa --steps 30
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

from lorite.models import load_causal_lm
from lorite.optim import create
from lorite.tasks import load_task, split_examples
from lorite.tasks.encoding import collate, encode_examples, lm_loss
from lorite.tasks.evaluation import evaluate_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="social_iqa")
    parser.add_argument("--optimizer", default="lora_rite")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    task = load_task(args.task)
    splits = split_examples(task, seed=0, n_validation=100, n_test=100)
    train = encode_examples(task, splits.train, tokenizer, max_length=256)
    optimizer = create(args.optimizer, model, lr=args.lr)  # pairs found by module; the rest → AdamW
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        rows = torch.randint(len(train), (8,), generator=generator).tolist()
        loss = lm_loss(model, collate([train[i] for i in rows], tokenizer.pad_token_id))
        loss.backward()  # no gradient clipping: it would break LoRA-RITE's invariance
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1:3d}  loss {loss.item():.4f}")
    print("test:", evaluate_task(model, tokenizer, task, splits.test))


if __name__ == "__main__":
    main()
