"""``W ≈ Q + L1·L2``: the alternating decomposition of one matrix (or a batch of same-shaped matrices) into
an NF-k quantized ``Q`` and a rank-r ``L1·L2``, optionally under a rank-1 Fisher weighting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..quant import QuantConfig, QuantizedTensor, fake_quantize, quantize_batch
from .config import WEIGHTINGS


@dataclass
class LQDecomposition:
    """One matrix as ``Q + L1·L2``.

    Attributes:
        quantized: ``Q`` in NF-k storage.
        L1: ``m × r`` (``None`` for plain quantization).
        L2: ``r × n`` (``None`` for plain quantization).
        error: ``‖W − (Q + L1·L2)‖_F``, Fisher-weighted (``‖√F ⊙ …‖_F``) when weights were given.
        trace: the error of every iterate, in order (stopping at the first that did not improve).
    """

    quantized: QuantizedTensor
    L1: torch.Tensor | None
    L2: torch.Tensor | None
    error: float
    trace: list[float] = field(default_factory=list)

    def reconstruction(self) -> torch.Tensor:
        """``Q + L1·L2`` in float32."""
        Q = self.quantized.dequantize()
        return Q if self.L1 is None else Q + self.L1.to(Q.device) @ self.L2.to(Q.device)  # type: ignore[union-attr]


def _orthonormal_basis(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of every ``Y[i]`` (k, m, q), by shifted Cholesky QR followed by
    two plain Cholesky QR passes (Fukaya et al., SIAM J. Sci. Comput. 42(1), 2020): only batched matmuls,
    Cholesky factorisations and triangular solves, which a GPU runs for many small matrices at once
    (batched Householder QR runs one matrix at a time). Falls back to Householder QR if Cholesky fails."""
    m, q = Y.shape[-2:]
    unit = torch.finfo(Y.dtype).eps / 2
    eye = torch.eye(q, device=Y.device, dtype=Y.dtype)
    basis = Y
    for shifted in (True, False, False):
        gram = basis.mT @ basis
        if shifted:  # ‖Y‖_F² ≥ ‖Y‖₂²: the shift that makes the first factorisation succeed
            size = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(Y.dtype).tiny)
            gram = gram + (11 * (m * q + q * (q + 1)) * unit * size)[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(Y).Q
        basis = torch.linalg.solve_triangular(factor, basis, upper=True, left=False)
    return basis


def _low_rank_svd(R: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int):
    """Top-``rank`` ``(U, S, V)`` of every ``R[i]`` (k, m, n), ``R ≈ U·diag(S)·Vᵀ``: randomized range finder
    (Halko, Martinsson, Tropp, arXiv 0909.4061, Alg. 4.4) with ``rank + oversample`` Gaussian probes drawn
    from ``seed`` and ``power_iters`` power iterations, re-orthonormalised after every product; then the
    SVD of the small ``B = QᵀR`` from the eigendecomposition of ``B·Bᵀ`` (q × q, in float64 on the CPU).
    Exact SVD when the probes would cover the smaller side anyway."""
    m, n = R.shape[-2:]
    if rank + oversample >= min(m, n):
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return U[..., :rank], S[..., :rank], Vh[..., :rank, :].mT
    probes = rank + oversample
    generator = torch.Generator(device=R.device).manual_seed(seed)
    omega = torch.randn(n, probes, generator=generator, device=R.device, dtype=R.dtype)
    basis = _orthonormal_basis(R @ omega)
    for _ in range(power_iters):
        basis = _orthonormal_basis(R @ _orthonormal_basis(R.mT @ basis))
    small = basis.mT @ R  # (k, q, n)
    gram = (small.double() @ small.double().mT).cpu()
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values = values.flip(-1)[:, :rank].clamp_min(0)
    vectors = vectors.flip(-1)[:, :, :rank].to(device=R.device, dtype=R.dtype)
    S = values.sqrt().to(device=R.device, dtype=R.dtype)
    U = basis @ vectors
    V = (small.mT @ vectors) / torch.where(S > 0, S, 1)[:, None, :]
    return U, S, V


def fisher_sides(fisher: torch.Tensor, weighting: str = "two-sided"):
    """``(D_row, D_col)`` of the rank-1 Fisher approximation for every ``fisher[i]`` (k, m, n):
    ``D_row = √(mean_j F_ij)``, ``D_col = √(mean_i F_ij)``, each floored at 1e-6 of its mean (and 1 where a
    whole matrix has no Fisher mass) so that unscaling never divides by zero. ``None`` for an unused side."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")

    def side(mean: torch.Tensor) -> torch.Tensor:
        D = mean.clamp_min(0).sqrt()
        level = D.mean(-1, keepdim=True)
        D = torch.maximum(D, 1e-6 * level)
        return torch.where(level > 0, D, torch.ones_like(D))

    row = side(fisher.float().mean(-1)) if weighting in ("two-sided", "row") else None
    col = side(fisher.float().mean(-2)) if weighting in ("two-sided", "col") else None
    return row, col


def _errors(E: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    if fisher is None:
        return torch.linalg.matrix_norm(E)
    return (fisher * E.square()).sum((-2, -1)).sqrt()


def _decompose(
    W: torch.Tensor,
    rank: int,
    config: QuantConfig,
    fisher: torch.Tensor | None,
    weighting: str,
    max_iter: int,
    oversample: int,
    power_iters: int,
    rtol: float,
    seed: int,
):
    """The alternating loop on a batch ``W`` (k, m, n): returns ``(best_error (k,), best_L1, best_L2,
    traces)``; the best ``Q`` is ``quant(W − L1·L2)`` again (quantization is deterministic)."""
    k = W.shape[0]
    row, col = fisher_sides(fisher, weighting) if fisher is not None else (None, None)
    Q = torch.zeros_like(W)
    best = torch.full((k,), math.inf, device=W.device)
    best_L1 = W.new_zeros(k, W.shape[1], rank)
    best_L2 = W.new_zeros(k, rank, W.shape[2])
    last = torch.full((k,), math.inf, device=W.device)
    active = torch.ones(k, dtype=torch.bool, device=W.device)
    traces: list[list[float]] = [[] for _ in range(k)]
    for iteration in range(max_iter):
        R = W - Q
        if row is not None:
            R = R * row[:, :, None]
        if col is not None:
            R = R * col[:, None, :]
        U, S, V = _low_rank_svd(R, rank, oversample, power_iters, seed * 1_000 + iteration)
        root = S.clamp_min(0).sqrt()
        L1 = U * root[:, None, :]
        L2 = (V * root[:, None, :]).transpose(1, 2)
        if row is not None:
            L1 = L1 / row[:, :, None]
        if col is not None:
            L2 = L2 / col[:, None, :]
        low_rank = L1 @ L2
        Q = fake_quantize(W - low_rank, config, batched=True)
        error = _errors(W - Q - low_rank, fisher)
        better = active & (error < best)
        best = torch.where(better, error, best)
        best_L1 = torch.where(better[:, None, None], L1, best_L1)
        best_L2 = torch.where(better[:, None, None], L2, best_L2)
        for i, (value, alive) in enumerate(zip(error.tolist(), active.tolist())):
            if alive:
                traces[i].append(value)
        # stop once the error no longer falls by a relative rtol (rtol = 0: as soon as it rises)
        active &= error < last * (1 - rtol)
        last = error
        if not bool(active.any()):
            break
    return best, best_L1, best_L2, traces


def _check_batch(weights: torch.Tensor, rank: int, fisher: torch.Tensor | None) -> None:
    if weights.dim() != 3:
        raise ValueError(f"expected a batch of matrices (k, m, n), got shape {tuple(weights.shape)}")
    if not 1 <= rank <= min(weights.shape[1:]):
        raise ValueError(
            f"rank must be in 1..{min(weights.shape[1:])} for {tuple(weights.shape[1:])}, got {rank}"
        )
    if fisher is not None and fisher.shape != weights.shape:
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}, the weights {tuple(weights.shape)}")


def lq_decompose_batch(
    weights: torch.Tensor,
    rank: int,
    config: QuantConfig,
    fisher: torch.Tensor | None = None,
    *,
    weighting: str = "two-sided",
    max_iter: int = 20,
    oversample: int = 10,
    power_iters: int = 2,
    rtol: float = 0.0,
    seed: int = 0,
) -> list[LQDecomposition]:
    """:func:`lq_decompose` of every ``weights[i]`` (k, m, n) in one batched pass (one GPU launch per step
    for all k). The randomized SVD draws its probes for the whole batch, so a matrix decomposed alone and in
    a batch may differ by the SVD's randomness."""
    _check_batch(weights, rank, fisher)
    W = weights.detach().float()
    F = None if fisher is None else fisher.detach().float()
    _, L1, L2, traces = _decompose(
        W, rank, config, F, weighting, max_iter, oversample, power_iters, rtol, seed
    )
    quantized = quantize_batch(W - L1 @ L2, config)
    errors = _errors(W - torch.stack([q.dequantize() for q in quantized]) - L1 @ L2, F).tolist()
    return [
        LQDecomposition(q, L1[i].contiguous(), L2[i].contiguous(), errors[i], traces[i])
        for i, q in enumerate(quantized)
    ]


def lq_decompose(
    weight: torch.Tensor,
    rank: int,
    config: QuantConfig,
    fisher: torch.Tensor | None = None,
    *,
    weighting: str = "two-sided",
    max_iter: int = 20,
    oversample: int = 10,
    power_iters: int = 2,
    rtol: float = 0.0,
    seed: int = 0,
) -> LQDecomposition:
    """``W ≈ Q + L1·L2`` by alternating a rank-``rank`` randomized SVD of ``W − Q`` and NF quantization
    (``config``) of ``W − L1·L2``, from ``Q = 0``.

    Args:
        weight: ``W`` (m × n), any float dtype and device (work is in float32 on that device).
        rank: ``r``.
        config: the storage format of ``Q``.
        fisher: optional ``F`` (m × n), the diagonal empirical Fisher; the SVD is weighted by its row/column
            approximation (``weighting``: "two-sided", "row", "col" or "none") and the error is
            ``‖√F ⊙ (W − Q − L1·L2)‖_F``.
        max_iter: at most this many SVD/quantization rounds.
        oversample: extra probes of the randomized SVD (rank + oversample in all).
        power_iters: power iterations of the randomized SVD.
        rtol: stop when an iterate's error is not below ``(1 − rtol)`` × the previous one (0: when it rises
            or stalls).
        seed: seeds the randomized SVD (reproducible costs).

    Returns:
        LQDecomposition: the iterate with the smallest error, and the error trace.
    """
    if weight.dim() != 2:
        raise ValueError(f"lq_decompose takes one matrix, got shape {tuple(weight.shape)}")
    return lq_decompose_batch(
        weight[None], rank, config, None if fisher is None else fisher[None], weighting=weighting,
        max_iter=max_iter, oversample=oversample, power_iters=power_iters, rtol=rtol, seed=seed,
    )[0]  # fmt: skip


def quantization_error(
    weights: torch.Tensor, config: QuantConfig, fisher: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖W_i − dequant(quant(W_i))‖_F`` (Fisher-weighted if given) of every ``weights[i]`` (k, m, n)."""
    W = weights.detach().float()
    return _errors(W - fake_quantize(W, config, batched=True), None if fisher is None else fisher.float())
