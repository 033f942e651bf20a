"""LQ-LoRA: every target matrix as ``W ≈ Q + L1·L2`` — a frozen NF-k quantized ``Q`` plus a trainable rank-r
LoRA ``L1·L2`` — with each matrix's storage format chosen by an integer linear program under a budget of bits
per parameter.

Guo, Greengard, Xing, Kim, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language
Model Finetuning", arXiv 2311.12023 (ICLR 2024). Quantization formats: :mod:`lorite.adapters.quant`.

1. **Decomposition** (:func:`lq_decompose`). From ``Q = 0`` alternate ``L1·L2 ←`` the rank-r randomized SVD
   of ``W − Q`` (√S split between the factors: ``L1 = U·diag(√S)``, ``L2 = diag(√S)·Vᵀ``) and
   ``Q ← dequant(quant(W − L1·L2))``; stop as soon as ``‖W − (Q + L1·L2)‖_F`` no longer falls and return the
   *best* iterate (the reference code returns the last one).
2. **Allocation** (:func:`solve_allocation`). For matrices ``i`` and formats ``c`` with cost
   ``cost[i,c] = ‖W_i − (Q + L1·L2)‖_F²`` and storage ``storage[i,c]`` bits, binary ``x[i,c]``:
   minimise ``Σ cost·x`` subject to ``Σ_c x[i,c] = 1`` and ``Σ storage·x ≤ budget · Σ_i numel(W_i)``
   (a multiple-choice knapsack), solved exactly by ``scipy.optimize.milp`` (HiGHS), with a Lagrangian
   fallback. The budget covers ``Q`` only; the LoRA factors come on top.
3. **Fisher weighting** (:func:`estimate_fisher`). With the diagonal empirical Fisher
   ``F = Σ_k (∂ℓ_k/∂W)²`` (per-example gradients) the objective becomes ``‖√F ⊙ (W − Q − L1·L2)‖_F``. It has
   no closed-form SVD, so ``F`` is taken as rank 1 ("two-sided"): ``D_row = √(mean_j F_ij)``,
   ``D_col = √(mean_i F_ij)``; the SVD runs on ``diag(D_row)(W − Q)diag(D_col)`` and is unscaled after. The
   quantization step stays unweighted; the weighted error drives the stop rule and the ILP costs.
4. **Fine-tuning** (:func:`apply_lq_lora`). peft computes ``y = x·Wᵀ + s·x·Aᵀ·Bᵀ`` with ``s = α/r``: the base
   weight becomes ``Q`` (a :class:`QuantizedLinear`, dequantized on the fly), and ``A = L2/√s``,
   ``B = L1/√s`` so that ``s·B·A = L1·L2`` at the start. Every lorite optimizer pairs ``(A, B)`` by module
   (:func:`lorite.optim.find_lora_pairs`), LoRA-RITE included.
5. **Storage** (:func:`save_lq_lora`, :func:`load_lq_lora`): packed ``Q`` (safetensors), the peft adapter and a
   JSON description, written atomically; ``Q`` replaces ``W``, so the adapter alone would not be enough.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant import QuantConfig, QuantizedTensor, config_grid, fake_quantize, quantize_batch, storage_bits

FORMAT = "lorite-lq-lora/1"
INITS = ("lq", "zero")
WEIGHTINGS = ("two-sided", "row", "col", "none")
LORA_FACTOR_BITS = 16  # LoRA factors counted as bf16 in the "bits with LoRA" figures


# ===================================================================================== grids of formats
def _compact_grid() -> list[QuantConfig]:
    """24 formats: b ∈ {2, 3, 4, 8}, B0 ∈ {16, 32, 64}, b0 ∈ {4, 8}, B1 = 256, b1 = fp32 (the corner of the
    paper's 432 where the formats differ most in size; the level-2 choices move bits/param by < 0.01)."""
    return config_grid(scale_bits=(4, 8), scale_dtypes=("fp32",), scale_block_sizes=(256,))


GRIDS = {"compact": _compact_grid, "full": config_grid}


def parse_config_name(name: str) -> QuantConfig:
    """The :class:`QuantConfig` whose :attr:`~QuantConfig.name` is ``name`` (``nf3-b64-s8x256-fp32``,
    ``nf4-b64-fp16``)."""
    parts = name.strip().split("-")
    try:
        if len(parts) == 3 and parts[0].startswith("nf") and parts[1].startswith("b"):
            return QuantConfig(int(parts[0][2:]), int(parts[1][1:]), None, 1, parts[2])
        if len(parts) == 4 and parts[0].startswith("nf") and parts[1].startswith("b") and parts[2][0] == "s":
            scale_bits, scale_block = parts[2][1:].split("x")
            return QuantConfig(
                int(parts[0][2:]), int(parts[1][1:]), int(scale_bits), int(scale_block), parts[3]
            )
    except ValueError as error:
        raise ValueError(f"bad quantization format {name!r}: {error}") from error
    raise ValueError(f"bad quantization format {name!r} (expected e.g. nf3-b64-s8x256-fp32 or nf4-b64-fp16)")


def resolve_grid(grid: str | Iterable[str | QuantConfig]) -> list[QuantConfig]:
    """Formats from a grid name (:data:`GRIDS`), a comma list of format names, or a list."""
    if isinstance(grid, str):
        if grid in GRIDS:
            return GRIDS[grid]()
        grid = [g for g in grid.split(",") if g.strip()]
    configs = [g if isinstance(g, QuantConfig) else parse_config_name(g) for g in grid]
    if not configs:
        raise ValueError("the grid of quantization formats is empty")
    return list(dict.fromkeys(configs))  # unique, in order


# ===================================================================================== decomposition
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


# ===================================================================================== allocation (ILP)
@dataclass
class Allocation:
    """A solution of the allocation problem: ``choice[i]`` is matrix i's format index."""

    choice: list[int]
    objective: float  # Σ_i cost[i, choice[i]]
    storage_bits: int  # Σ_i storage[i, choice[i]]
    solver: str  # "milp" or "lagrangian"
    status: str


def _lagrangian(costs, storage, budget_bits: float) -> list[int]:
    """Solver-free multiple-choice knapsack: per matrix ``argmin_c cost + λ·storage`` with the smallest price
    λ ≥ 0 that fits the budget (bisection), then greedy upgrades while budget is left."""
    import numpy as np

    def pick(price: float):
        return np.argmin(costs + price * storage, axis=1)

    def used(choice) -> float:
        return float(storage[np.arange(len(choice)), choice].sum())

    choice = pick(0.0)
    if used(choice) > budget_bits:
        low, high = 0.0, 1.0
        while used(pick(high)) > budget_bits:
            high *= 2
            if high > 1e30:
                break
        for _ in range(200):
            middle = (low + high) / 2
            low, high = (middle, high) if used(pick(middle)) > budget_bits else (low, middle)
        choice = pick(high)
    rows = np.arange(len(choice))
    while True:  # spend what is left on the upgrade with the best cost drop per extra bit
        left = budget_bits - used(choice)
        extra = storage - storage[rows, choice][:, None]
        gain = costs[rows, choice][:, None] - costs
        fits = (extra <= left) & (gain > 0)
        if not fits.any():
            break
        ratio = np.where(fits, gain / np.maximum(extra, 1e-12), -np.inf)
        i, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        choice[i] = c
    return [int(c) for c in choice]


def solve_allocation(
    costs, storage, budget_bits: float, solver: str = "milp", time_limit: float = 60.0
) -> Allocation:
    """Pick one format per matrix minimising total cost under a total storage budget.

    Args:
        costs: ``(N, C)`` reconstruction errors (``‖W_i − (Q + L1·L2)‖_F²`` for matrix i in format c).
        storage: ``(N, C)`` bits of matrix i in format c.
        budget_bits: the total bits allowed (``budget · Σ numel``).
        solver: "milp" (``scipy.optimize.milp``, exact; falls back to the Lagrangian sweep if it finds no
            solution) or "lagrangian".
        time_limit: seconds for the MILP solver.
    """
    import numpy as np

    costs = np.asarray(costs, dtype=np.float64)
    storage = np.asarray(storage, dtype=np.float64)
    if costs.ndim != 2 or costs.shape != storage.shape or costs.size == 0:
        raise ValueError(f"costs {costs.shape} and storage {storage.shape} must be equal non-empty (N, C)")
    if not (np.isfinite(costs).all() and np.isfinite(storage).all()):
        raise ValueError("costs and storage must be finite")
    if solver not in ("milp", "lagrangian"):
        raise ValueError(f"solver must be 'milp' or 'lagrangian', got {solver!r}")
    smallest = storage.min(1).sum()
    if budget_bits < smallest:
        raise ValueError(
            f"the budget ({budget_bits:.0f} bits) is below the smallest possible storage ({smallest:.0f} bits)"
        )
    n, c = costs.shape
    rows = np.arange(n)

    def result(choice, name, status) -> Allocation:
        choice = [int(x) for x in choice]
        return Allocation(
            choice, float(costs[rows, choice].sum()), int(storage[rows, choice].sum()), name, status
        )

    if solver == "milp":
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array, kron

        # conditioning: costs scaled to norm 1000 (as the reference), storage as a fraction of the budget
        scale = float(np.linalg.norm(costs)) or 1.0
        objective = costs.ravel() / scale * 1000
        one_each = kron(csr_array(np.eye(n)), csr_array(np.ones((1, c)))).tocsr()
        share = (storage / budget_bits).ravel()[None, :]
        limit = 1.0
        for _ in range(4):  # tighten if HiGHS's feasibility tolerance let the exact bit count overshoot
            solved = milp(
                objective,
                constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(share, -np.inf, limit)],
                integrality=np.ones(n * c),
                bounds=Bounds(0, 1),
                options={"time_limit": time_limit},
            )
            if solved.x is None:
                break
            choice = solved.x.reshape(n, c).argmax(1)
            used = storage[rows, choice].sum()
            if used <= budget_bits:
                status = "optimal" if solved.status == 0 else f"feasible ({solved.message})"
                return result(choice, "milp", status)
            limit -= (used - budget_bits) / budget_bits + 1e-12
    return result(_lagrangian(costs, storage, budget_bits), "lagrangian", "heuristic")


