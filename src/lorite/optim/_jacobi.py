"""Batched eigendecomposition of small symmetric matrices on the GPU without a host synchronisation.

``torch.linalg.eigh`` on CUDA checks cuSOLVER's error codes with ``.item()``: every call stalls the CPU
until the GPU has caught up, which serialises an optimizer step with the backward pass before it and
forbids CUDA-graph capture. LoRA-RITE needs the eigenvalues of hundreds of ``r × r`` matrices per step,
so this module provides a Triton kernel: cyclic Jacobi with round-robin (parallel) ordering, one program
per matrix, each round applying ``r/2`` disjoint plane rotations at once (``A ← JᵀAJ``, two
multiply-adds per entry).

Jacobi's method converges quadratically; each program runs sweeps of ``n − 1`` rounds until its matrix
is converged (``off(A) ≤ tol·‖A‖_F``, :func:`tolerance`; a per-program loop condition, no host sync) or a
cap is reached (``_sweeps``: random matrices reach fp32 roundoff within it; the tests hold the results to
``torch.linalg.eigh``). A matrix that arrives nearly diagonal — the previous step's eigenbasis applied to
the new matrix — therefore costs one or two sweeps. Matrices are zero-padded to a power of two ≥ 16
(``tl.dot``'s minimum); padding never mixes with the real block because their couplings are 0.

The register kernel holds the matrix in the program's registers (it works up to 32 × 32 and is the
default up to 16 × 16: ``REGISTER_KERNEL_UP_TO``); above 32 registers spill. The global-memory kernels
keep the matrix and its eigenvectors in global memory (L1/L2-resident at these sizes): the two-sided one
applies each round as row then column rotations of the round's ``n/2`` pairs, separated by CTA barriers;
the one-sided (Hestenes) one rotates contiguous rows of ``Uᵀ = (AJ)ᵀ`` and ``Eᵀ``, one barrier per round
(``GLOBAL_MEMORY_METHOD`` picks the default). Timings against the rank are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import math

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
    def _rotation(a_pp, a_qq, a_pq, FP64: tl.constexpr):
        """``(c, s)`` of the plane rotation that zeroes ``a_pq`` of the 2 × 2 block ``[[a_pp, a_pq], [a_pq, a_qq]]``
        (two-sided), or that makes columns with ``‖u_p‖² = a_pp``, ``‖u_q‖² = a_qq``, ``u_p·u_q = a_pq``
        orthogonal (one-sided, Hestenes): ``ζ = (a_qq − a_pp)/(2a_pq)``, ``t = sign(ζ)/(|ζ| + √(1 + ζ²))``, the
        smaller of the two angles (``|θ| ≤ π/4``), ``c = 1/√(1 + t²)``, ``s = tc``; ``t = 0`` where ``a_pq = 0``.

        ``FP64``: ``c`` and ``s`` are computed in float64 and rounded once. In float32 the four roundings of
        the formula leave ``c² + s² − 1`` biased, and over the ~n rotations per sweep that every row takes,
        ``EᵀE`` drifts from ``I`` linearly in n (2.7e-5 at n = 128 after 8 sweeps, emulated; 2.2e-6 with
        float64 parameters, eigenvalues 1.9e-5 → 3.4e-6). It costs O(n) float64 operations per round
        against the O(n²) float32 rotation work; the register kernel (n ≤ 32, drift ≤ 4e-6) stays float32."""
        if FP64:
            a_pp = a_pp.to(tl.float64)
            a_qq = a_qq.to(tl.float64)
            a_pq = a_pq.to(tl.float64)
        safe = tl.where(a_pq == 0.0, 1.0, a_pq)
        zeta = (a_qq - a_pp) / (2.0 * safe)
        sign = tl.where(zeta >= 0.0, 1.0, -1.0)
        t = sign / (tl.abs(zeta) + tl.sqrt(1.0 + zeta * zeta))  # ζ² = inf gives t = 0, the right limit
        t = tl.where(a_pq == 0.0, 0.0, t)
        c = 1.0 / tl.sqrt(1.0 + t * t)
        return c.to(tl.float32), (t * c).to(tl.float32)

    @triton.jit
    def _off_and_total(S, eye):
        """``(Σ_{i≠j} S_ij², ‖S‖²_F)`` of a register tile. The off-diagonal sum is taken on its own:
        ``‖S‖² − Σ S_ii²`` would cancel down to the roundoff of ``‖S‖²``."""
        off = tl.sum(tl.sum(tl.where(eye, 0.0, S * S), axis=1), axis=0)
        return off, off + tl.sum(tl.sum(tl.where(eye, S * S, 0.0), axis=1), axis=0)

    @triton.jit
    def _jacobi_kernel(
        a_ptr, values_ptr, vectors_ptr, partner_ptr, sweeps_ptr, size, tol, N: tl.constexpr,
        SWEEPS: tl.constexpr,
    ):  # fmt: skip
        matrix = tl.program_id(0)
        rows = tl.arange(0, N)
        inside = (rows[:, None] < size) & (rows[None, :] < size)
        offsets = matrix * size * size + rows[:, None] * size + rows[None, :]
        A = tl.load(a_ptr + offsets, mask=inside, other=0.0)
        eye = rows[:, None] == rows[None, :]
        E = tl.where(eye, 1.0, 0.0)
        # the convergence test runs on A/max|A| (no square underflows; ‖A‖_F is invariant under the rotations)
        inv = 1.0 / tl.maximum(tl.max(tl.max(tl.abs(A), axis=1), axis=0), 1e-30)
        off, total = _off_and_total(A * inv, eye)
        sweep = 0
        while (sweep < SWEEPS) & (off > tol * tol * total):
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
                c, s = _rotation(a_pp, a_qq, coupling, True)
                # J = diag(c) with J[p, q] = s, J[q, p] = −s. With the pairing as a permutation matrix
                # (products with it are exact), A ← JᵀAJ and E ← EJ cost two multiply-adds per entry:
                # (AJ)[:, j] = c_j A[:, j] − w_j A[:, partner(j)],  (JᵀB)[i, :] = c_i B[i, :] − w_i B[partner(i), :]
                w = tl.where(first, s, -s)
                swap = tl.where(pick, 1.0, 0.0)
                AJ = A * c[None, :] - tl.dot(A, swap, input_precision="ieee") * w[None, :]
                A = AJ * c[:, None] - tl.dot(swap, AJ, input_precision="ieee") * w[:, None]
                E = E * c[None, :] - tl.dot(E, swap, input_precision="ieee") * w[None, :]
            sweep += 1
            off, total = _off_and_total(A * inv, eye)
        values = tl.sum(tl.where(eye, A, 0.0), axis=1)
        tl.store(values_ptr + matrix * size + rows, values, mask=rows < size)
        tl.store(vectors_ptr + offsets, E, mask=inside)
        tl.store(sweeps_ptr + matrix, sweep)

    @triton.jit
    def _input_tile(a_ptr, rows, columns, size):
        """The ``(rows, columns)`` tile of the ``size × size`` input, 0 outside it (the padding)."""
        inside = (rows[:, None] < size) & (columns[None, :] < size)
        return tl.load(a_ptr + rows[:, None] * size + columns[None, :], mask=inside, other=0.0)

    @triton.jit
    def _load_input(a_ptr, work_ptr, e_ptr, size, N: tl.constexpr, BLOCK: tl.constexpr, SCALE: tl.constexpr):
        """Copies this program's ``size × size`` input into its zero-padded ``N × N`` work matrix (divided by
        ``max|A|`` if ``SCALE``) and sets its ``N × N`` rotation accumulator to the identity. Returns
        ``max|A|`` and ``‖A‖_F/max|A|``."""
        chunk = tl.arange(0, BLOCK)
        largest = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for start_row in range(0, N, BLOCK):
            rows = start_row + chunk
            for start in range(0, N, BLOCK):
                columns = start + chunk
                largest = tl.maximum(largest, tl.abs(_input_tile(a_ptr, rows, columns, size)))
        scale = tl.max(tl.max(largest, axis=1), axis=0)
        inv = 1.0 / tl.maximum(scale, 1e-30)
        squares = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for start_row in range(0, N, BLOCK):
            rows = start_row + chunk
            for start in range(0, N, BLOCK):
                columns = start + chunk
                tile = _input_tile(a_ptr, rows, columns, size)
                scaled = tile * inv
                squares += scaled * scaled
                tile_offsets = rows[:, None] * N + columns[None, :]
                tl.store(work_ptr + tile_offsets, scaled if SCALE else tile)
                tl.store(e_ptr + tile_offsets, tl.where(rows[:, None] == columns[None, :], 1.0, 0.0))
        return scale, tl.sqrt(tl.sum(tl.sum(squares, axis=1), axis=0))

    @triton.jit
    def _jacobi_scratch_kernel(
        a_ptr, values_ptr, vectors_ptr, work_ptr, e_ptr, p_ptr, q_ptr, sweeps_ptr, size, tol,
        N: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, SWEEPS: tl.constexpr,
    ):  # fmt: skip
        """The same cyclic Jacobi for ``N > 32``, on the matrix in global memory (L1/L2-resident: 16 KB at
        64 × 64) instead of registers, which spill above 32 × 32. Each round reads the ``HALF`` pairs'
        entries, then rotates the pairs' rows (``A ← JᵀA``), then their columns (``A ← AJ``, ``E ← EJ``),
        in column/row chunks of ``BLOCK``; a CTA barrier separates the phases (rows and columns of
        different pairs overlap). After each sweep one more pass over ``A`` computes ``off(A)`` for the
        early exit (``off(A) ≤ tol·‖A‖_F``)."""
        matrix = tl.program_id(0)
        base = matrix.to(tl.int64) * N * N
        a = work_ptr + base
        e = e_ptr + base
        pairs = tl.arange(0, HALF)
        chunk = tl.arange(0, BLOCK)
        scale, _ = _load_input(a_ptr + matrix.to(tl.int64) * size * size, a, e, size, N, BLOCK, False)
        inv = 1.0 / tl.maximum(scale, 1e-30)
        tl.debug_barrier()
        rotating = _off_diagonal_exceeds(a, inv, tol, N, BLOCK)
        sweep = 0
        while (sweep < SWEEPS) & rotating:
            for k in range(N - 1):
                p = tl.load(p_ptr + k * HALF + pairs)
                q = tl.load(q_ptr + k * HALF + pairs)
                a_pp = tl.load(a + p * N + p)
                a_qq = tl.load(a + q * N + q)
                # both off-diagonal entries, averaged (roundoff leaves A slightly asymmetric)
                coupling = 0.5 * (tl.load(a + p * N + q) + tl.load(a + q * N + p))
                c, s = _rotation(a_pp, a_qq, coupling, True)
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
            sweep += 1
            rotating = _off_diagonal_exceeds(a, inv, tol, N, BLOCK)
        diagonal = tl.arange(0, N)
        values = tl.load(a + diagonal * N + diagonal)
        tl.store(values_ptr + matrix * size + diagonal, values, mask=diagonal < size)
        _store_vectors(e, vectors_ptr + matrix.to(tl.int64) * size * size, size, N, BLOCK, False)
        tl.store(sweeps_ptr + matrix, sweep)

    @triton.jit
    def _off_diagonal_exceeds(a, inv, tol, N: tl.constexpr, BLOCK: tl.constexpr):
        """``off(A) > tol·‖A‖_F`` for the ``N × N`` matrix at ``a``, summed on ``A·inv`` (``inv = 1/max|A₀|``:
        no square underflows). The off-diagonal sum is taken on its own: ``‖A‖² − Σ A_ii²`` would cancel
        down to the roundoff of ``‖A‖²``."""
        chunk = tl.arange(0, BLOCK)
        off = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        diagonal = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for start_row in range(0, N, BLOCK):
            rows = start_row + chunk
            for start in range(0, N, BLOCK):
                columns = start + chunk
                tile = tl.load(a + rows[:, None] * N + columns[None, :]) * inv
                on_diagonal = rows[:, None] == columns[None, :]
                off += tl.where(on_diagonal, 0.0, tile * tile)
                diagonal += tl.where(on_diagonal, tile * tile, 0.0)
        off_sum = tl.sum(tl.sum(off, axis=1), axis=0)
        total = off_sum + tl.sum(tl.sum(diagonal, axis=1), axis=0)
        return off_sum > tol * tol * total

    @triton.jit
    def _store_vectors(e, vectors, size, N: tl.constexpr, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr):
        """The leading ``size × size`` block of the ``N × N`` matrix at ``e`` (transposed if ``TRANSPOSED``)
        to the output ``vectors``."""
        chunk = tl.arange(0, BLOCK)
        for start_row in range(0, N, BLOCK):
            rows = start_row + chunk
            for start in range(0, N, BLOCK):
                columns = start + chunk
                inside = (rows[:, None] < size) & (columns[None, :] < size)
                tile = tl.load(e + rows[:, None] * N + columns[None, :])
                if TRANSPOSED:
                    tl.store(vectors + columns[None, :] * size + rows[:, None], tile, mask=inside)
                else:
                    tl.store(vectors + rows[:, None] * size + columns[None, :], tile, mask=inside)

    @triton.jit
    def _rotate_rows(x, row_p, row_q, X_p, X_q, c, s):
        """Rows ``p, q`` of ``x`` (offsets ``row_p``, ``row_q``, values ``X_p``, ``X_q``) ← ``(c X_p − s X_q,
        s X_p + c X_q)``: ``Xᵀ ← (XJ)ᵀ`` for the round's rotations."""
        tl.store(x + row_p, c[:, None] * X_p - s[:, None] * X_q)
        tl.store(x + row_q, s[:, None] * X_p + c[:, None] * X_q)

    @triton.jit
    def _jacobi_one_sided_kernel(
        a_ptr, values_ptr, vectors_ptr, u_ptr, e_ptr, p_ptr, q_ptr, sweeps_ptr, size, tol,
        N: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, SWEEPS: tl.constexpr,
    ):  # fmt: skip
        """One-sided (Hestenes) Jacobi: rotate the columns of ``U = A·J`` (``J`` a product of plane
        rotations, ``U₀ = A``) until they are orthogonal. Then ``UᵀU = JᵀA²J`` is diagonal, so the
        columns ``e_i`` of ``E = J`` are eigenvectors of ``A`` (of ``A²``; the same for a PSD ``A``) and
        ``u_i = A e_i = λ_i e_i``: ``λ_i = e_i·u_i``, the Rayleigh quotient, which keeps the sign.

        ``Uᵀ`` and ``Eᵀ`` are kept (row ``i`` = column ``i`` of ``U``, ``E``; ``Uᵀ₀ = A``, symmetric), so a
        round reads and writes only the contiguous rows ``p`` and ``q`` of its ``HALF`` pairs: coalesced,
        and no row/column phases, hence one CTA barrier per round instead of three. Where a ``[HALF, N]``
        tile is too large for the registers, ``BLOCK < N`` columns at a time: a first pass accumulates
        ``α = ‖u_p‖²``, ``β = ‖u_q‖²``, ``γ = u_p·u_q``, a second rotates
        (``_rotation(α, β, γ)``, float64 parameters).

        Early exit: a sweep in which every pair has ``|γ| ≤ tol·‖A‖_F·max(‖u_p‖, ‖u_q‖)`` is the last. This
        is the cosine test ``|γ| ≤ tol·‖u_p‖‖u_q‖`` of LAPACK's xGESVJ made absolute (relative to ‖A‖ rather
        than to the smaller column): the relative test never passes for columns of a rank-deficient ``A``,
        which are roundoff (rank one: the cap is reached either way), and absolute accuracy is what
        ``torch.linalg.eigh`` offers too. With ``M = JᵀAJ``, ``γ_pq ≈ (λ_p + λ_q)·M_pq``, so for a PSD
        ``A`` the test bounds ``|M_pq| ≤ tol·‖A‖_F``, as the two-sided ``off(A) ≤ tol·‖A‖_F``. ``U`` is
        scaled by ``1/max|A|`` (no square underflows or overflows), the eigenvalues scaled back."""
        matrix = tl.program_id(0)
        base = matrix.to(tl.int64) * N * N
        u = u_ptr + base
        e = e_ptr + base
        pairs = tl.arange(0, HALF)
        chunk = tl.arange(0, BLOCK)
        scale, norm = _load_input(a_ptr + matrix.to(tl.int64) * size * size, u, e, size, N, TILE, True)
        threshold = tol * norm
        sweep = 0
        rotating = scale > 0.0  # the zero matrix is done (its U stays 0; only ‖A‖_F = 0 would need care)
        while (sweep < SWEEPS) & rotating:
            unconverged = tl.zeros([HALF], dtype=tl.int32)
            for k in range(N - 1):
                tl.debug_barrier()  # the previous round's rows are written before this round reads them
                p = tl.load(p_ptr + k * HALF + pairs)
                q = tl.load(q_ptr + k * HALF + pairs)
                if BLOCK == N:  # rows p and q of Uᵀ and Eᵀ fit: one pass
                    row_p = p[:, None] * N + chunk[None, :]
                    row_q = q[:, None] * N + chunk[None, :]
                    U_p = tl.load(u + row_p)
                    U_q = tl.load(u + row_q)
                    alpha = tl.sum(U_p * U_p, axis=1)
                    beta = tl.sum(U_q * U_q, axis=1)
                    gamma = tl.sum(U_p * U_q, axis=1)
                    c, s = _rotation(alpha, beta, gamma, True)
                    _rotate_rows(u, row_p, row_q, U_p, U_q, c, s)
                    _rotate_rows(e, row_p, row_q, tl.load(e + row_p), tl.load(e + row_q), c, s)
                else:
                    alpha = tl.zeros([HALF], dtype=tl.float32)
                    beta = tl.zeros([HALF], dtype=tl.float32)
                    gamma = tl.zeros([HALF], dtype=tl.float32)
                    for start in range(0, N, BLOCK):
                        row_p = p[:, None] * N + (start + chunk)[None, :]
                        row_q = q[:, None] * N + (start + chunk)[None, :]
                        U_p = tl.load(u + row_p)
                        U_q = tl.load(u + row_q)
                        alpha += tl.sum(U_p * U_p, axis=1)
                        beta += tl.sum(U_q * U_q, axis=1)
                        gamma += tl.sum(U_p * U_q, axis=1)
                    c, s = _rotation(alpha, beta, gamma, True)
                    for start in range(0, N, BLOCK):
                        row_p = p[:, None] * N + (start + chunk)[None, :]
                        row_q = q[:, None] * N + (start + chunk)[None, :]
                        _rotate_rows(u, row_p, row_q, tl.load(u + row_p), tl.load(u + row_q), c, s)
                        _rotate_rows(e, row_p, row_q, tl.load(e + row_p), tl.load(e + row_q), c, s)
                bound = threshold * tl.sqrt(tl.maximum(alpha, beta))
                unconverged = tl.maximum(unconverged, (tl.abs(gamma) > bound).to(tl.int32))
            sweep += 1
            rotating = tl.max(unconverged, axis=0) > 0
        tl.debug_barrier()
        square = tl.arange(0, TILE)
        for start_row in range(0, N, TILE):  # λ_i = e_i·u_i (u in units of max|A|)
            rows = start_row + square
            dots = tl.zeros([TILE], dtype=tl.float32)
            for start in range(0, N, TILE):
                columns = start + square
                tile = rows[:, None] * N + columns[None, :]
                dots += tl.sum(tl.load(e + tile) * tl.load(u + tile), axis=1)
            tl.store(values_ptr + matrix * size + rows, dots * scale, mask=rows < size)
        _store_vectors(e, vectors_ptr + matrix.to(tl.int64) * size * size, size, N, TILE, True)
        tl.store(sweeps_ptr + matrix, sweep)


