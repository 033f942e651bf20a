"""LoRA-aware optimizers behind one API. Imports with torch alone; peft is only ever *used* through the
model you pass.

* :func:`create` ``(name, model, **hparams)`` builds any of :func:`available` over a peft model
  (:func:`default_lr` is the rate it uses when ``lr`` is not given);
* :class:`LoRARite` — LoRA-RITE (arXiv 2410.20625), transformation invariant — and the paper's baselines
  :class:`LoRAPlus`, :class:`ScaledAdam`, :class:`Shampoo`, :class:`Lamb` (plus torch's AdamW);
* :func:`find_lora_pairs` — (A, B) pairs found by module, for any optimizer of your own.

Adding an optimizer: one file in this package and one :data:`REGISTRY` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._base import PairOptimizer, PairOptimizerFactory
from .adamw import create_adamw
from .fira import FiraAdamW
from .galore import GaLoreAdamW
from .lamb import Lamb, LambFactory
from .lora_plus import LoRAPlus, LoRAPlusFactory
from .lora_rite import VARIANT_LR, LoRARite, LoRARiteFactory
from .pairs import LoraPair, PairScan, UnpairedParameter, find_lora_pairs
from .scaled_adam import ScaledAdam, ScaledAdamFactory
from .shampoo import Shampoo, ShampooFactory


@dataclass(frozen=True)
class OptimizerEntry:
    """A registry entry: how to build the optimizer from a model, what it is, and its default learning
    rate (the constructor's own; it lies inside the entry's ``--lrs auto`` grid of ``lorite compare``)."""

    build: Callable[..., torch.optim.Optimizer]
    description: str
    paper: str
    lr: float


def _lora_rite_reference(model: nn.Module, **hparams: Any) -> LoRARite:
    return LoRARite.from_model(model, variant="reference", **hparams)


REGISTRY: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(
        create_adamw, "torch.optim.AdamW (fused on CUDA) over the LoRA parameters", "arXiv 1711.05101", 1e-4
    ),
    "lora_plus": OptimizerEntry(
        LoRAPlus.from_model,
        "AdamW with lr_B = ratio × lr_A for peft's lora_B (ratio 16)",
        "arXiv 2402.12354",
        1e-4,
    ),
    "scaled_adam": OptimizerEntry(
        ScaledAdam.from_model,
        "AdamW on gradients preconditioned by (BᵀB+δI)⁻¹ and (AAᵀ+δI)⁻¹",
        "arXiv 2402.02347",
        1e-4,
    ),
    "shampoo": OptimizerEntry(
        Shampoo.from_model,
        "Shampoo per factor, blocked, roots every k steps, Adam grafting",
        "arXiv 1802.09568",
        1e-4,
    ),
    "lamb": OptimizerEntry(
        Lamb.from_model, "Adam direction with a per-tensor trust ratio", "arXiv 1904.00962", 1e-3
    ),
    "lora_rite": OptimizerEntry(
        LoRARite.from_model,
        "LoRA-RITE, the paper's Algorithm 1 with escaped mass (invariant)",
        "arXiv 2410.20625",
        VARIANT_LR["paper"],
    ),
    "lora_rite_reference": OptimizerEntry(
        _lora_rite_reference,
        "LoRA-RITE as the authors' PyTorch code runs it (invariant)",
        "arXiv 2410.20625",
        VARIANT_LR["reference"],
    ),
    "galore_adamw": OptimizerEntry(
        GaLoreAdamW.from_model,
        "GaLore: Adam on a rank-r projection of each attn/mlp weight gradient (full weights; AdamW for the "
        "rest; on a peft model: the LoRA factors)",
        "arXiv 2403.03507",
        1e-3,
    ),
    "fira_adamw": OptimizerEntry(
        FiraAdamW.from_model,
        "Fira: GaLore plus the norm-scaled out-of-subspace residual and the norm-growth limiter",
        "arXiv 2410.01623",
        1e-3,
    ),
}


def available() -> dict[str, str]:
    """Registry names with a one-line description each."""
    return {name: entry.description for name, entry in REGISTRY.items()}


def default_lr(name: str) -> float:
    """The learning rate :func:`create` gives optimizer ``name`` when ``hparams`` has none."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name].lr


def create(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (see :func:`available`) over the trainable parameters of ``model``.

    Pair optimizers find LoRA pairs by module and put every other trainable parameter in an AdamW
    fallback group; ``hparams`` go to the optimizer (``lr``, when missing or None :func:`default_lr`;
    ``betas``, …; unknown ones raise).
    """
    if hparams.get("lr") is None:
        hparams["lr"] = default_lr(name)
    return REGISTRY[name].build(model, **hparams)


__all__ = [
    "REGISTRY",
    "FiraAdamW",
    "GaLoreAdamW",
    "Lamb",
    "LambFactory",
    "LoRAPlus",
    "LoRAPlusFactory",
    "LoRARite",
    "LoRARiteFactory",
    "LoraPair",
    "OptimizerEntry",
    "PairOptimizer",
    "PairOptimizerFactory",
    "PairScan",
    "ScaledAdam",
    "ScaledAdamFactory",
    "Shampoo",
    "ShampooFactory",
    "UnpairedParameter",
    "available",
    "create",
    "default_lr",
    "find_lora_pairs",
]
