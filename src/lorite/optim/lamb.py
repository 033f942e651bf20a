"""Lamb (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv 1904.00962) on LoRA factors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ._adam import adam_direction, init_adam_state
from ._base import PairOptimizer, PairOptimizerFactory


class Lamb(PairOptimizer):
    r"""Adam's direction with a per-tensor trust ratio.

    .. math::
        u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda_{wd} X \qquad
        X \leftarrow X - \eta\,\frac{\phi(\|X\|)}{\|u\|}\,u, \qquad \phi(x) = \min(x, c)

    per tensor (each LoRA factor separately); the ratio is 1 when ``‖X‖ = 0`` or ``‖u‖ = 0`` — so peft's
    ``B = 0`` start takes a plain Adam step. Symbols: η = ``lr``; (β1, β2) = ``betas``; ε = ``eps``;
    λ_wd = ``weight_decay``; c = ``max_trust_norm`` (``None``: no clamp).

    Lamb is invariant to rescaling both factors by a scalar (``(A/s, sB)``; exactly as ε → 0) but not to a
    general ``(T⁻¹A, BT)`` (LoRA-RITE paper, §2). Moments are kept in fp32 whatever the factor dtype.
    """

    pair_defaults: ClassVar[dict[str, Any]] = {
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
        "max_trust_norm": None,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust_norm: float | None = None,
        **fallback: Any,
    ) -> None:
        hparams = {
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_trust_norm": max_trust_norm,
        }
        super().__init__(params, lr, hparams, **fallback)

    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            params = [p for pair in self.pairs_with_grads(group) for p in pair]
            if not params:
                continue
            for p in params:
                init_adam_state(self.state[p], p)
            beta1, beta2 = group["betas"]
            states = [self.state[p] for p in params]
            updates = adam_direction(states, [p.grad for p in params], beta1, beta2, group["eps"])
            current = [p.to(u.dtype) for p, u in zip(params, updates)]
            if group["weight_decay"]:
                torch._foreach_add_(updates, current, alpha=group["weight_decay"])
            weight_norms = torch._foreach_norm(current)
            update_norms = torch._foreach_norm(updates)
            if group["max_trust_norm"] is not None:
                weight_norms = torch._foreach_clamp_max(weight_norms, group["max_trust_norm"])
            ratios = [
                torch.where((w > 0) & (u > 0), w / u.clamp(min=torch.finfo(u.dtype).tiny), 1.0)
                for w, u in zip(weight_norms, update_norms)
            ]
            torch._foreach_mul_(updates, ratios)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = lr.to(device=updates[0].device, dtype=updates[0].dtype)
            torch._foreach_mul_(updates, lr)
            torch._foreach_sub_(current, updates)
            torch._foreach_copy_(params, current)


class LambFactory(PairOptimizerFactory):
    """HF Trainer factory for :class:`Lamb`."""

    optimizer_cls = Lamb