# ===================================================================================== model plumbing
def target_linears(
    model: nn.Module, target_modules: str | Iterable[str] = "all-linear"
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to decompose, by module path: every linear except the output head
    (``"all-linear"``), or those whose path is or ends with ``.NAME`` for a NAME in ``target_modules``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = None if target_modules == "all-linear" else [target_modules] if isinstance(target_modules, str) else list(target_modules)  # fmt: skip
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if names is None:
            if isinstance(module, nn.Linear) and module is not head:
                found[path] = module
            continue
        if any(path == t or path.endswith("." + t) for t in names):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target module {path!r} is a {type(module).__name__}, not nn.Linear")
            found[path] = module
    if not found:
        raise ValueError(f"no nn.Linear layer matches target modules {target_modules!r}")
    return found


@dataclass
class LQLoRAConfig:
    """How to quantize and initialise (written into reports and saved models).

    Attributes:
        budget: bits per parameter for all ``Q`` together (LoRA factors extra); ``None`` only with a
            one-format grid (that format everywhere).
        rank: LoRA rank ``r``.
        alpha: LoRA ``α`` (``s = α/r``); ``None``: ``α = r``.
        init: ``"lq"`` — ``Q + L1·L2`` (LQ-LoRA); ``"zero"`` — ``Q = quant(W)`` and peft's zero-init LoRA
            (QLoRA-style; the ILP then uses plain quantization errors).
        weighting: how the Fisher weights the SVD when Fisher weights are given (see :func:`fisher_sides`).
        target_modules: ``"all-linear"`` (every linear but the output head) or module names.
        grid: the formats the ILP chooses from (:func:`resolve_grid`).
        max_iter, oversample, power_iters, rtol, seed: of :func:`lq_decompose`.
        solver: "milp" or "lagrangian" (:func:`solve_allocation`).
        dropout: LoRA dropout.
    """

    budget: float | None = 3.0
    rank: int = 64
    alpha: float | None = None
    init: str = "lq"
    weighting: str = "two-sided"
    target_modules: str | list[str] = "all-linear"
    grid: str | list[str] = "compact"
    max_iter: int = 20
    oversample: int = 10
    power_iters: int = 2
    rtol: float = 1e-3
    seed: int = 0
    solver: str = "milp"
    dropout: float = 0.0

    def validate(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.solver not in ("milp", "lagrangian"):
            raise ValueError(f"solver must be 'milp' or 'lagrangian', got {self.solver!r}")
        if not (self.rtol >= 0 and self.oversample >= 0 and self.power_iters >= 0):
            raise ValueError("rtol, oversample and power_iters must be >= 0")
        grid = resolve_grid(self.grid)
        if self.budget is None and len(grid) != 1:
            raise ValueError(f"a budget is needed to choose among {len(grid)} formats")
        if self.budget is not None and not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number of bits per parameter, got {self.budget}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


class CostCache:
    """Reconstruction errors on disk (JSON), keyed by (matrix content, format, settings, Fisher content), so
    that budgets and reruns share the expensive precomputation."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self.data: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        if self.path is not None:
            from ..cache import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.data))


def _groups(names: list[str], weights: dict[str, torch.Tensor], batch_elements: int) -> list[list[str]]:
    """Names grouped by shape, each group cut to at most ``batch_elements`` weights (batched decomposition)."""
    by_shape: dict[tuple, list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(weights[name].shape), []).append(name)
    groups = []
    for shape, members in by_shape.items():
        per = max(1, batch_elements // math.prod(shape))
        groups.extend(members[i : i + per] for i in range(0, len(members), per))
    return groups


def _default_batch_elements(device: torch.device) -> int:
    return 2**26 if device.type == "cuda" else 2**24


@dataclass
class QuantizationPlan:
    """The ILP's input and answer: ``costs``/``storage`` (N × C) over ``names`` × ``grid``."""

    names: list[str]
    numels: list[int]
    grid: list[QuantConfig]
    costs: list[list[float]]
    storage: list[list[int]]
    allocation: Allocation
    budget: float | None

    @property
    def configs(self) -> dict[str, QuantConfig]:
        return {name: self.grid[c] for name, c in zip(self.names, self.allocation.choice)}

    @property
    def bits_per_param(self) -> float:
        return self.allocation.storage_bits / sum(self.numels)


@dataclass
class CostTable:
    """Reconstruction costs ``costs[i][c]`` (squared errors) and storage ``storage[i][c]`` (bits) of matrix
    ``names[i]`` in format ``grid[c]``: the ILP's input, independent of the budget."""

    names: list[str]
    numels: list[int]
    grid: list[QuantConfig]
    costs: list[list[float]]
    storage: list[list[int]]

    def plan(self, budget: float | None, solver: str = "milp") -> QuantizationPlan:
        """The ILP's choice at ``budget`` bits per parameter (``None``: no limit)."""
        limit = float(sum(map(sum, self.storage))) if budget is None else budget * sum(self.numels)
        allocation = solve_allocation(self.costs, self.storage, limit, solver)
        return QuantizationPlan(
            self.names, self.numels, self.grid, self.costs, self.storage, allocation, budget
        )


def cost_table(
    weights: dict[str, torch.Tensor],
    settings: LQLoRAConfig,
    fisher: dict[str, torch.Tensor] | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    batch_elements: int | None = None,
) -> CostTable:
    """Costs of every matrix in every format of ``settings.grid``: the best ``‖W − (Q + L1·L2)‖_F²`` of a
    full decomposition (``init="lq"``), or ``‖W − quant(W)‖_F²`` (``init="zero"``), Fisher-weighted when
    ``fisher`` is given. Work runs on the weights' device, batched over matrices of one shape; with
    ``cache`` (a JSON file) errors computed before for the same matrix content, format and settings are
    reused."""
    import numpy as np

    settings.validate()
    grid = resolve_grid(settings.grid)
    names = list(weights)
    numels = [weights[n].numel() for n in names]
    storage = [[storage_bits(numel, c) for c in grid] for numel in numels]
    costs = np.zeros((len(names), len(grid)))
    store = CostCache(cache)
    device = next(iter(weights.values())).device
    groups = _groups(names, weights, batch_elements or _default_batch_elements(device))
    keys: dict[str, str] = {}
    if store.path is not None:
        setting_key = (
            f"{settings.init}|r{settings.rank}|it{settings.max_iter}|o{settings.oversample}|"
            f"p{settings.power_iters}|t{settings.rtol}|s{settings.seed}|{settings.weighting}"
        )
        for name in names:
            fisher_key = "nofisher" if fisher is None else _digest(fisher[name])
            keys[name] = f"{_digest(weights[name])}|{fisher_key}|{setting_key}"
    index = {name: i for i, name in enumerate(names)}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names) * len(grid), desc="reconstruction errors", unit="matrix")
    for group in groups:
        W = torch.stack([weights[n].detach().float() for n in group])
        F = None if fisher is None else torch.stack([fisher[n].float().to(W.device) for n in group])
        for c, config in enumerate(grid):
            cached = [store.data.get(f"{keys[n]}|{config.name}") for n in group] if keys else [None]
            if any(value is None for value in cached):  # (re)compute the whole batch: same SVD probes
                if bar is not None:
                    bar.set_postfix_str(f"{group[0]} ×{len(group)} {config.name}")
                if settings.init == "zero":
                    errors = quantization_error(W, config, F)
                else:
                    errors, *_ = _decompose(
                        W, settings.rank, config, F, settings.weighting, settings.max_iter,
                        settings.oversample, settings.power_iters, settings.rtol, settings.seed,
                    )  # fmt: skip
                cached = errors.tolist()
                if keys:
                    store.data.update({f"{keys[n]}|{config.name}": v for n, v in zip(group, cached)})
            for name, value in zip(group, cached):
                costs[index[name], c] = value**2
            if bar is not None:
                bar.update(len(group))
        store.save()
    if bar is not None:
        bar.close()
    return CostTable(names, numels, grid, costs.tolist(), storage)


