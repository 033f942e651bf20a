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


def inverse_root(
    S: torch.Tensor, root: int, epsilon: float, relative_epsilon: float = 1e-6, method: str = "auto"
) -> torch.Tensor:
    """``(S + (ε + ε_rel·‖S‖_F) I)^{-1/root}`` for a stack of symmetric PSD matrices.

    The relative part keeps the root well defined in fp32: a rank-deficient statistic (early in training,
    every LoRA factor's is) has eigenvalues at roundoff level, ~1e-7·‖S‖, which an absolute 1e-12 cannot
    dominate — the Newton iteration then diverges and the eigendecomposition amplifies noise.

    ``"eigh"`` (CPU default): eigendecomposition, eigenvalues clamped at 0. ``"newton"`` (CUDA default):
    the coupled Newton iteration of Guo & Higham (SIAM J. Matrix Anal. Appl. 28, 2006), matrix products
    only — batched ``eigh`` of hundreds of 256 × 256 blocks takes seconds on a GPU (cuSOLVER loops over
    the batch), the iteration milliseconds.
    """
    if method == "auto":
        method = "newton" if S.is_cuda else "eigh"
    S = symmetrize(S)
    epsilon = epsilon + relative_epsilon * torch.linalg.matrix_norm(S)[:, None]
    if method == "eigh":
        eigenvalues, eigenvectors = torch.linalg.eigh(S)
        scale = (eigenvalues.clamp(min=0) + epsilon) ** (-1.0 / root)
        return (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.mT
    return newton_inverse_root(S, root, epsilon)


def newton_inverse_root(S: torch.Tensor, root: int, epsilon, iterations: int = 40) -> torch.Tensor:
    r"""Coupled Newton iteration for ``(S + εI)^{-1/p}``:

    .. math::
        z = \frac{1 + p}{2\|A\|_F},\; X_0 = z^{1/p} I,\; M_0 = zA; \qquad
        T_k = \frac{(p+1) I - M_k}{p},\; X_{k+1} = X_k T_k,\; M_{k+1} = T_k^p M_k

    ``M_k → I`` and ``X_k → A^{-1/p}``, quadratically once close; a fixed number of iterations (no
    data-dependent stopping, hence no host synchronisation) covers condition numbers up to ~1e12.
    """
    n = S.shape[-1]
    eye = torch.eye(n, dtype=S.dtype, device=S.device)
    epsilon = torch.as_tensor(epsilon, dtype=S.dtype, device=S.device).reshape(-1, 1, 1)
    A = S + epsilon * eye
    z = (1 + root) / (2 * torch.linalg.matrix_norm(A).clamp(min=torch.finfo(S.dtype).tiny))
    X = z[:, None, None] ** (1.0 / root) * eye
    M = z[:, None, None] * A
    for _ in range(iterations):
        T = ((root + 1) * eye - M) / root
        X = X @ T
        M = torch.linalg.matrix_power(T, root) @ M
    return X


def block_layout(rows: int, block_size: int) -> tuple[int, int]:
    """``(n_blocks, block_rows)``: the tall factor's rows cut into equal blocks (the last one zero-padded)."""
    if rows <= block_size:
        return 1, rows
    return math.ceil(rows / block_size), block_size


class Shampoo(PairOptimizer):
    r"""Shampoo on every LoRA factor, grafted to Adam's per-tensor step size.

    For a factor's tall view ``X`` (``Aᵀ``: ``n × r``; ``B``: ``m × r``) with gradient ``G``, its rows cut
    into blocks ``G_j`` of at most ``block_size`` rows (a ``rows × rows`` statistic would cost
    O(rows²) memory and its root O(rows³) time; Distributed Shampoo blocks the same way):

    .. math::
        L_j &\leftarrow \beta_2 L_j + (1-\beta_2) G_j G_j^\top \qquad
        R_j \leftarrow \beta_2 R_j + (1-\beta_2) G_j^\top G_j \\
        D_j &= (L_j + \epsilon I)^{-1/4}\, G_j\, (R_j + \epsilon I)^{-1/4}
            \quad\text{(roots recomputed every } k \text{ steps)} \\
        a &= \frac{G}{\sqrt{\hat v} + \epsilon_g}, \quad v \leftarrow \beta_2 v + (1-\beta_2) G^2
            \quad\text{(Adam grafting)} \qquad u = \frac{\|a\|_F}{\|D\|_F}\, D \\
        m &\leftarrow \beta_1 m + (1-\beta_1) u \qquad X \leftarrow X - \eta\,(\hat m + \lambda_{wd} X)

    Symbols: η = ``lr``; (β1, β2) = ``betas``; ε = ``epsilon`` + ``relative_epsilon``·‖L‖_F (the
    relative part keeps fp32 roots of rank-deficient statistics finite); k = ``precondition_frequency``;
    ε_g = ``grafting_eps``; λ_wd = ``weight_decay``; block size = ``block_size`` (256: LoRA factors have
    rows in the hundreds to tens of thousands). Inverse roots: eigendecomposition on CPU, the coupled
    Newton iteration on GPUs (:func:`inverse_root`). Grafting takes the
    *direction* from Shampoo and the per-tensor *step size* from Adam, as practical Shampoo does. Factors
    of equal shape are stacked so that statistics, roots and products are batched calls. State (fp32):
    statistics and their inverse roots per block, Adam's second moment and the momentum.

    Shampoo is not invariant even to scalar rescaling of the factors (LoRA-RITE paper, §2).
    """

    pair_defaults: ClassVar[dict[str, Any]] = {
        "betas": (0.9, 0.999),
        "epsilon": 1e-12,
        "relative_epsilon": 1e-6,
        "precondition_frequency": 10,
        "block_size": 256,
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
        relative_epsilon: float = 1e-6,
        precondition_frequency: int = 10,
        block_size: int = 256,
        grafting_eps: float = 1e-8,
        weight_decay: float = 0.0,
        **fallback: Any,
    ) -> None:
        hparams = {
            "betas": tuple(betas),
            "epsilon": epsilon,
            "relative_epsilon": relative_epsilon,
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
            damping = (group["epsilon"], group["relative_epsilon"])
            left_root = inverse_root(left, 4, *damping)
            right_root = inverse_root(right, 4, *damping)
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
