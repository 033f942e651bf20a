"""ScaledAdam — Riemannian preconditioned LoRA (Zhang & Pilanci, "Riemannian Preconditioned LoRA for
Fine-Tuning Foundation Models", arXiv 2402.02347)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ._adam import adam_direction, apply_update, init_adam_state
from ._base import PairOptimizer, PairOptimizerFactory
from ._linalg import compute_dtype


def scaled_gradients(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BᵀB + δI)⁻¹ ∇A`` and ``∇B (AAᵀ + δI)⁻¹`` for stacks ``A (N, r, n)``, ``B (N, m, r)``.

    Cholesky solves of the ``r × r`` Gram matrices (symmetric positive definite for δ > 0), in the dtype
    given (callers pass fp32 or fp64).
    """
    eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    gram_B = B.mT @ B + delta * eye
    gram_A = A @ A.mT + delta * eye
    chol_B, _ = torch.linalg.cholesky_ex(gram_B)
    chol_A, _ = torch.linalg.cholesky_ex(gram_A)
    scaled_A = torch.cholesky_solve(grad_A, chol_B)
    scaled_B = torch.cholesky_solve(grad_B.mT, chol_A).mT
    return scaled_A, scaled_B


class ScaledAdam(PairOptimizer):
    r"""AdamW on gradients preconditioned by the partner factor's Gram matrix.

    .. math::
        \tilde g_A = (B^\top B + \delta I)^{-1} \nabla A \qquad
        \tilde g_B = \nabla B\, (A A^\top + \delta I)^{-1} \qquad
        X \leftarrow X - \eta\,\big(\mathrm{Adam}(\tilde g_X) + \lambda_{wd} X\big)

    (A = ``lora_A`` is ``r × n``, B = ``lora_B`` is ``m × r``.) Symbols: η = ``lr``; δ = ``delta``;
    (β1, β2) = ``betas``; ε = ``eps``; λ_wd = ``weight_decay``. The preconditioning runs in fp32 (fp64 for
    fp64 factors) and the Adam moments are fp32.

    With ``adam_normalization=False`` the step is ``X ← X − η·m̂`` with ``m`` the EMA (β1) of ``g̃`` —
    ScaledGD with momentum, which *is* invariant to ``(T⁻¹A, BT)`` as δ → 0; Adam's elementwise
    normalisation breaks that (LoRA-RITE paper, §2). peft ships the same rule as
    ``create_riemannian_optimizer`` (``reg`` = δ, default 1e-2 there; 1e-6 here, as in the paper).
    """

    pair_defaults: ClassVar[dict[str, Any]] = {
        "delta": 1e-6,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "adam_normalization": True,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        *,
        delta: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adam_normalization: bool = True,
        **fallback: Any,
    ) -> None:
        hparams = {
            "delta": delta,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "adam_normalization": adam_normalization,
        }
        super().__init__(params, lr, hparams, **fallback)

    def _check_pair_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        if not float(group["delta"]) > 0:
            raise ValueError(f"{where}: delta must be > 0 (it keeps BᵀB + δI invertible at B = 0)")

    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for A, B in self.pairs_with_grads(group):
                buckets[(A.shape, B.shape, A.dtype, B.dtype, A.device)].append((A, B))
            params, scaled = [], []
            for pairs in buckets.values():
                dtype = compute_dtype(torch.promote_types(pairs[0][0].dtype, pairs[0][1].dtype))
                rank, out = pairs[0][0].shape[0], pairs[0][1].shape[0]

                def stack(tensors, shape, dtype=dtype):
                    return torch.stack([t.reshape(shape) for t in tensors]).to(dtype)

                A = stack([a for a, _ in pairs], (rank, -1))
                B = stack([b for _, b in pairs], (out, rank))
                grad_A = stack([a.grad for a, _ in pairs], (rank, -1))
                grad_B = stack([b.grad for _, b in pairs], (out, rank))
                scaled_A, scaled_B = scaled_gradients(A, B, grad_A, grad_B, float(group["delta"]))
                for (a, b), ga, gb in zip(pairs, scaled_A, scaled_B):
                    params += [a, b]
                    scaled += [ga.reshape(a.shape), gb.reshape(b.shape)]
            if not params:
                continue
            for p in params:
                init_adam_state(self.state[p], p)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            if group["adam_normalization"]:
                directions = adam_direction(states, scaled, beta1, beta2, group["eps"])
            else:
                directions = _momentum(states, scaled, beta1)
            apply_update(params, directions, group["lr"], group["weight_decay"])


def _momentum(states: list[dict], grads: list[torch.Tensor], beta1: float) -> list[torch.Tensor]:
    """Bias-corrected EMA of ``grads`` (ScaledGD with momentum): a linear, hence covariant, direction."""
    exp_avgs = [s["exp_avg"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    corrections = torch._foreach_pow(beta1, [t.to(m.dtype) for t, m in zip(steps, exp_avgs)])
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1)
    return torch._foreach_div(exp_avgs, corrections)


class ScaledAdamFactory(PairOptimizerFactory):
    """HF Trainer factory for :class:`ScaledAdam`."""

    optimizer_cls = ScaledAdam