def plan_allocation(
    weights: dict[str, torch.Tensor],
    settings: LQLoRAConfig,
    fisher: dict[str, torch.Tensor] | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    batch_elements: int | None = None,
) -> QuantizationPlan:
    """:func:`cost_table`, then the ILP at ``settings.budget`` (:func:`solve_allocation`). With a single
    format there is nothing to choose: its costs are not computed (reported as 0) and only the budget is
    checked."""
    grid = resolve_grid(settings.grid)
    if len(grid) == 1:
        settings.validate()
        names = list(weights)
        numels = [weights[n].numel() for n in names]
        storage = [[storage_bits(numel, grid[0])] for numel in numels]
        table = CostTable(names, numels, grid, [[0.0] for _ in names], storage)
    else:
        table = cost_table(weights, settings, fisher, cache, progress, batch_elements)
    return table.plan(settings.budget, settings.solver)


def decompose_matrices(
    weights: dict[str, torch.Tensor],
    configs: dict[str, QuantConfig],
    settings: LQLoRAConfig,
    fisher: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    batch_elements: int | None = None,
) -> dict[str, LQDecomposition]:
    """The final ``Q`` (and ``L1``, ``L2`` for ``init="lq"``) of every matrix in its chosen format, batched
    over matrices of one shape and format."""
    names = list(weights)
    device = next(iter(weights.values())).device
    limit = batch_elements or _default_batch_elements(device)
    by_config: dict[QuantConfig, list[str]] = {}
    for name in names:
        by_config.setdefault(configs[name], []).append(name)
    out: dict[str, LQDecomposition] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), desc="decomposing", unit="matrix")
    for config, members in by_config.items():
        for group in _groups(members, weights, limit):
            W = torch.stack([weights[n].detach().float() for n in group])
            F = None if fisher is None else torch.stack([fisher[n].float().to(W.device) for n in group])
            if bar is not None:
                bar.set_postfix_str(f"{group[0]} ×{len(group)} {config.name}")
            if settings.init == "zero":
                quantized = quantize_batch(W, config)
                errors = _errors(W - torch.stack([q.dequantize() for q in quantized]), F).tolist()
                results = [LQDecomposition(q, None, None, e, [e]) for q, e in zip(quantized, errors)]
            else:
                results = lq_decompose_batch(
                    W, settings.rank, config, F, weighting=settings.weighting, max_iter=settings.max_iter,
                    oversample=settings.oversample, power_iters=settings.power_iters, rtol=settings.rtol,
                    seed=settings.seed,
                )  # fmt: skip
            out.update(zip(group, results))
            if bar is not None:
                bar.update(len(group))
    if bar is not None:
        bar.close()
    return {name: out[name] for name in names}