REGISTER_KERNEL_UP_TO = 16
"""Padded sizes up to this run the register kernel; larger ones a global-memory kernel. Measured on an H200
(420 matrices, benchmarks/RESULTS.md): at 32 × 32 the one-sided kernel takes 0.33 ms cold and 0.14 ms warm
against the register kernel's 1.70 and 0.52, so only the 16 × 16 tiles (r ≤ 16) stay in registers."""

GLOBAL_MEMORY_METHOD = "one_sided"
"""The global-memory kernel that :func:`jacobi_eigh` runs above ``REGISTER_KERNEL_UP_TO`` by default:
``"two_sided"`` (``_jacobi_scratch_kernel``) or ``"one_sided"`` (``_jacobi_one_sided_kernel``). Chosen by
measurement (``linalg_primitives.py --jacobi-methods``, H200, 420 matrices): one-sided, eight warps, 3.0 ms
against two-sided's 32 ms at 64 × 64 cold (0.9 against 7.8 ms warm), 28 against 262 ms at 128 × 128,
with smaller eigenvalue errors (1.7e-6 against 5.3e-6 of ‖V‖ at 64)."""

METHODS = ("two_sided", "one_sided")


def _sweeps(n: int) -> int:
    """The two-sided kernels' sweep cap (cold random matrices reach the roundoff floor within it)."""
    return 8 if n <= 16 else 10 if n <= 32 else 12 if n <= 64 else 14


