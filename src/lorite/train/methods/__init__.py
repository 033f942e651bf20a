"""Fine-tuning methods: what becomes trainable and how the result is saved.

A method is a :class:`Method` — ``prepare(model, config) -> model`` (freeze, wrap, attach adapters) and
``save(model, out_dir)`` (write what the run produced: an adapter, or the whole model) — registered in
:data:`METHODS` under its ``--method`` name. The training loop in :mod:`lorite.train.finetune` is the same
for every method, so runs that differ only in the method see the same data in the same order.

Each method's module is its training glue: it reads the run's settings (``FinetuneConfig``: rank, alpha,
target modules, ``method_args``), checks them with errors that name the option, and calls the plain modules
and math of :mod:`lorite.adapters`. A new method is a module here with ``prepare`` and ``save`` and one
:data:`METHODS` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import LoriteError
from . import full, loldu, lora, lq_lora


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable  # (model, FinetuneConfig) -> model with only the method's parameters trainable
    save: Callable  # (model, out_dir: Path) -> None; writes out_dir atomically (lora: also state_dict=)
    description: str = ""


METHODS: dict[str, Method] = {
    "lora": Method("lora", lora.prepare, lora.save, "peft LoRA adapters (rank, alpha, target modules)"),
    "full": Method("full", full.prepare, full.save, "every weight trains; saves the whole model"),
    "loldu": Method(
        "loldu", loldu.prepare, loldu.save, "LoLDU: r trainable pivots per matrix (arXiv 2410.13618)"
    ),
    "lq_lora": Method(
        "lq_lora", lq_lora.prepare, lq_lora.save, "LoRA over NF-quantized Q, W ≈ Q + L1·L2 (arXiv 2311.12023)"
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LoriteError(f"--method {name!r} is not supported; available: {', '.join(METHODS)}")
    return METHODS[name]
