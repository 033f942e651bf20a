"""LQ-LoRA's settings (:class:`LQLoRAConfig`) and the grids of storage formats the bit allocation chooses
from (:data:`GRIDS`, :func:`resolve_grid`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..quant import QuantConfig, config_grid

INITS = ("lq", "zero")


WEIGHTINGS = ("two-sided", "row", "col", "none")


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
