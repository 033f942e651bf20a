"""The HF Trainer factories under a real ``transformers.Trainer``: the optimizer's hyperparameters come from
``TrainingArguments`` (learning rate, weight decay, Adam betas and epsilon), explicit kwargs win."""

from __future__ import annotations

import pytest
import torch

from helpers import batches, tiny_peft
from lorite.optim import (
    LambFactory,
    LoRAPlusFactory,
    LoRARite,
    LoRARiteFactory,
    ScaledAdamFactory,
    ShampooFactory,
)
from lorite.optim._base import PAIRS

FACTORIES = [LoRARiteFactory, LoRAPlusFactory, ScaledAdamFactory, ShampooFactory, LambFactory]


def make_trainer(tmp_path, factory, kwargs=None, **arguments):
    from transformers import Trainer, TrainingArguments

    model = tiny_peft(random_B=False)
    rows = [{"input_ids": ids[0], "labels": ids[0]} for ids in batches(2, batch=1)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", max_grad_norm=0.0, **arguments,
    )  # fmt: skip
    return Trainer(
        model=model, args=args, train_dataset=rows, optimizer_cls_and_kwargs=(factory, kwargs or {})
    )


def groups_by_role(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return {group["role"]: group for group in inner.param_groups}, inner


def test_training_arguments_reach_lora_rite_through_a_real_trainer(tmp_path):
    trainer = make_trainer(tmp_path, LoRARiteFactory, learning_rate=5e-2, weight_decay=0.1, adam_beta1=0.8)
    result = trainer.train()
    assert result.global_step == 1
    groups, inner = groups_by_role(trainer.optimizer)
    assert isinstance(inner, LoRARite)
    pairs = groups[PAIRS]
    assert pairs["initial_lr"] == 5e-2, "the rate the schedule starts from is TrainingArguments'"
    assert pairs["weight_decay"] == 0.1
    assert tuple(pairs["betas"]) == (0.8, 0.999)
    assert pairs["eps"] == 0.0, "LoRA-RITE keeps its variant's eps, not adam_epsilon"


def test_explicit_kwargs_win_over_training_arguments(tmp_path):
    explicit = {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-7}
    trainer = make_trainer(
        tmp_path, LoRARiteFactory, explicit, learning_rate=5e-2, weight_decay=0.1, adam_beta1=0.8
    )
    trainer.train()
    pairs = groups_by_role(trainer.optimizer)[0][PAIRS]
    assert pairs["initial_lr"] == 1e-2
    assert tuple(pairs["betas"]) == (0.5, 0.9)
    assert pairs["eps"] == 1e-7
    assert pairs["weight_decay"] == 0.1, "what the kwargs leave out still comes from TrainingArguments"


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_every_factory_takes_the_training_arguments(tmp_path, factory):
    trainer = make_trainer(
        tmp_path, factory, learning_rate=5e-2, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
        adam_epsilon=1e-5,
    )  # fmt: skip
    groups, inner = groups_by_role(trainer.create_optimizer())
    assert isinstance(inner, factory.optimizer_cls)
    pairs = groups[PAIRS]
    assert pairs["lr"] == 5e-2 and pairs["weight_decay"] == 0.1
    assert tuple(pairs["betas"]) == (0.8, 0.95)
    if "eps" in factory.optimizer_cls.pair_defaults:  # Shampoo has none (epsilon, grafting_eps instead)
        assert pairs["eps"] == (0.0 if factory is LoRARiteFactory else 1e-5)


def test_the_adamw_fallback_group_takes_the_adam_settings(tmp_path):
    trainer = make_trainer(
        tmp_path, LoRAPlusFactory, learning_rate=5e-2, weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-5
    )
    with torch.no_grad():  # an unpaired trainable parameter: the AdamW fallback group
        next(p for n, p in trainer.model.named_parameters() if "norm" in n).requires_grad_(True)
    groups, _ = groups_by_role(trainer.create_optimizer())
    fallback = groups["adamw"]
    assert fallback["lr"] == 5e-2 and tuple(fallback["betas"]) == (0.8, 0.999) and fallback["eps"] == 1e-5
    assert fallback["weight_decay"] == 0.0, "biases and norms are not decayed, as in the Trainer's AdamW"


def test_outside_a_trainer_the_factory_uses_the_optimizer_defaults():
    optimizer = LoRARiteFactory()(tiny_peft(random_B=False))
    pairs = next(g for g in optimizer.param_groups if g["role"] == PAIRS)
    assert pairs["weight_decay"] == 0.0 and tuple(pairs["betas"]) == (0.9, 0.999)
