"""Batched ``r × r`` linear algebra shared by the pair optimizers.

Every function takes stacks of small matrices (``(N, r, r)``) so that one library call serves all LoRA
pairs of equal rank, and works in the dtype it is given — callers promote to at least float32 first,
because CUDA's ``qr``/``eigh``/``svd`` reject bf16/fp16. Nothing here reads tensor values on the host
(on CUDA with Triton; see :func:`eigh_small`).
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


def cholesky_factor(
    gram: torch.Tensor, tolerance_dtype: torch.dtype, relative_tolerance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular ``R`` with ``RᵀR = gram`` for a stack of Gram matrices ``X̄ᵀX̄`` — the ``R`` of the
    thin QR ``X̄ = QR`` — and ``full_rank`` (N,).

    ``cholesky_ex`` never synchronises with the host. ``full_rank`` is False where the factorisation
    failed or ``R``'s diagonal says the factor is rank deficient: ``min|R_ii| ≤ tol·max|R_ii|`` with
    ``tol = max(r·ε, relative_tolerance)``, ε of ``tolerance_dtype`` (the data's precision, so by default
    numerically singular only); there ``R`` is 0. The ratio is scale-free, like the factor's conditioning.
    """
    L, info = torch.linalg.cholesky_ex(gram)
    R = L.mT
    diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
    tolerance = max(gram.shape[-1] * torch.finfo(tolerance_dtype).eps, relative_tolerance)
    full_rank = (info == 0) & torch.isfinite(diagonal).all(dim=-1)
    full_rank &= diagonal.amin(dim=-1) > tolerance * diagonal.amax(dim=-1)
    return masked(full_rank, R, 0.0), full_rank


def masked(keep: torch.Tensor, value: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    """``torch.where(keep[:, None, None], value, other)`` — skipped on CPU when every entry is kept (there a
    value check is free; on GPUs it would be a host synchronisation, and under torch.compile a graph break,
    so there the where always runs)."""
    if value.device.type == "cpu" and not torch.compiler.is_compiling() and bool(keep.all()):
        return value
    return torch.where(keep.view(-1, *([1] * (value.dim() - 1))), value, other)


def triangular_inverse(R: torch.Tensor, full_rank: torch.Tensor) -> torch.Tensor:
    """``R⁻¹`` of upper-triangular ``(N, r, r)`` matrices, and 0 where ``full_rank`` is False.

    The zero plays the role of the pseudo-inverse at peft's ``B = 0`` start (``pinv(0) = 0``): the factor
    whose partner is zero gets a zero unmagnified gradient instead of NaN.
    """
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    safe = masked(full_rank, R, eye)  # never divide by a zero diagonal
    return masked(full_rank, torch.linalg.solve_triangular(safe, eye, upper=True), 0.0)


def eigh_route(V: torch.Tensor) -> str:
    """Which solver :func:`eigh_small` uses for ``V``: ``"jacobi"`` or ``"torch"``."""
    from . import _jacobi  # lazy: _jacobi imports Triton where it is installed (slow to import)

    if V.is_cuda and V.dtype == torch.float32 and _jacobi.available():
        return "jacobi"
    return "torch"


def eigh_small(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a stack of small symmetric matrices.

    - CPU: ``torch.linalg.eigh`` (LAPACK).
    - CUDA, fp32, at every size: lorite's Triton Jacobi kernels (:mod:`lorite.optim._jacobi`), which never
      synchronise with the host (``torch.linalg.eigh`` there checks cuSOLVER's status with ``.item()``)
      and so can be captured in a CUDA graph. Up to 16 × 16 the matrix is held in registers; above, in
      global memory, where it stays L1/L2-resident (one-sided Jacobi there is faster than the register
      version from 32 × 32 on, and cuSOLVER loops over per-matrix ``syevd`` calls; measured in
      benchmarks/RESULTS.md).
    - Otherwise (fp64 on CUDA, no Triton): ``torch.linalg.eigh``.

    Eigenvalues are not sorted on the Triton path; sort them where order matters.
    """
    if eigh_route(V) == "jacobi":
        from . import _jacobi  # lazy: _jacobi imports Triton where it is installed (slow to import)

        return _jacobi.jacobi_eigh(V)
    return torch.linalg.eigh(V)


def eigvalsh_small(V: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (unsorted on the Jacobi path) of a stack of small symmetric matrices; routes as
    :func:`eigh_small`."""
    if eigh_route(V) == "jacobi":
        from . import _jacobi  # lazy: _jacobi imports Triton where it is installed (slow to import)

        return _jacobi.jacobi_eigh(V)[0]
    return torch.linalg.eigvalsh(V)


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


def eigenvalue_shift(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``d_λ = max_i |λ↑_i − μ↑_i|`` for two stacks of eigenvalues ``(N, r)`` (sorted here). Shape ``(N,)``."""
    return (old.sort(dim=-1).values - new.sort(dim=-1).values).abs().amax(dim=-1)


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