def _one_sided_sweeps(n: int) -> int:
    """The one-sided kernel's cap: Hestenes on ``A`` is two-sided Jacobi on ``A²``, whose squared spectrum
    has smaller relative gaps among the small eigenvalues; cold random PSD matrices take ~1.5× the sweeps."""
    return _sweeps(n) + 4


def tolerance(n: int) -> float:
    """The early exit's ``tol`` for padded size ``n``: ``√n·ε`` (ε = 2⁻²³, fp32). The rotations themselves
    leave ``off(A)`` at a roundoff floor: each off-diagonal entry ends near ``u·|λ|`` (u = ε/2), so
    ``off(A)/‖A‖_F`` stalls near ``√n·u`` (measured ≈ 0.44·√n·u for n = 64–256) — a fixed 1e-7 would
    never be met above n ≈ 16 and every matrix would run to the cap. ``√n·ε`` sits ~4× above that floor
    and, Jacobi converging quadratically, the sweep that passes it lands on the floor (LAPACK's xGESVJ
    uses ``√m·ε`` likewise)."""
    return math.sqrt(n) * torch.finfo(torch.float32).eps


@functools.cache
def _pairs_by_round(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)``, each ``(n − 1, n/2)``: the disjoint pairs ``p < q`` of every round (round robin)."""
    partner = _round_robin(n, "cpu").long()
    index = torch.arange(n)
    p = torch.stack([index[index < row] for row in partner])
    q = torch.stack([row[index < row] for row in partner])
    return p.to(torch.int32).to(device), q.to(torch.int32).to(device)


def _warps(n: int) -> int:
    """Warps per matrix of the register kernel, chosen by measurement (``linalg_primitives.py
    --jacobi-warps``, benchmarks/RESULTS.md): four for tiles up to 32 × 32."""
    return 4 if n <= 32 else 1


def _global_memory_jacobi(A, values, vectors, done, n, method, sweeps, num_warps, tol) -> None:
    """Runs a global-memory kernel on ``A`` (contiguous, ``(B, size, size)``) padded to ``n``: the input is
    copied into zero-padded scratch by the kernel (a padded coordinate has no coupling, so its rotations
    are the identity and the real block's eigenpairs are the leading ones)."""
    batch, size = A.shape[0], A.shape[-1]
    work = torch.empty(batch, n, n, dtype=A.dtype, device=A.device)
    rotations = torch.empty_like(work)
    p, q = _pairs_by_round(n, str(A.device))
    # measured on an H200 (benchmarks/RESULTS.md, docs/results/jacobi/jacobi_methods.md): eight warps are
    # the fastest one-sided choice at n = 64, 128 and 256
    warps = num_warps or (8 if method == "one_sided" else 4 if n <= 64 else 8)
    if method == "two_sided":
        _jacobi_scratch_kernel[(batch,)](
            A, values, vectors, work, rotations, p, q, done, size, tol, N=n, HALF=n // 2, BLOCK=min(n, 32),
            SWEEPS=_sweeps(n) if sweeps is None else sweeps, num_warps=warps,
        )  # fmt: skip
        return
    # a [n/2, BLOCK] tile per operand, about 16 fp32 per thread each: whole rows where they fit
    block = min(n, max(16, 1024 * warps // n))
    if n // 2 * block < 32 * warps:  # replicated elements: one thread could reload another's rotated value
        raise ValueError(f"one-sided Jacobi at n = {n} takes at most {n // 2 * block // 32} warps")
    _jacobi_one_sided_kernel[(batch,)](
        A, values, vectors, work, rotations, p, q, done, size, tol, N=n, HALF=n // 2, BLOCK=block,
        TILE=min(n, 32),
        SWEEPS=_one_sided_sweeps(n) if sweeps is None else sweeps, num_warps=warps,
    )  # fmt: skip


def jacobi_eigh(
    A: torch.Tensor,
    sweeps: int | None = None,
    num_warps: int | None = None,
    *,
    method: str | None = None,
    tol: float | None = None,
    sweeps_done: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (unsorted) and eigenvectors (columns) of a stack of symmetric ``(B, r, r)`` fp32
    matrices, with no host synchronisation. ``A = E diag(λ) Eᵀ``.

    Every matrix stops after the first sweep that leaves it converged (two-sided: ``off(A) ≤ tol·‖A‖_F``,
    ``off(A)² = Σ_{i≠j} A_ij²``, also tested before the first sweep, so a diagonal input costs none;
    one-sided: see ``_jacobi_one_sided_kernel``), a per-program loop condition: a matrix that arrives
    nearly diagonal (a warm start in the previous eigenbasis) costs one or two sweeps. ``sweeps`` caps
    the sweeps (default by size and method), ``tol`` defaults to :func:`tolerance` (``0`` runs every
    matrix to the cap). ``method``: ``"two_sided"`` (the register kernel up to ``REGISTER_KERNEL_UP_TO``,
    the scratch kernel above) or ``"one_sided"`` (Hestenes, at any size); default: two-sided up to
    ``REGISTER_KERNEL_UP_TO``, ``GLOBAL_MEMORY_METHOD`` above. ``sweeps_done``: an optional int32 ``(B,)``
    tensor that receives the sweeps each matrix took. ``num_warps``: by size unless given
    (benchmarks/speed/linalg_primitives.py --jacobi-warps, --jacobi-methods)."""
    if triton is None:
        raise RuntimeError("jacobi_eigh needs Triton (it ships with CUDA builds of torch)")
    if A.dtype != torch.float32:
        raise TypeError(f"jacobi_eigh works in float32, got {A.dtype}")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    batch, size = A.shape[0], A.shape[-1]
    n = max(16, 1 << (size - 1).bit_length())
    if method is None:
        method = "two_sided" if n <= REGISTER_KERNEL_UP_TO else GLOBAL_MEMORY_METHOD
    tol = tolerance(n) if tol is None else tol
    if sweeps_done is None:
        sweeps_done = torch.empty(batch, dtype=torch.int32, device=A.device)
    elif sweeps_done.shape != (batch,) or sweeps_done.dtype != torch.int32 or sweeps_done.device != A.device:
        raise ValueError(f"sweeps_done must be an int32 ({batch},) tensor on {A.device}")
    A = A.contiguous()
    values = torch.empty(batch, size, dtype=A.dtype, device=A.device)
    vectors = torch.empty_like(A)
    if not batch:
        return values, vectors
    if method == "one_sided" or n > REGISTER_KERNEL_UP_TO:
        _global_memory_jacobi(A, values, vectors, sweeps_done, n, method, sweeps, num_warps, tol)
        return values, vectors
    partner = _round_robin(n, str(A.device))
    _jacobi_kernel[(batch,)](
        A,
        values,
        vectors,
        partner,
        sweeps_done,
        size,
        tol,
        N=n,
        SWEEPS=_sweeps(n) if sweeps is None else sweeps,
        num_warps=num_warps or _warps(n),
    )
    return values, vectors