# ===================================================================================== quantized layer
def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """A float tensor reinterpreted as integers of its width, so that ``model.to(dtype)`` leaves it alone."""
    return (
        t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])
        if t.is_floating_point()
        else t
    )


class _DequantizedLinear(torch.autograd.Function):
    """``x·Qᵀ`` with ``Q`` dequantized in forward and again in backward, so no dense copy of ``Q`` is kept
    between them (the frozen ``Q`` gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return nn.functional.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.input_dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer ``y = x·Q̂ᵀ + b`` whose weight lives in NF-k storage (buffers only, no
    parameters) and is dequantized on the fly, on whatever device the buffers are. Float scales are kept as
    same-width integer views so that ``model.to(dtype)`` cannot round them."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(quantized.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D weight, got shape {quantized.shape}")
        self.out_features, self.in_features = quantized.shape
        self.config = quantized.config
        self._dtypes = {name: t.dtype for name, t in quantized.tensors().items()}
        for name, t in quantized.tensors().items():
            self.register_buffer(f"q_{name}", _bits_view(t.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def quantized(self) -> QuantizedTensor:
        tensors = {name: getattr(self, f"q_{name}").view(dtype) for name, dtype in self._dtypes.items()}
        return QuantizedTensor.from_tensors(tensors, (self.out_features, self.in_features), self.config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.config.name}"


def apply_lq_lora(
    model: nn.Module,
    decompositions: dict[str, LQDecomposition],
    settings: LQLoRAConfig,
    base_model: str | None = None,
):
    """peft LoRA on the decomposed layers, their base weights replaced by :class:`QuantizedLinear` ``Q``
    and (``init="lq"``) ``A = L2/√s``, ``B = L1/√s`` so that ``s·B·A = L1·L2``; ``init="zero"`` keeps peft's
    initialisation (``B = 0``). Returns the peft model (only ``A``, ``B`` trainable)."""
    from peft import LoraConfig, get_peft_model

    settings.validate()
    names = list(decompositions)
    lora = LoraConfig(
        r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
        target_modules=names, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    root = model.get_base_model()
    root_scale = math.sqrt(settings.scaling)
    with torch.no_grad():
        for name, decomposition in decompositions.items():
            layer = root.get_submodule(name)
            base = layer.base_layer
            device = base.weight.device
            layer.base_layer = QuantizedLinear(decomposition.quantized.to(device), base.bias)
            if settings.init == "lq":
                if decomposition.L1 is None or decomposition.L1.shape[1] != settings.rank:
                    raise ValueError(f"{name}: the decomposition has no rank-{settings.rank} factors")
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                A.copy_(decomposition.L2.to(A) / root_scale)  # type: ignore[union-attr]
                B.copy_(decomposition.L1.to(B) / root_scale)  # type: ignore[union-attr]
    model.lq_lora_info = {"base_model": base_model, "settings": asdict(settings)}
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`QuantizedLinear` of a (peft) model, keyed by the path of the layer it replaced in the
    underlying transformers model (``model.layers.0.self_attn.q_proj``)."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        path.removesuffix(".base_layer"): module
        for path, module in root.named_modules()
        if isinstance(module, QuantizedLinear)
    }


def storage_report(model: nn.Module) -> dict[str, float]:
    """Bits per parameter of the quantized layers: ``Q`` alone (exact), and with the LoRA factors counted
    at 16 bits each."""
    layers = quantized_layers(model)
    numel = sum(m.in_features * m.out_features for m in layers.values())
    q_bits = sum(storage_bits(m.in_features * m.out_features, m.config) for m in layers.values())
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    return {
        "quantized_parameters": numel,
        "bits_per_param": q_bits / numel if numel else 0.0,
        "bits_per_param_with_lora": (q_bits + LORA_FACTOR_BITS * lora) / numel if numel else 0.0,
        "lora_parameters": lora,
        "quantized_bytes": sum(m.quantized.nbytes for m in layers.values()),
    }


# ===================================================================================== Fisher, data
def estimate_fisher(
    model: nn.Module,
    examples: Iterable[dict[str, torch.Tensor]],
    names: Iterable[str] | None = None,
    progress: bool = True,
    bf16: bool = True,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher ``F = Σ_k (∂ℓ_k/∂W)²`` of every target linear weight (``names``, default
    all but the output head), one example at a time (``ℓ_k`` the mean token loss of example ``k``: a dict
    with ``input_ids``, ``attention_mask``, ``labels`` of batch size 1). Under bf16 autocast on CUDA."""
    from ..train.examples import lm_loss

    modules = target_linears(model, "all-linear" if names is None else list(names))
    weights = {name: module.weight for name, module in modules.items()}
    device = next(iter(weights.values())).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    examples = list(examples)
    if not examples:
        raise ValueError("estimate_fisher needs at least one calibration example")
    if progress:
        from tqdm.auto import tqdm

        examples = tqdm(examples, desc="Fisher (per-example gradients)", unit="example")
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for example in examples:
            batch = {k: v.to(device) for k, v in example.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                loss = lm_loss(model, batch)
            grads = torch.autograd.grad(loss, list(weights.values()))
            for total, grad in zip(fisher.values(), grads):
                total.add_(grad.float().square())
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return fisher


def calibration_examples(
    spec: str, tokenizer, n: int, max_length: int = 256, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` single-example batches for :func:`estimate_fisher`: blocks of ``max_length`` tokens from the
    training documents of ``corpus:NAME`` (the held-out documents of :func:`heldout_blocks` never), or
    prompt + answer of the training split of a BIG-bench task (``NAME`` or ``file:PATH``), loss on the
    answer."""
    from ..data import bigbench, corpora
    from ..data.blocks import pack_blocks
    from ..train.examples import collate, encode_examples

    generator = torch.Generator().manual_seed(seed)
    if spec.startswith("corpus:"):
        documents = corpora.load_corpus(spec.split(":", 1)[1])
        train, _ = corpora.split_documents(documents, n_heldout=max(2, len(documents) // 10), seed=0)
        # a few blocks from a random place in every training document (tokenizing whole corpora is slow)
        per_document = -(-n // len(train))
        window = per_document * max_length * 8  # characters: ≥ 8 per token would be unusual
        blocks = []
        for document in train:
            start = int(torch.randint(max(1, len(document.text) - window), (1,), generator=generator))
            ids = tokenizer(document.text[start : start + window], add_special_tokens=False)["input_ids"]
            blocks.append(pack_blocks([ids], max_length, None)[:per_document])
        stacked = torch.cat(blocks)
        pick = torch.randperm(stacked.shape[0], generator=generator)[:n]
        return [
            {"input_ids": b[None], "attention_mask": torch.ones_like(b[None]), "labels": b[None].clone()}
            for b in stacked[pick]
        ]
    task = (
        bigbench.load_task_file(spec.split(":", 1)[1])
        if spec.startswith("file:")
        else bigbench.load_task(spec)
    )
    train = bigbench.split_examples(task, 0).train
    encoded = encode_examples(task, train, tokenizer, max_length)
    pick = torch.randperm(len(encoded), generator=generator)[:n].tolist()
    return [collate([encoded[i]], tokenizer.pad_token_id) for i in pick]


def heldout_blocks(tokenizer, corpus: str = "shakespeare", block_length: int = 512, n_blocks: int = 16):
    """The first ``n_blocks`` blocks of the held-out documents of ``corpus`` (the split of
    ``lorite finetune --task corpus:NAME``: ``split_documents(n_heldout=max(2, N//10), seed=0)``), packed
    with the end-of-text token between documents (documents are tokenized only as far as needed)."""
    from ..data import corpora
    from ..data.blocks import pack_blocks

    documents = corpora.load_corpus(corpus)
    _, heldout = corpora.split_documents(documents, n_heldout=max(2, len(documents) // 10), seed=0)
    ids: list[list[int]] = []
    for document in heldout:
        if sum(len(t) + 1 for t in ids) >= n_blocks * block_length:
            break
        ids.append(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    return pack_blocks(ids, block_length, tokenizer.eos_token_id)[:n_blocks]


# ===================================================================================== the whole pipeline
def quantize_model(
    model: nn.Module,
    settings: LQLoRAConfig,
    fisher: dict[str, torch.Tensor] | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    base_model: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Costs → ILP → final decompositions → peft model with quantized base layers.

    Runs on the model's device. Returns ``(peft_model, report)``; the report lists each matrix's format,
    bits, error (‖W − (Q + L1·L2)‖_F, relative to ‖W‖_F; weighted errors are reported as well when
    ``fisher`` is given) and the error of plain quantization in the same format, plus totals and timings.
    """
    settings.validate()
    layers = target_linears(model, settings.target_modules)
    for name, layer in layers.items():
        if settings.init == "lq" and settings.rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"rank {settings.rank} is larger than layer {name} ({layer.out_features} × {layer.in_features})"
            )
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    timings: dict[str, float] = {}
    began = time.perf_counter()
    plan = plan_allocation(weights, settings, fisher, cache, progress)
    timings["costs_and_ilp_s"] = time.perf_counter() - began
    began = time.perf_counter()
    decompositions = decompose_matrices(weights, plan.configs, settings, fisher, progress)
    timings["decomposition_s"] = time.perf_counter() - began
    matrices = []
    for name, decomposition in decompositions.items():
        W = weights[name].float()
        config = plan.configs[name]
        plain = float(quantization_error(W[None], config)[0])
        reconstruction = decomposition.reconstruction().to(W.device)
        entry = {
            "name": name,
            "shape": list(W.shape),
            "format": config.name,
            "bits_per_param": storage_bits(W.numel(), config) / W.numel(),
            "error": float(torch.linalg.matrix_norm(W - reconstruction)),
            "relative_error": float(
                torch.linalg.matrix_norm(W - reconstruction) / torch.linalg.matrix_norm(W)
            ),
            "plain_quantization_relative_error": plain / float(torch.linalg.matrix_norm(W)),
            "iterations": len(decomposition.trace),
        }
        if fisher is not None:
            entry["weighted_error"] = decomposition.error
        matrices.append(entry)
    peft_model = apply_lq_lora(model, decompositions, settings, base_model)
    total = sum(plan.numels)
    report = {
        "settings": asdict(settings),
        "fisher": fisher is not None,
        "budget": settings.budget,
        "grid": [c.name for c in plan.grid],
        "solver": plan.allocation.solver,
        "solver_status": plan.allocation.status,
        "objective": plan.allocation.objective,
        "bits_per_param": plan.allocation.storage_bits / total,
        "format_counts": _counts(plan.configs.values()),
        "matrices": matrices,
        "relative_error_total": math.sqrt(sum(m["error"] ** 2 for m in matrices))
        / math.sqrt(sum(float(weights[m["name"]].float().square().sum()) for m in matrices)),
        "timings": timings,
        **{f"storage_{k}": v for k, v in storage_report(peft_model).items()},
    }
    return peft_model, report


def _counts(configs: Iterable[QuantConfig]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for config in configs:
        counts[config.name] = counts.get(config.name, 0) + 1
    return dict(sorted(counts.items()))


# ===================================================================================== save / load
def _write_lq_lora(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers (apply_lq_lora first)")
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in layers.items():
        for part, t in layer.quantized.tensors().items():
            tensors[f"{name}.{part}"] = t.detach().cpu().contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        modules[name] = {"shape": [layer.out_features, layer.in_features], "format": layer.config.to_dict()}
    info = getattr(model, "lq_lora_info", {}) or {}
    meta = {
        "format": FORMAT,
        "base_model": info.get("base_model"),
        "settings": info.get("settings"),
        "modules": modules,
    }
    save_file(tensors, str(folder / "quantized.safetensors"))
    model.save_pretrained(folder / "adapter", safe_serialization=True)
    (folder / "lq_lora.json").write_text(json.dumps(meta, indent=1))


def save_lq_lora(model: nn.Module, out: str | Path) -> Path:
    """Write ``out`` atomically: ``quantized.safetensors`` (packed ``Q`` of every quantized layer, and their
    biases), ``adapter/`` (peft's safetensors adapter) and ``lq_lora.json`` (format, base model, settings,
    each layer's shape and storage format)."""
    from ..cache import atomic_directory

    out = Path(out)
    with atomic_directory(out) as tmp:
        _write_lq_lora(model, tmp)
    return out


def read_lq_lora_meta(path: str | Path) -> dict:
    """The ``lq_lora.json`` of a saved LQ-LoRA model, checked."""
    path = Path(path)
    meta_file = path / "lq_lora.json"
    if not meta_file.exists():
        raise ValueError(f"{str(path)!r} is not a saved LQ-LoRA model (no lq_lora.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def attach_lq_lora(model: nn.Module, path: str | Path, is_trainable: bool = True):
    """Load the adapter of a saved LQ-LoRA model onto ``model`` (the same base architecture) and replace the
    adapted layers' weights with the saved quantized ``Q``."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_lq_lora_meta(path)
    tensors = load_file(str(path / "quantized.safetensors"))
    for name, spec in meta["modules"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{path}: the model has no layer {name!r}") from error
        if not isinstance(layer, nn.Linear) or [layer.out_features, layer.in_features] != spec["shape"]:
            raise ValueError(f"{path}: layer {name!r} does not match the saved shape {spec['shape']}")
    model = PeftModel.from_pretrained(model, str(path / "adapter"), is_trainable=is_trainable)
    root = model.get_base_model()
    for name, spec in meta["modules"].items():
        config = QuantConfig.from_dict(spec["format"])
        parts = {
            part: tensors[f"{name}.{part}"]
            for part in ("codes", "scales", "scale_codes", "scale_offset")
            if f"{name}.{part}" in tensors
        }
        layer = root.get_submodule(name)
        device = layer.base_layer.weight.device
        quantized = QuantizedTensor.from_tensors(parts, tuple(spec["shape"]), config).to(device)
        bias = tensors.get(f"{name}.bias")
        layer.base_layer = QuantizedLinear(quantized, None if bias is None else bias.to(device))
    model.lq_lora_info = {"base_model": meta.get("base_model"), "settings": meta.get("settings")}
    return model


def load_lq_lora(path: str | Path, device: str | torch.device | None = None, is_trainable: bool = False):
    """``(model, tokenizer)`` of a saved LQ-LoRA model: its base model (from the path recorded in
    ``lq_lora.json``) with the saved ``Q`` and adapter."""
    from ..models import load_causal_lm

    meta = read_lq_lora_meta(path)
    model, tokenizer = load_causal_lm(meta.get("base_model"))
    model = attach_lq_lora(model, path, is_trainable=is_trainable)
    if device is not None:
        model.to(device)
    return model, tokenizer


# ===================================================================================== lorite finetune / quantize
METHOD_ARGS = {
    "quantized": "a saved LQ-LoRA model (lorite quantize --out DIR) to start from instead of quantizing",
    "budget": "bits per parameter of Q (default 3.0)",
    "init": "lq (Q + L1·L2, default) or zero (plain quantization + zero-init LoRA, QLoRA-style)",
    "fisher": "weight the decomposition by the empirical Fisher (default false)",
    "calib": "calibration data for the Fisher: a task or corpus:NAME (default: the fine-tuning task)",
    "n_calib": "calibration examples (default 64)",
    "grid": "formats to choose from: compact (default), full, or a comma list of format names",
    "max_iter": "decomposition rounds at most (default 20)",
    "rtol": "stop a decomposition when the error falls by less than this fraction (default 1e-3)",
    "weighting": "Fisher weighting of the SVD: two-sided (default), row, col, none",
    "solver": "milp (default) or lagrangian",
    "cache": "JSON file of cached reconstruction errors",
}


def _load_tokenizer(model_spec):
    from transformers import AutoTokenizer

    from ..models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model_spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_for_finetune(model: nn.Module, config) -> nn.Module:
    """``lorite finetune --method lq_lora``: quantize ``model`` and start LoRA from ``L1·L2`` with
    ``config.rank``, ``config.alpha``, ``config.target_modules`` and ``config.method_args`` (see
    :data:`METHOD_ARGS`; ``{"quantized": DIR}`` loads the output of ``lorite quantize`` instead). The
    quantization runs on ``config.device``. Bad settings raise :class:`lorite.errors.LoriteError`."""
    import sys

    from ..errors import LoriteError
    from ..train.finetune import pick_device

    args = dict(getattr(config, "method_args", None) or {})
    unknown = set(args) - set(METHOD_ARGS)
    if unknown:
        raise LoriteError(
            f"--method-args for lq_lora: unknown {sorted(unknown)}; allowed {sorted(METHOD_ARGS)}"
        )
    if config.init_scale != 1.0:
        raise LoriteError("init_scale rescales the LoRA factors, which LQ-LoRA initialises itself (use 1)")
    if "quantized" in args:
        others = set(args) - {"quantized"}
        if others:
            raise LoriteError(f"--method-args: 'quantized' loads a finished model; drop {sorted(others)}")
        try:
            meta = read_lq_lora_meta(args["quantized"])
        except ValueError as error:
            raise LoriteError(str(error)) from error
        saved_rank = (meta.get("settings") or {}).get("rank")
        if saved_rank is not None and saved_rank != config.rank:
            raise LoriteError(f"--rank {config.rank} differs from the quantized model's rank {saved_rank}")
        try:
            return attach_lq_lora(model, args["quantized"], is_trainable=True)
        except ValueError as error:
            raise LoriteError(str(error)) from error
    fisher_wanted = bool(args.pop("fisher", False))
    calib = args.pop("calib", config.task)
    n_calib = int(args.pop("n_calib", 64))
    cache = args.pop("cache", None)
    try:
        settings = LQLoRAConfig(
            rank=config.rank, alpha=config.alpha, target_modules=config.target_modules,
            dropout=config.dropout, **args,
        )  # fmt: skip
        settings.validate()
    except (TypeError, ValueError) as error:
        raise LoriteError(f"--method-args for lq_lora: {error}") from error
    device = pick_device(config.device)
    model.to(device)
    fisher = None
    if fisher_wanted:
        tokenizer = _load_tokenizer(config.model)
        examples = calibration_examples(calib, tokenizer, n_calib, min(config.max_length, 512), config.seed)
        fisher = estimate_fisher(
            model, examples, target_linears(model, settings.target_modules), bf16=config.bf16
        )
    try:
        model, report = quantize_model(model, settings, fisher, cache, base_model=config.model)
    except ValueError as error:
        raise LoriteError(f"lq_lora: {error}") from error
    print(
        f"lq_lora: Q at {report['bits_per_param']:.3f} bits/param ({report['storage_bits_per_param_with_lora']:.2f} "
        f"with the LoRA factors), relative error {report['relative_error_total']:.4f}",
        file=sys.stderr,
    )
    return model


def save_for_finetune(model: nn.Module, out: Path) -> None:
    """``out/lq_lora/`` (see :func:`save_lq_lora`): the quantized ``Q`` and the trained adapter."""
    save_lq_lora(model, Path(out) / "lq_lora")


def _model_label(spec: str | None) -> str | None:
    """What ``lq_lora.json`` records as the base model: None (the default) or an absolute path."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _check_data_spec(spec: str, what: str) -> None:
    from ..data import bigbench, corpora
    from ..errors import LoriteError

    if spec.startswith("corpus:"):
        if spec.split(":", 1)[1] not in corpora.CORPORA:
            raise LoriteError(f"{what}: unknown corpus {spec!r}; available: {', '.join(corpora.CORPORA)}")
    elif spec.startswith("file:"):
        if not Path(spec.split(":", 1)[1]).exists():
            raise LoriteError(f"{what}: task file {spec.split(':', 1)[1]!r} does not exist")
    else:
        bigbench.load_tasks([spec])


def run_quantize(
    out: str | Path,
    settings: LQLoRAConfig,
    model_spec: str | None = None,
    fisher: bool = False,
    calib: str = "corpus:shakespeare",
    n_calib: int = 64,
    calib_length: int = 256,
    eval_corpus: str = "shakespeare",
    eval_blocks: int = 16,
    block_length: int = 512,
    device: str = "auto",
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``lorite quantize``: load the model, (Fisher,) quantize under the budget, measure held-out perplexity
    before and after, and write ``out`` atomically — the saved model (:func:`save_lq_lora`, so
    ``load_lq_lora(out)`` and ``lorite finetune --method lq_lora --method-args '{"quantized": "OUT"}'`` read
    it), ``report.json`` and ``report.md``. Bad input raises :class:`lorite.errors.LoriteError` before any
    heavy work."""
    from ..cache import atomic_directory
    from ..data import corpora
    from ..errors import LoriteError
    from ..models import load_causal_lm
    from ..train.eval import perplexity
    from ..train.finetune import pick_device

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoriteError(f"--out {str(out)!r} already exists; choose a new directory")
    try:
        settings.validate()
    except ValueError as error:
        raise LoriteError(str(error)) from error
    if n_calib < 1 or calib_length < 2 or eval_blocks < 0 or block_length < 2:
        raise LoriteError("--n-calib and --eval-blocks must be >= 1 and >= 0, lengths >= 2")
    if eval_blocks and eval_corpus not in corpora.CORPORA:
        raise LoriteError(
            f"--eval-corpus {eval_corpus!r} is unknown; available: {', '.join(corpora.CORPORA)}"
        )
    if fisher:
        _check_data_spec(calib, "--calib")
    began = time.perf_counter()
    model, tokenizer = load_causal_lm(model_spec)
    target = pick_device(device)
    model.to(target)
    try:
        layers = target_linears(model, settings.target_modules)
    except ValueError as error:
        raise LoriteError(f"--target-modules: {error}") from error
    narrow = min(min(layer.in_features, layer.out_features) for layer in layers.values())
    if settings.init == "lq" and settings.rank > narrow:
        raise LoriteError(f"--rank {settings.rank} is larger than the narrowest target layer ({narrow})")
    grid = resolve_grid(settings.grid)
    numels = [layer.weight.numel() for layer in layers.values()]
    smallest = sum(min(storage_bits(n, c) for c in grid) for n in numels) / sum(numels)
    if settings.budget is not None and settings.budget < smallest:
        raise LoriteError(
            f"--budget {settings.budget} is below the smallest this grid can store ({smallest:.4f} bits/param)"
        )
    report: dict[str, Any] = {"model": model_spec or "SmolLM2-135M-Instruct", "device": str(target)}
    blocks = heldout_blocks(tokenizer, eval_corpus, block_length, eval_blocks) if eval_blocks else None
    ppl: dict[str, Any] = {}
    if blocks is not None:
        ppl = {"corpus": eval_corpus, "tokens": int(blocks.numel()), "original": perplexity(model, blocks, 4)}
    weights_fisher = None
    if fisher:
        started = time.perf_counter()
        examples = calibration_examples(calib, tokenizer, n_calib, calib_length, settings.seed)
        weights_fisher = estimate_fisher(model, examples, layers, progress=progress)
        report["fisher_s"] = time.perf_counter() - started
        report["calibration"] = {"data": calib, "examples": n_calib, "max_length": calib_length}
    started = time.perf_counter()
    model, details = quantize_model(
        model, settings, weights_fisher, cache, progress, _model_label(model_spec)
    )
    report["quantize_s"] = time.perf_counter() - started
    if blocks is not None:
        ppl["quantized"] = perplexity(model, blocks, 4)
    report.update(details)
    report["perplexity"] = ppl
    report["total_s"] = time.perf_counter() - began
    with atomic_directory(out) as tmp:
        _write_lq_lora(model, tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """The human-readable ``report.md`` of :func:`run_quantize`."""
    settings = report["settings"]
    kind = "LQ-LoRA (Q + L1·L2)" if settings["init"] == "lq" else "NF quantization + zero-init LoRA"
    lines = [
        f"# {kind} of {report['model']}",
        "",
        f"Budget {settings['budget']} bits/param for Q, rank {settings['rank']}, "
        f"{'Fisher-weighted' if report['fisher'] else 'unweighted'}, grid of {len(report['grid'])} formats, "
        f"{report['solver']} ({report['solver_status']}), {report['device']}.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| bits/param of Q (exact, scales included) | {report['bits_per_param']:.4f} |",
        f"| bits/param with the LoRA factors at 16 bits | {report['storage_bits_per_param_with_lora']:.4f} |",
        f"| quantized parameters | {report['storage_quantized_parameters']:,} |",
        f"| relative error ‖W − (Q + L1·L2)‖ / ‖W‖ (all matrices) | {report['relative_error_total']:.5f} |",
        f"| time to quantize | {report['quantize_s']:.1f} s |",
    ]
    if "fisher_s" in report:
        lines.append(
            f"| Fisher estimation ({report['calibration']['examples']} examples) | {report['fisher_s']:.1f} s |"
        )
    ppl = report.get("perplexity") or {}
    if ppl:
        lines.append(
            f"| held-out perplexity ({ppl['corpus']}, {ppl['tokens']:,} tokens): original → quantized | "
            f"{ppl['original']:.3f} → {ppl['quantized']:.3f} |"
        )
    lines += [
        "",
        "Formats chosen: " + ", ".join(f"{n} × {k}" for k, n in report["format_counts"].items()),
        "",
    ]
    lines += [
        "| matrix | shape | format | bits/param | rel. error | plain quant. rel. error | iterations |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["matrices"]:
        lines.append(
            f"| {m['name']} | {m['shape'][0]}×{m['shape'][1]} | {m['format']} | {m['bits_per_param']:.3f} | "
            f"{m['relative_error']:.4f} | {m['plain_quantization_relative_error']:.4f} | {m['iterations']} |"
        )
    return "\n".join(lines) + "\n"


def add_quantize_parser(sub) -> None:
    """``lorite quantize``: the sub-command's options (registered by :mod:`lorite.cli`)."""
    quant = sub.add_parser(
        "quantize", help="LQ-LoRA: W ≈ Q + L1·L2 under a bits-per-parameter budget; report and saved model"
    )
    quant.add_argument(
        "--model", default=None, help="SmolLM2-135M-Instruct (default), a .gguf file or a model dir"
    )
    quant.add_argument(
        "--budget", type=float, default=3.0, help="bits per parameter of Q (LoRA factors extra)"
    )
    quant.add_argument("--rank", type=int, default=64)
    quant.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scaling 1)")
    quant.add_argument(
        "--init",
        default="lq",
        help="lq (Q + L1·L2) or zero (plain quantization, zero-init LoRA: QLoRA-style)",
    )
    quant.add_argument("--fisher", action="store_true", help="Fisher-weighted decomposition (data-aware)")
    quant.add_argument("--calib", default="corpus:shakespeare", help="Fisher data: a task or corpus:NAME")
    quant.add_argument("--n-calib", type=int, default=64, help="calibration examples (one gradient each)")
    quant.add_argument("--calib-length", type=int, default=256, help="tokens per calibration example")
    quant.add_argument("--grid", default="compact", help="compact (24 formats), full (432) or a comma list")
    quant.add_argument("--max-iter", type=int, default=20, help="decomposition rounds at most")
    quant.add_argument("--rtol", type=float, default=1e-3, help="stop when the error falls less than this")
    quant.add_argument("--solver", default="milp", help="milp (scipy.optimize.milp) or lagrangian")
    quant.add_argument("--target-modules", default="all-linear", help="'all-linear' or a comma list")
    quant.add_argument("--eval-corpus", default="shakespeare", help="held-out documents for perplexity")
    quant.add_argument("--eval-blocks", type=int, default=16, help="perplexity blocks (0: skip)")
    quant.add_argument("--block-length", type=int, default=512)
    quant.add_argument("--device", default="auto")
    quant.add_argument("--cache", default=None, help="cost cache file (default: in lorite's cache dir)")
    quant.add_argument("--no-cache", action="store_true", help="recompute every reconstruction error")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--out", required=True, help="a new directory for the model and report")
    quant.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args) -> None:
    from ..cache import cache_dir
    from ..errors import LoriteError

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        settings = LQLoRAConfig(
            budget=args.budget, rank=args.rank, alpha=args.alpha, init=args.init, target_modules=targets,
            grid=args.grid, max_iter=args.max_iter, rtol=args.rtol, solver=args.solver, seed=args.seed,
        )  # fmt: skip
        settings.validate()
    except ValueError as error:
        raise LoriteError(str(error)) from error
    cache = None if args.no_cache else (args.cache or cache_dir() / "lq_lora" / "costs.json")
    report = run_quantize(
        args.out, settings, args.model, fisher=args.fisher, calib=args.calib, n_calib=args.n_calib,
        calib_length=args.calib_length, eval_corpus=args.eval_corpus, eval_blocks=args.eval_blocks,
        block_length=args.block_length, device=args.device, cache=cache,
    )  # fmt: skip
    ppl = report.get("perplexity") or {}
    summary = (
        f"Q at {report['bits_per_param']:.4f} bits/param, relative error {report['relative_error_total']:.4f}"
    )
    if ppl:
        summary += f", perplexity {ppl['original']:.3f} → {ppl['quantized']:.3f}"
    print(summary)
    print(f"report: {Path(args.out) / 'report.md'}   model: {args.out} (load_lq_lora)")


__all__ = [
    "GRIDS",
    "Allocation",
    "CostTable",
    "LQDecomposition",
    "LQLoRAConfig",
    "QuantizationPlan",
    "QuantizedLinear",
    "add_quantize_parser",
    "apply_lq_lora",
    "attach_lq_lora",
    "calibration_examples",
    "cost_table",
    "decompose_matrices",
    "estimate_fisher",
    "fisher_sides",
    "heldout_blocks",
    "load_lq_lora",
    "lq_decompose",
    "lq_decompose_batch",
    "parse_config_name",
    "plan_allocation",
    "prepare_for_finetune",
    "quantization_error",
    "quantize_model",
    "quantized_layers",
    "report_markdown",
    "resolve_grid",
    "run_quantize",
    "save_for_finetune",
    "save_lq_lora",
    "solve_allocation",
    "storage_report",
    "target_linears",
]
