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


def cholesky_qr(X: torch.Tensor, work_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Thin QR ``X = Q·R`` of a stack of tall matrices ``(N, rows, r)`` by CholeskyQR2, in ``work_dtype``.

    Each pass: Gram ``XᵀX``, Cholesky ``LLᵀ``, ``R = Lᵀ``, ``Q = X R⁻¹`` (a triangular solve); the second
    pass re-orthogonalises the first's ``Q``. Only matrix products, ``cholesky_ex`` and triangular solves:
    fast on GPUs (``torch.linalg.qr`` loops over the batch there) and free of host synchronisation. The
    squared condition number of the Gram matrix is why the work happens in float64 by default: it stays
    exact for ``cond(X)`` up to ~1e7, beyond what fp32 factors can hold anyway.

    Returns ``(Q, R, full_rank)`` in ``X``'s dtype; ``full_rank`` (N,) is False where a Cholesky failed or
    R's diagonal says the factor is numerically rank deficient (``min|R_ii| ≤ r·ε·max|R_ii|``, ε of
    ``X``'s dtype). Where it is False, Q and R are set to 0 — callers treat such a factor like peft's
    ``B = 0`` start.
    """
    rank = X.shape[-1]
    Q = X.to(work_dtype)
    R = None
    full_rank = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        full_rank &= info == 0
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
        R = L.mT if R is None else L.mT @ R
    diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
    tolerance = rank * torch.finfo(X.dtype).eps
    full_rank &= torch.isfinite(diagonal).all(dim=-1) & (
        diagonal.amin(dim=-1) > tolerance * diagonal.amax(dim=-1)
    )
    keep = full_rank[:, None, None]
    return torch.where(keep, Q, 0.0).to(X.dtype), torch.where(keep, R, 0.0).to(X.dtype), full_rank


#: "auto": Householder QR (LAPACK) on CPU, CholeskyQR2 on GPUs. Tests set "cholesky" to run the GPU
#: algorithm on the CPU.
QR_METHOD = "auto"


def thin_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, R, full_rank)`` of a stack of tall matrices, with the conventions of :func:`cholesky_qr`.

    On CPU, LAPACK's Householder QR is both the faster and the more accurate choice; on CUDA,
    ``torch.linalg.qr`` loops over the batch (18 ms for 162 matrices of 2048 × 16 on an H100, against
    0.25 ms for CholeskyQR), so CholeskyQR2 in float64 is used there.
    """
    if QR_METHOD == "cholesky" or (QR_METHOD == "auto" and X.device.type != "cpu"):
        return cholesky_qr(X)
    Q, R = torch.linalg.qr(X)
    diagonal = R.diagonal(dim1=-2, dim2=-1).abs()
    tolerance = X.shape[-1] * torch.finfo(X.dtype).eps
    full_rank = torch.isfinite(diagonal).all(dim=-1) & (
        diagonal.amin(dim=-1) > tolerance * diagonal.amax(dim=-1)
    )
    if not bool(full_rank.all()):  # on CPU reading a value costs nothing
        keep = full_rank[:, None, None]
        Q, R = torch.where(keep, Q, 0.0), torch.where(keep, R, 0.0)
    return Q, R, full_rank


def masked(keep: torch.Tensor, value: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    """``torch.where(keep[:, None, None], value, other)`` — skipped on CPU when every entry is kept (there a
    value check is free; on GPUs it would be a host synchronisation, so the where always runs)."""
    if value.device.type == "cpu" and bool(keep.all()):
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


def pinv(R: torch.Tensor) -> torch.Tensor:
    """Batched Moore–Penrose pseudo-inverse of ``r × r`` matrices (``pinv(0) = 0``)."""
    return torch.linalg.pinv(R)


def eigh_small(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a stack of small symmetric matrices, without a host sync on CUDA.

    CUDA fp32: lorite's Triton Jacobi kernel (``torch.linalg.eigh`` there checks cuSOLVER's status with a
    host synchronisation). Elsewhere (CPU; fp64; no Triton): ``torch.linalg.eigh``. Eigenvalues are not
    sorted on the Triton path; sort them where order matters.
    """
    from . import _jacobi

    if V.is_cuda and V.dtype == torch.float32 and _jacobi.available():
        return _jacobi.jacobi_eigh(V)
    return torch.linalg.eigh(V)


def eigvalsh_small(V: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (unsorted on CUDA) of a stack of small symmetric matrices; see :func:`eigh_small`."""
    from . import _jacobi

    if V.is_cuda and V.dtype == torch.float32 and _jacobi.available():
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
