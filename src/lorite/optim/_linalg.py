"""Batched ``r × r`` linear algebra shared by the pair optimizers.

Every function takes stacks of small matrices (``(N, r, r)``) so that one library call serves all LoRA
pairs of equal rank, and works in the dtype it is given — callers promote to at least float32 first,
because CUDA's ``qr``/``eigh``/``svd`` reject bf16/fp16. Nothing here reads tensor values on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for optimizer state and linear algebra: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def symmetrize(X: torch.Tensor) -> torch.Tensor:
    """``(X + Xᵀ)/2`` over the last two dims: removes the asymmetry that roundoff adds before ``eigh``."""
    return (X + X.mT) * 0.5


def pinv(R: torch.Tensor) -> torch.Tensor:
    """Batched Moore–Penrose pseudo-inverse of ``r × r`` matrices.

    The pseudo-inverse (not the inverse) keeps the B = 0 initialisation well defined: ``pinv(0) = 0``, so
    the factor whose partner is zero gets a zero unmagnified gradient instead of NaN.
    """
    return torch.linalg.pinv(R)


def inverse_sqrt_from_eigh(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    shift: torch.Tensor | float,
    eps_root: float,
    eps: float,
) -> torch.Tensor:
    """``K = E diag(1 / (√(max(λ, 0) + shift + eps_root) + eps)) Eᵀ`` from ``(λ, E) = eigh(V)``.

    Eigenvalues are clamped at 0 (roundoff can make a PSD matrix slightly indefinite); ``shift`` is a
    per-matrix ``(N,)`` tensor (LoRA-RITE's escaped mass ρ) or a float. ``eps_root + eps`` must be > 0
    so that ``V = 0`` (a zero gradient) gives a finite ``K``.
    """
    shift = torch.as_tensor(shift, dtype=eigenvalues.dtype, device=eigenvalues.device)
    if shift.dim() == 1:
        shift = shift[:, None]
    scale = 1.0 / ((eigenvalues.clamp(min=0) + shift + eps_root).sqrt() + eps)
    return (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.mT


def eigenvalue_shift(V: torch.Tensor, V_rotated: torch.Tensor) -> torch.Tensor:
    """``d_λ(V, Ṽ) = max_i |λ↑_i(V) − λ↑_i(Ṽ)|`` per matrix, eigenvalues sorted ascending. Shape ``(N,)``."""
    both = torch.linalg.eigvalsh(torch.cat([V, V_rotated]))
    old, new = both.split(V.shape[0])
    return (old - new).abs().amax(dim=-1)


def concat_apply(fn: Callable[..., Any], *stack_lists: Sequence[torch.Tensor]) -> list:
    """Apply a batched ``fn`` once to concatenated stacks and split the result back.

    ``stack_lists`` are equally long lists of ``(N_i, …)`` stacks; ``fn`` receives one concatenation per
    list. One library call for every bucket of equal rank instead of one per bucket (fewer launches).
    Returns one result (or tuple of results) per position.
    """
    sizes = [s.shape[0] for s in stack_lists[0]]
    if len(sizes) == 1:
        return [fn(*(stacks[0] for stacks in stack_lists))]
    out = fn(*(torch.cat(list(stacks)) for stacks in stack_lists))
    if isinstance(out, tuple):
        parts = [o.split(sizes) for o in out]
        return [tuple(p[i] for p in parts) for i in range(len(sizes))]
    return list(out.split(sizes))
