"""Shampoo (Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
practical form after Anil et al., "Scalable Second Order Optimization for Deep Learning", arXiv
2002.09018) applied to each LoRA factor."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ._base import PairOptimizer, PairOptimizerFactory
from ._linalg import compute_dtype, symmetrize
from .pairs import tall_view


def inverse_root(S: torch.Tensor, root: int, epsilon: float) -> torch.Tensor:
    """``(S + εI)^{-1/root}`` for a stack of symmetric PSD matrices (eigenvalues clamped at 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetrize(S))
    scale = (eigenvalues.clamp(min=0) + epsilon) ** (-1.0 / root)
    return (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.mT


def block_layout(rows: int, block_size: int) -> tuple[int, int]:
    """``(n_blocks, block_rows)``: the tall factor's rows cut into equal blocks (the last one zero-padded)."""
    if rows <= block_size:
        return 1, rows
    return math.ceil(rows / block_size), block_size


class Shampoo(PairOptimizer):
    r"""Shampoo on every LoRA factor, grafted to Adam's per-tensor step size.

    For a factor's tall view ``X`` (``Aᵀ``: ``n × r``; ``B``: ``m × r``) with gradient ``G``, its rows cut
    into blocks ``G_j`` of at most ``block_size`` rows (a ``rows × rows`` statistic would cost
    O(rows²) memory; Distributed Shampoo blocks the same way):

    .. math::
        L_j &\leftarrow \beta_2 L_j + (1-\beta_2) G_j G_j^\top \qquad
        R_j \leftarrow \beta_2 R_j + (1-\beta_2) G_j^\top G_j \\
        D_j &= (L_j + \epsilon I)^{-1/4}\, G_j\, (R_j + \epsilon I)^{-1/4}
            \quad\text{(roots recomputed every } k \text{ steps)} \\
        a &= \frac{G}{\sqrt{\hat v} + \epsilon_g}, \quad v \leftarrow \beta_2 v + (1-\beta_2) G^2
            \quad\text{(Adam grafting)} \qquad u = \frac{\|a\|_F}{\|D\|_F}\, D \\
        m &\leftarrow \beta_1 m + (1-\beta_1) u \qquad X \leftarrow X - \eta\,(\hat m + \lambda_{wd} X)

    Symbols: η = ``lr``; (β1, β2) = ``betas``; ε = ``epsilon``; k = ``precondition_frequency``;
    ε_g = ``grafting_eps``; λ_wd = ``weight_decay``; block size = ``block_size``. Grafting takes the
    *direction* from Shampoo and the per-tensor *step size* from Adam, as practical Shampoo does. Factors
    of equal shape are stacked so that statistics, roots and products are batched calls. State (fp32):
    statistics and their inverse roots per block, Adam's second moment and the momentum.

    Shampoo is not invariant even to scalar rescaling of the factors (LoRA-RITE paper, §2).
    """

    pair_defaults: ClassVar[dict[str, Any]] = {
        "betas": (0.9, 0.999),
        "epsilon": 1e-12,
        "precondition_frequency": 10,
        "block_size": 1024,
        "grafting_eps": 1e-8,
        "weight_decay": 0.0,
        "shampoo_steps": 0,  # steps taken by the group: schedules the root recomputation
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        precondition_frequency: int = 10,
        block_size: int = 1024,
        grafting_eps: float = 1e-8,
        weight_decay: float = 0.0,
        **fallback: Any,
    ) -> None:
        hparams = {
            "betas": tuple(betas),
            "epsilon": epsilon,
            "precondition_frequency": precondition_frequency,
            "block_size": block_size,
            "grafting_eps": grafting_eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, lr, hparams, **fallback)

    def _check_pair_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        for key in ("precondition_frequency", "block_size"):
            if not (isinstance(group[key], int) and group[key] >= 1):
                raise ValueError(f"{where}: {key} must be a positive integer, got {group[key]!r}")
        if not float(group["epsilon"]) > 0:
            raise ValueError(f"{where}: epsilon must be > 0 (zero statistics at B = 0 need it)")

    def _init_state(self, param: torch.Tensor, tall: torch.Tensor, block_size: int) -> None:
        rows, rank = tall.shape
        n_blocks, block_rows = block_layout(rows, block_size)
        opts = dict(dtype=compute_dtype(param.dtype), device=param.device)
        self.state[param].update(
            step=torch.zeros((), dtype=torch.float32, device=param.device),
            exp_avg=torch.zeros(rows, rank, **opts),
            exp_avg_sq=torch.zeros(rows, rank, **opts),
            left=torch.zeros(n_blocks, block_rows, block_rows, **opts),
            right=torch.zeros(n_blocks, rank, rank, **opts),
            left_root=torch.zeros(n_blocks, block_rows, block_rows, **opts),
            right_root=torch.zeros(n_blocks, rank, rank, **opts),
        )

    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            group["shampoo_steps"] += 1
            recompute_roots = (group["shampoo_steps"] - 1) % group["precondition_frequency"] == 0
            buckets: dict[tuple, list[tuple[torch.Tensor, bool]]] = defaultdict(list)
            for A, B in self.pairs_with_grads(group):
                for factor, is_A in ((A, True), (B, False)):
                    tall = tall_view(factor, is_A)
                    if not self.state[factor]:
                        self._init_state(factor, tall, group["block_size"])
                    buckets[(tuple(tall.shape), factor.dtype, factor.device)].append((factor, is_A))
            for factors in buckets.values():
                self._step_bucket(group, factors, recompute_roots)

    def _step_bucket(self, group: dict[str, Any], factors: list, recompute_roots: bool) -> None:
        params = [f for f, _ in factors]
        states = [self.state[p] for p in params]
        dtype = states[0]["exp_avg"].dtype
        beta1, beta2 = group["betas"]
        X = torch.stack([tall_view(p, is_A) for p, is_A in factors]).to(dtype)
        G = torch.stack([tall_view(p.grad, is_A) for p, is_A in factors]).to(dtype)
        count, rows, rank = G.shape
        n_blocks, block_rows = states[0]["left"].shape[:2]

        def stacked(key):
            return torch.stack([s[key] for s in states]).flatten(0, 1)

        # statistics and (every k steps) their inverse fourth roots, per block
        blocks = F.pad(G, (0, 0, 0, n_blocks * block_rows - rows)).reshape(count * n_blocks, block_rows, rank)
        left = beta2 * stacked("left") + (1 - beta2) * (blocks @ blocks.mT)
        right = beta2 * stacked("right") + (1 - beta2) * (blocks.mT @ blocks)
        if recompute_roots:
            left_root = inverse_root(left, 4, group["epsilon"])
            right_root = inverse_root(right, 4, group["epsilon"])
        else:
            left_root, right_root = stacked("left_root"), stacked("right_root")
        shampoo = (left_root @ blocks @ right_root).reshape(count, n_blocks * block_rows, rank)[:, :rows]

        # Adam grafting: Shampoo's direction, Adam's per-tensor step size
        step = torch.stack([s["step"] for s in states]) + 1
        exp_avg_sq = beta2 * torch.stack([s["exp_avg_sq"] for s in states]) + (1 - beta2) * G.square()
        correction2 = (1 - beta2 ** step.to(dtype))[:, None, None]
        adam = G / ((exp_avg_sq / correction2).sqrt() + group["grafting_eps"])
        adam_norm = adam.flatten(1).norm(dim=1)
        shampoo_norm = shampoo.flatten(1).norm(dim=1).clamp(min=torch.finfo(dtype).tiny)
        grafted = shampoo * (adam_norm / shampoo_norm)[:, None, None]

        exp_avg = beta1 * torch.stack([s["exp_avg"] for s in states]) + (1 - beta1) * grafted
        correction1 = (1 - beta1 ** step.to(dtype))[:, None, None]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=X.device, dtype=dtype)
        X_new = X - lr * (exp_avg / correction1 + group["weight_decay"] * X)
        torch._foreach_copy_([tall_view(p, is_A) for p, is_A in factors], list(X_new.unbind(0)))

        new_state = {
            "step": step,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "left": left.unflatten(0, (count, n_blocks)),
            "right": right.unflatten(0, (count, n_blocks)),
        }
        if recompute_roots:
            new_state["left_root"] = left_root.unflatten(0, (count, n_blocks))
            new_state["right_root"] = right_root.unflatten(0, (count, n_blocks))
        for key, values in new_state.items():
            torch._foreach_copy_([s[key] for s in states], list(values.unbind(0)))


class ShampooFactory(PairOptimizerFactory):
    """HF Trainer factory for :class:`Shampoo`."""

    optimizer_cls = Shampoo
