"""LoRA-aware optimizers behind one API. Imports with torch alone; peft is only ever *used* through the
model you pass.

* :func:`create` ``(name, model, **hparams)`` builds any of :func:`available` over a peft model;
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
from .lora_rite import LoRARite, LoRARiteFactory
from .pairs import LoraPair, PairScan, UnpairedParameter, find_lora_pairs
from .scaled_adam import ScaledAdam, ScaledAdamFactory
from .shampoo import Shampoo, ShampooFactory


@dataclass(frozen=True)
class OptimizerEntry:
    """A registry entry: how to build the optimizer from a model, and what it is."""

    build: Callable[..., torch.optim.Optimizer]
    description: str
    paper: str


def _lora_rite_reference(model: nn.Module, **hparams: Any) -> LoRARite:
    return LoRARite.from_model(model, variant="reference", **hparams)


REGISTRY: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(
        create_adamw, "torch.optim.AdamW (fused on CUDA) over the LoRA parameters", "arXiv 1711.05101"
    ),
    "lora_plus": OptimizerEntry(
        LoRAPlus.from_model, "AdamW with lr_B = ratio × lr_A for peft's lora_B (ratio 16)", "arXiv 2402.12354"
    ),
    "scaled_adam": OptimizerEntry(
        ScaledAdam.from_model,
        "AdamW on gradients preconditioned by (BᵀB+δI)⁻¹ and (AAᵀ+δI)⁻¹",
        "arXiv 2402.02347",
    ),
    "shampoo": OptimizerEntry(
        Shampoo.from_model,
        "Shampoo per factor, blocked, roots every k steps, Adam grafting",
        "arXiv 1802.09568",
    ),
    "lamb": OptimizerEntry(
        Lamb.from_model, "Adam direction with a per-tensor trust ratio", "arXiv 1904.00962"
    ),
    "lora_rite": OptimizerEntry(
        LoRARite.from_model,
        "LoRA-RITE, the paper's Algorithm 1 with escaped mass (invariant)",
        "arXiv 2410.20625",
    ),
    "lora_rite_reference": OptimizerEntry(
        _lora_rite_reference, "LoRA-RITE as the authors' PyTorch code runs it (invariant)", "arXiv 2410.20625"
    ),
    "galore_adamw": OptimizerEntry(
        GaLoreAdamW.from_model,
        "GaLore: Adam on a rank-r projection of each attn/mlp weight gradient (full weights; AdamW for the "
        "rest; on a peft model: the LoRA factors)",
        "arXiv 2403.03507",
    ),
    "fira_adamw": OptimizerEntry(
        FiraAdamW.from_model,
        "Fira: GaLore plus the norm-scaled out-of-subspace residual and the norm-growth limiter",
        "arXiv 2410.01623",
    ),
}


def available() -> dict[str, str]:
    """Registry names with a one-line description each."""
    return {name: entry.description for name, entry in REGISTRY.items()}


def create(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (see :func:`available`) over the trainable parameters of ``model``.

    Pair optimizers find LoRA pairs by module and put every other trainable parameter in an AdamW
    fallback group; ``hparams`` go to the optimizer (``lr``, ``betas``, …; unknown ones raise).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(REGISTRY)}")
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
    "find_lora_pairs",
]
