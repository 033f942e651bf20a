"""LoRA-aware optimizers. Imports with torch alone; peft is only ever *used* through the model you pass.

* :class:`LoRARite` — LoRA-RITE (arXiv 2410.20625), transformation invariant;
* :func:`find_lora_pairs` — (A, B) pairs found by module, for any optimizer of your own.
"""

from ._base import PairOptimizer, PairOptimizerFactory
from .lora_rite import LoRARite, LoRARiteFactory
from .pairs import LoraPair, PairScan, UnpairedParameter, find_lora_pairs

__all__ = [
    "LoRARite",
    "LoRARiteFactory",
    "LoraPair",
    "PairOptimizer",
    "PairOptimizerFactory",
    "PairScan",
    "UnpairedParameter",
    "find_lora_pairs",
]
