"""Fine-tuning methods: what becomes trainable and how the result is saved.

A method is a :class:`Method` — ``prepare(model, config) -> model`` (freeze, wrap, attach adapters) and
``save(model, out_dir)`` (write what the run produced: an adapter, or the whole model) — registered in
:data:`METHODS` under its ``--method`` name. The training loop in :mod:`lorite.train.finetune` is the same
for every method, so runs that differ only in the method see the same data in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.loldu import prepare_for_finetune as prepare_loldu
from ..adapters.loldu import save_for_finetune as save_loldu_adapter
from ..adapters.lq_lora import prepare_for_finetune as prepare_lq_lora
from ..adapters.lq_lora import save_for_finetune as save_lq_lora
from ..errors import LoriteError
from .full import prepare_full, save_full_model


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable  # (model, FinetuneConfig) -> model with only the method's parameters trainable
    save: Callable  # (model, out_dir: Path) -> None; writes out_dir atomically
    description: str = ""


def add_lora(model, config):
    """peft LoRA on ``config.target_modules`` (rank, alpha, dropout), optionally re-factorised as
    ``(A·s, B/s)`` with ``s = config.init_scale`` — the same ``B·A``, another factorisation."""
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    for name, module in model.named_modules():
        targeted = targets == "all-linear" or any(name.endswith(t) for t in targets)
        too_small = isinstance(module, torch.nn.Linear) and config.rank > min(
            module.in_features, module.out_features
        )
        if targeted and too_small and not name.endswith("lm_head"):
            raise LoriteError(
                f"--rank {config.rank} is larger than layer {name} ({module.out_features} × {module.in_features})"
            )
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:
        raise LoriteError(f"LoRA target modules {targets!r}: {error}") from error
    if config.init_scale != 1.0:
        from ..optim import find_lora_pairs

        with torch.no_grad():
            for pair in find_lora_pairs(model).pairs:
                pair.A.mul_(config.init_scale)
                pair.B.div_(config.init_scale)
    return model


def save_peft_adapter(model, out: Path, state_dict: dict | None = None) -> None:
    """The adapter only (``adapter/`` with peft's safetensors), written atomically. ``state_dict``: the whole
    model's tensors when the module's own are sharded (FSDP2)."""
    from ..cache import atomic_directory

    with atomic_directory(Path(out) / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)


METHODS: dict[str, Method] = {
    "lora": Method("lora", add_lora, save_peft_adapter, "peft LoRA adapters (rank, alpha, target modules)"),
    "full": Method("full", prepare_full, save_full_model, "every weight trains; saves the whole model"),
    "loldu": Method(
        "loldu", prepare_loldu, save_loldu_adapter, "LoLDU: r trainable pivots per matrix (arXiv 2410.13618)"
    ),
    "lq_lora": Method(
        "lq_lora", prepare_lq_lora, save_lq_lora, "LoRA over NF-quantized Q, W ≈ Q + L1·L2 (arXiv 2311.12023)"
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LoriteError(f"--method {name!r} is not supported; available: {', '.join(METHODS)}")
    return METHODS[name]
