"""LoRA+ (Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ._adam import adam_direction, apply_update, init_adam_state
from ._base import PairOptimizer, PairOptimizerFactory


class LoRAPlus(PairOptimizer):
    r"""AdamW with a larger learning rate for the zero-initialised output factor.

    .. math::
        \eta_A = \eta \qquad \eta_B = \lambda\,\eta \qquad
        X \leftarrow X - \eta_X\,\big(\hat m_X / (\sqrt{\hat v_X} + \epsilon) + \lambda_{wd} X\big)

    Convention: ``B`` is peft's ``lora_B`` — the up-projection ``m × r`` that peft initialises to zero —
    and it gets ``λ = ratio`` times the learning rate of ``A`` (``lora_A``). The LoRA+ paper recommends
    ``λ ≈ 2⁴ = 16`` (the default). (The LoRA-RITE paper names the factors the other way round; its "B" is
    PEFT's ``Aᵀ``.)

    Args:
        params: ``(A, B)`` tuples or pair-group dicts; prefer :meth:`from_model`.
        lr: η, the learning rate of ``A``. ``ratio``: λ. ``betas``, ``eps``: Adam's.
        weight_decay: decoupled, λ_wd (multiplied by each factor's own learning rate, as in AdamW).
        **fallback: ``fallback_lr`` etc. for unpaired parameters (AdamW).

    Moments are kept in fp32 (fp64 for fp64 factors) whatever the factor dtype.
    """

    pair_defaults: ClassVar[dict[str, Any]] = {
        "ratio": 16.0,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        *,
        ratio: float = 16.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **fallback: Any,
    ) -> None:
        hparams = {"ratio": ratio, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, lr, hparams, **fallback)

    def _check_pair_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        if not float(group["ratio"]) > 0:
            raise ValueError(f"{where}: ratio (lr_B / lr_A) must be > 0, got {group['ratio']}")

    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            pairs = self.pairs_with_grads(group)
            if not pairs:
                continue
            beta1, beta2 = group["betas"]
            for index, lr in ((0, group["lr"]), (1, group["lr"] * group["ratio"])):
                params = [pair[index] for pair in pairs]
                for p in params:
                    init_adam_state(self.state[p], p)
                states = [self.state[p] for p in params]
                directions = adam_direction(states, [p.grad for p in params], beta1, beta2, group["eps"])
                apply_update(params, directions, lr, group["weight_decay"])


class LoRAPlusFactory(PairOptimizerFactory):
    """HF Trainer factory: ``Trainer(optimizer_cls_and_kwargs=(LoRAPlusFactory, {"lr": 1e-4}))``."""

    optimizer_cls = LoRAPlus
