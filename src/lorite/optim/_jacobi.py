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

Up to 32 × 32 the matrix lives in the program's registers. Above, registers spill, so a second kernel keeps
the matrix and its eigenvectors in global memory (L1/L2-resident at these sizes) and applies each round as
row then column rotations of the round's ``n/2`` pairs, separated by CTA barriers. Timings against the rank
are in benchmarks/RESULTS.md.
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

    @triton.jit
    def _jacobi_scratch_kernel(
        a_ptr, e_ptr, p_ptr, q_ptr, N: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
        SWEEPS: tl.constexpr,
    ):  # fmt: skip
        """The same cyclic Jacobi for ``N > 32``, on the matrix in global memory (L1/L2-resident: 16 KB at
        64 × 64) instead of registers, which spill above 32 × 32. Each round reads the ``HALF`` pairs'
        entries, then rotates the pairs' rows (``A ← JᵀA``), then their columns (``A ← AJ``, ``E ← EJ``),
        in column/row chunks of ``BLOCK``; a CTA barrier separates the phases (rows and columns of
        different pairs overlap)."""
        base = tl.program_id(0).to(tl.int64) * N * N
        a = a_ptr + base
        e = e_ptr + base
        pairs = tl.arange(0, HALF)
        chunk = tl.arange(0, BLOCK)
        for _sweep in range(SWEEPS):
            for k in range(N - 1):
                p = tl.load(p_ptr + k * HALF + pairs)
                q = tl.load(q_ptr + k * HALF + pairs)
                a_pp = tl.load(a + p * N + p)
                a_qq = tl.load(a + q * N + q)
                # both off-diagonal entries, averaged (roundoff leaves A slightly asymmetric)
                coupling = 0.5 * (tl.load(a + p * N + q) + tl.load(a + q * N + p))
                safe = tl.where(coupling == 0.0, 1.0, coupling)
                tau = (a_qq - a_pp) / (2.0 * safe)
                sign = tl.where(tau >= 0.0, 1.0, -1.0)
                t = sign / (tl.abs(tau) + tl.sqrt(1.0 + tau * tau))
                t = tl.where(coupling == 0.0, 0.0, t)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                tl.debug_barrier()  # every thread has read the round's entries before any is rotated
                for start in range(0, N, BLOCK):  # rows p, q:  JᵀA
                    columns = start + chunk
                    row_p = a + p[:, None] * N + columns[None, :]
                    row_q = a + q[:, None] * N + columns[None, :]
                    A_p = tl.load(row_p)
                    A_q = tl.load(row_q)
                    tl.store(row_p, c[:, None] * A_p - s[:, None] * A_q)
                    tl.store(row_q, s[:, None] * A_p + c[:, None] * A_q)
                tl.debug_barrier()
                for start in range(0, N, BLOCK):  # columns p, q:  AJ and EJ
                    rows = start + chunk
                    column_p = rows[:, None] * N + p[None, :]
                    column_q = rows[:, None] * N + q[None, :]
                    A_p = tl.load(a + column_p)
                    A_q = tl.load(a + column_q)
                    tl.store(a + column_p, c[None, :] * A_p - s[None, :] * A_q)
                    tl.store(a + column_q, s[None, :] * A_p + c[None, :] * A_q)
                    E_p = tl.load(e + column_p)
                    E_q = tl.load(e + column_q)
                    tl.store(e + column_p, c[None, :] * E_p - s[None, :] * E_q)
                    tl.store(e + column_q, s[None, :] * E_p + c[None, :] * E_q)
                tl.debug_barrier()


REGISTER_KERNEL_UP_TO = 32
"""Padded sizes up to this run the register kernel; larger ones the global-memory (scratch) kernel."""


def _sweeps(n: int) -> int:
    return 8 if n <= 16 else 10 if n <= 32 else 12 if n <= 64 else 14


@functools.cache
def _pairs_by_round(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)``, each ``(n − 1, n/2)``: the disjoint pairs ``p < q`` of every round (round robin)."""
    partner = _round_robin(n, "cpu").long()
    index = torch.arange(n)
    p = torch.stack([index[index < row] for row in partner])
    q = torch.stack([row[index < row] for row in partner])
    return p.to(torch.int32).to(device), q.to(torch.int32).to(device)


def _scratch_jacobi(A: torch.Tensor, sweeps: int | None, num_warps: int | None):
    batch, size = A.shape[0], A.shape[-1]
    n = 1 << (size - 1).bit_length()
    # padded with zeros: a padded coordinate has no coupling, so its rotations are the identity and
    # the real block's eigenpairs are the leading ones
    work = torch.zeros(batch, n, n, dtype=A.dtype, device=A.device)
    work[:, :size, :size] = A
    vectors = torch.eye(n, dtype=A.dtype, device=A.device).expand(batch, n, n).contiguous()
    if batch:
        p, q = _pairs_by_round(n, str(A.device))
        _jacobi_scratch_kernel[(batch,)](
            work, vectors, p, q, N=n, HALF=n // 2, BLOCK=min(n, 32), SWEEPS=sweeps or _sweeps(n),
            num_warps=num_warps or (4 if n <= 64 else 8),
        )  # fmt: skip
    values = work.diagonal(dim1=-2, dim2=-1)[:, :size].contiguous()
    return values, vectors[:, :size, :size].contiguous()


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
    if n > REGISTER_KERNEL_UP_TO:
        return _scratch_jacobi(A, sweeps, num_warps)
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
