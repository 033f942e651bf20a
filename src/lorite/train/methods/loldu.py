"""``--method loldu``: LoLDU (:mod:`lorite.adapters.loldu`) from the run's settings; the run saves the
adapter (``adapter/``: each matrix's ``r`` trained pivots and their positions)."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from ...adapters.loldu import LoLDUConfig, apply_loldu, save_loldu
from ...errors import LoriteError
from ...optim import PairOptimizer, create
from ...runtime import pick_device

METHOD_ARGS = ("init_method", "train_scale", "selection", "decompose_dtype")


def prepare(model: nn.Module, config) -> nn.Module:
    """LoLDU with ``config.rank``, ``config.target_modules``, ``alpha = config.alpha`` (None: 1, i.e.
    σ = 1/r as the authors) and ``config.method_args`` (:data:`METHOD_ARGS`). Bad settings raise
    :class:`lorite.errors.LoriteError`. Warns when ``config.optimizer`` is a pair optimizer: it trains the
    diagonals with its AdamW fallback group."""
    args = dict(getattr(config, "method_args", None) or {})
    if set(args) - set(METHOD_ARGS):
        raise LoriteError(
            f"--method-args for loldu: unknown {sorted(set(args) - set(METHOD_ARGS))}; allowed {sorted(METHOD_ARGS)}"
        )
    if config.dropout:
        raise LoriteError("--dropout: LoLDU has no dropout (its adapter path is a fixed low-rank map); use 0")
    if config.init_scale != 1.0:
        raise LoriteError("init_scale rescales LoRA factors; LoLDU has none (use 1)")
    loldu = LoLDUConfig(
        rank=config.rank, alpha=1.0 if config.alpha is None else config.alpha,
        target_modules=config.target_modules, **args,
    )  # fmt: skip
    model.to(pick_device(config.device))  # decompose where the model will train (the GPU is far faster)
    try:
        apply_loldu(model, loldu)
    except (ValueError, TypeError) as error:
        raise LoriteError(str(error)) from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pair optimizers' own "no LoRA pairs" warning, said better below
        probe = create(config.optimizer, model, lr=config.lr, **config.optimizer_kwargs)
    if isinstance(probe, PairOptimizer):
        warnings.warn(
            f"--optimizer {config.optimizer} is a LoRA pair optimizer, and LoLDU has no (A, B) pairs: it "
            "trains the LoLDU diagonals with its AdamW fallback group (fallback_lr defaults to --lr), i.e. "
            "as --optimizer adamw would",
            stacklevel=2,
        )
    del probe
    return model


def save(model: nn.Module, out: Path, state_dict: dict | None = None) -> None:
    """The adapter in ``out/adapter/`` (see :func:`lorite.adapters.loldu.save_loldu`)."""
    save_loldu(model, Path(out) / "adapter", state_dict)
