"""The bit allocation: every matrix's storage format chosen by an integer linear program (a multiple-choice
knapsack) over the reconstruction errors of every format, under a budget of bits per parameter."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import atomic_write_text
from ..quant import QuantConfig, storage_bits
from .config import LQLoRAConfig, resolve_grid
from .decomposition import _decompose, quantization_error


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
    import numpy as np  # optional dependency (lorite[all])

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
    import numpy as np  # optional dependency (lorite[all])

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
        # scipy: an optional dependency (lorite[all]), slow to import
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
    import numpy as np  # optional dependency (lorite[all])

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
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

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
