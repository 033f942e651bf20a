"""``--method lora``: peft LoRA adapters on the target modules; the run saves the adapter.

Precision: the frozen base may be fp32, bf16 or fp16 (``--dtype``) or 4-bit NF4 (``--load-in-4bit``,
QLoRA: peft's ``prepare_model_for_kbit_training`` first, which keeps the non-quantized weights fp32); the
LoRA factors — and so the optimizer state built from them — are fp32 on every base (peft's
``autocast_adapter_dtype`` upcasts them on a bf16/fp16 base; :func:`prepare` makes sure of it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...cache import atomic_directory
from ...errors import LoriteError
from ...optim import find_lora_pairs

ADAPTER_DIR = "adapter"


def prepare(model, config):
    """peft LoRA on ``config.target_modules`` (rank, alpha, dropout), optionally re-factorised as
    ``(A·s, B/s)`` with ``s = config.init_scale`` — the same ``B·A``, another factorisation. Every
    trainable parameter is fp32, whatever the base's dtype."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # optional (lorite[peft])

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
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: frozen base, norms/embeddings fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # finetune sets it
    try:
        model = get_peft_model(model, lora)  # autocast_adapter_dtype: fp32 factors on a bf16/fp16 base
    except ValueError as error:
        raise LoriteError(f"LoRA target modules {targets!r}: {error}") from error
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:  # fp32 master weights, fp32 optimizer state
            param.data = param.data.float()
    if config.init_scale != 1.0:
        with torch.no_grad():
            for pair in find_lora_pairs(model).pairs:
                pair.A.mul_(config.init_scale)
                pair.B.div_(config.init_scale)
    return model


def save(model, out: Path, state_dict: dict | None = None) -> None:
    """The adapter only (``adapter/`` with peft's safetensors), written atomically. ``state_dict``: the whole
    model's tensors when the module's own are sharded (FSDP2)."""
    with atomic_directory(Path(out) / ADAPTER_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
