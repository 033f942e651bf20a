"""Measure how much an optimizer's trajectory depends on how each LoRA product ``B·A`` is factored.

Two copies of a model whose pairs are ``(A, B)`` and ``(T⁻¹A, B·T)`` have the same effective weights
``W0 + s·B·A``; a transformation-invariant optimizer (LoRA-RITE; ScaledGD) keeps them equal step after
step, others drift apart. :func:`invariance_deviation` returns the largest relative gap of the effective
weight changes over the run (the LoRA-RITE paper's §2 test, spec §5).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .pairs import find_lora_pairs


def effective_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``s·B·A`` of every LoRA pair, by pair name (detached copies)."""
    return {pair.name: pair.delta_weight().detach().clone() for pair in find_lora_pairs(model).pairs}


def relative_gap(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """``max over pairs of max|ΔW₁ − ΔW₂| / max|ΔW₁|``."""
    return max(float((first[k] - second[k]).abs().max() / first[k].abs().max()) for k in first)


def reparameterize(model: nn.Module, transform: Callable[[int, int], torch.Tensor]) -> nn.Module:
    """A deep copy whose pairs are ``(T⁻¹A, B·T)`` with ``T = transform(rank, pair_index)``; same ``B·A``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for index, pair in enumerate(find_lora_pairs(twin).pairs):
            rank = pair.rank
            T = transform(rank, index).to(dtype=pair.A.dtype, device=pair.A.device)
            A2 = torch.linalg.solve(T, pair.A.reshape(rank, -1))
            B2 = pair.B.reshape(pair.B.shape[0], rank) @ T
            pair.A.copy_(A2.reshape(pair.A.shape))
            pair.B.copy_(B2.reshape(pair.B.shape))
    return twin


def scalar_transform(scale: float) -> Callable[[int, int], torch.Tensor]:
    """``T = s·I``: ``(A/s, s·B)``."""
    return lambda rank, index: scale * torch.eye(rank, dtype=torch.float64)


def random_transform(seed: int = 100, shift: float = 3.0) -> Callable[[int, int], torch.Tensor]:
    """A well-conditioned random ``T = randn(r, r) + shift·I`` per pair."""

    def make(rank: int, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed + index)
        return torch.randn(rank, rank, generator=gen, dtype=torch.float64) + shift * torch.eye(
            rank, dtype=torch.float64
        )

    return make


def invariance_deviation(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Iterable[dict[str, torch.Tensor]],
    transform: Callable[[int, int], torch.Tensor],
    before_step: Callable[[nn.Module], None] | None = None,
) -> tuple[float, float]:
    """Train ``model`` and its reparameterised twin on the same ``batches`` (keyword inputs of the model,
    which must return ``.loss``). Returns ``(deviation, movement)``: the largest relative gap of the
    effective weight changes over the run, and how far the first copy moved from the start (a deviation
    means nothing if nothing moved). ``before_step`` may alter gradients (e.g. clip them) before each step.
    """
    batches = list(batches)
    start = effective_deltas(model)
    runs = []
    for twin in (copy.deepcopy(model), reparameterize(model, transform)):
        optimizer = make_optimizer(twin)
        trajectory = []
        for batch in batches:
            twin(**batch).loss.backward()
            if before_step is not None:
                before_step(twin)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trajectory.append(effective_deltas(twin))
        runs.append(trajectory)
    deviation = max(relative_gap(a, b) for a, b in zip(*runs))
    return deviation, relative_gap(runs[0][-1], start)
