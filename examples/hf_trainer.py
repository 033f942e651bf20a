"""LoRA-RITE through the Hugging Face Trainer, on the real model and a real task.

    python examples/hf_trainer.py --task social_iqa --steps 30

The Trainer builds the optimizer through lorite's factory (transformers >= 5 calls
``LoRARiteFactory()(model, **kwargs)``), which takes the learning rate, weight decay and Adam betas from
``TrainingArguments`` (kwargs given to the factory win). ``max_grad_norm=0``: raw-gradient clipping would
break LoRA-RITE's transformation invariance; it clips its unmagnified gradient itself.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lorite.models import load_causal_lm
from lorite.optim import LoRARiteFactory
from lorite.tasks import load_task, split_examples
from lorite.tasks.encoding import Encoded, collate, encode_examples
from lorite.tasks.evaluation import evaluate_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="social_iqa")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="hf-trainer-run")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm()  # SmolLM2-135M-Instruct, converted once and cached
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    task = load_task(args.task)
    splits = split_examples(task, seed=0, n_validation=100, n_test=100)
    train = [
        dict(input_ids=e.input_ids, labels=e.labels)
        for e in encode_examples(task, splits.train, tokenizer, 256)
    ]

    def collator(rows):
        return collate([Encoded(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id)

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=args.lr,
        max_grad_norm=0.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), logging_steps=5,
        report_to=[], save_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training, train_dataset=train, data_collator=collator,
        optimizer_cls_and_kwargs=(LoRARiteFactory, {}),  # lr: TrainingArguments.learning_rate
    )  # fmt: skip
    trainer.train()
    print("test:", evaluate_task(model, tokenizer, task, splits.test))


if __name__ == "__main__":
    main()
