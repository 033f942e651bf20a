"""Batched eigendecomposition of small symmetric matrices on the GPU without a host synchronisation.

``torch.linalg.eigh`` on CUDA checks cuSOLVER's error codes with ``.item()``: every call stalls the CPU
until the GPU has caught up, which serialises an optimizer step with the backward pass before it and
forbids CUDA-graph capture. LoRA-RITE needs the eigenvalues of hundreds of ``r × r`` matrices per step,
so this module provides a Triton kernel: cyclic Jacobi with round-robin (parallel) ordering, one program
per matrix, each round applying ``r/2`` disjoint plane rotations at once (``A ← JᵀAJ``, two
multiply-adds per entry).

Jacobi's method converges quadratically; ``sweeps`` full sweeps of ``n − 1`` rounds reach fp32
roundoff for ``n ≤ 64`` (the tests hold it to ``torch.linalg.eigh``). Matrices are zero-padded to a power
of two ≥ 16 (``tl.dot``'s minimum); padding never mixes with the real block because their couplings are 0.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds go without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None


def available() -> bool:
    return triton is not None


@functools.cache
def _round_robin(n: int, device: str) -> torch.Tensor:
    """``partner[k, i]``: whom index ``i`` is paired with in round ``k`` (circle method, n even)."""
    rounds = []
    others = list(range(1, n))
    for _ in range(n - 1):
        order = [0, *others]
        partner = [0] * n
        for i in range(n // 2):
            a, b = order[i], order[n - 1 - i]
            partner[a], partner[b] = b, a
        rounds.append(partner)
        others = others[-1:] + others[:-1]
    return torch.tensor(rounds, dtype=torch.int32, device=device)


if triton is not None:

    @triton.jit
    def _jacobi_kernel(
        a_ptr, values_ptr, vectors_ptr, partner_ptr, size, N: tl.constexpr, SWEEPS: tl.constexpr
    ):
        matrix = tl.program_id(0)
        rows = tl.arange(0, N)
        inside = (rows[:, None] < size) & (rows[None, :] < size)
        offsets = matrix * size * size + rows[:, None] * size + rows[None, :]
        A = tl.load(a_ptr + offsets, mask=inside, other=0.0)
        eye = rows[:, None] == rows[None, :]
        E = tl.where(eye, 1.0, 0.0)
        for _sweep in range(SWEEPS):
            for k in range(N - 1):
                partner = tl.load(partner_ptr + k * N + rows)
                pick = rows[None, :] == partner[:, None]  # row i selects column partner(i)
                diagonal = tl.sum(tl.where(eye, A, 0.0), axis=1)
                # A[i, partner(i)] and A[partner(i), i], averaged: roundoff makes A slightly asymmetric,
                # and the two members of a pair must compute the very same rotation or J is not orthogonal
                coupling = 0.5 * (
                    tl.sum(tl.where(pick, A, 0.0), axis=1) + tl.sum(tl.where(pick, A, 0.0), axis=0)
                )
                diagonal_partner = tl.sum(tl.where(pick, diagonal[None, :], 0.0), axis=1)
                first = rows < partner  # i is p of its pair (p, q), p < q
                a_pp = tl.where(first, diagonal, diagonal_partner)
                a_qq = tl.where(first, diagonal_partner, diagonal)
                # the rotation that zeroes A[p, q], the smaller of the two angles (|θ| ≤ π/4)
                safe = tl.where(coupling == 0.0, 1.0, coupling)
                tau = (a_qq - a_pp) / (2.0 * safe)
                sign = tl.where(tau >= 0.0, 1.0, -1.0)
                t = sign / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                t = tl.where(coupling == 0.0, 0.0, t)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                # J = diag(c) with J[p, q] = s, J[q, p] = −s. With the pairing as a permutation matrix
                # (products with it are exact), A ← JᵀAJ and E ← EJ cost two multiply-adds per entry:
                # (AJ)[:, j] = c_j A[:, j] − w_j A[:, partner(j)],  (JᵀB)[i, :] = c_i B[i, :] − w_i B[partner(i), :]
                w = tl.where(first, s, -s)
                swap = tl.where(pick, 1.0, 0.0)
                AJ = A * c[None, :] - tl.dot(A, swap, input_precision="ieee") * w[None, :]
                A = AJ * c[:, None] - tl.dot(swap, AJ, input_precision="ieee") * w[:, None]
                E = E * c[None, :] - tl.dot(E, swap, input_precision="ieee") * w[None, :]
        values = tl.sum(tl.where(eye, A, 0.0), axis=1)
        tl.store(values_ptr + matrix * size + rows, values, mask=rows < size)
        tl.store(vectors_ptr + offsets, E, mask=inside)


def _sweeps(n: int) -> int:
    return 8 if n <= 16 else 10 if n <= 32 else 12


def _warps(n: int) -> int:
    """Warps per matrix, chosen by measurement (``linalg_primitives.py --jacobi-warps``, benchmarks/RESULTS.md):
    four for tiles up to 32 × 32; above, every choice is slow and one warp the least so."""
    return 4 if n <= 32 else 1


def jacobi_eigh(
    A: torch.Tensor, sweeps: int | None = None, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (unsorted) and eigenvectors (columns) of a stack of symmetric ``(B, r, r)`` fp32
    matrices, with no host synchronisation. ``A = E diag(λ) Eᵀ``. ``sweeps``/``num_warps``: the
    defaults by size unless given (benchmarks/speed/linalg_primitives.py --jacobi-warps)."""
    if triton is None:
        raise RuntimeError("jacobi_eigh needs Triton (it ships with CUDA builds of torch)")
    if A.dtype != torch.float32:
        raise TypeError(f"jacobi_eigh works in float32, got {A.dtype}")
    batch, size = A.shape[0], A.shape[-1]
    n = max(16, 1 << (size - 1).bit_length())
    A = A.contiguous()
    values = torch.empty(batch, size, dtype=A.dtype, device=A.device)
    vectors = torch.empty_like(A)
    if batch:
        partner = _round_robin(n, str(A.device))
        _jacobi_kernel[(batch,)](
            A,
            values,
            vectors,
            partner,
            size,
            N=n,
            SWEEPS=sweeps or _sweeps(n),
            num_warps=num_warps or _warps(n),
        )
    return values, vectors
