"""``--method lq_lora``: LQ-LoRA (:mod:`lorite.adapters.lq_lora`) from the run's settings — quantize the
model under a bits budget (optionally Fisher-weighted on calibration data of the task layer) and start LoRA
from ``L1·L2``, or load the output of ``lorite quantize``; the run saves ``lq_lora/`` (``Q`` and the
adapter)."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from ...adapters.lq_lora import (
    LQLoRAConfig,
    attach_lq_lora,
    estimate_fisher,
    quantize_model,
    read_lq_lora_meta,
    save_lq_lora,
    target_linears,
)
from ...errors import DamagedArtifact, LoriteError
from ...models import load_tokenizer
from ...runtime import pick_device
from ...tasks import calibration_batches

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


def prepare(model: nn.Module, config) -> nn.Module:
    """Quantize ``model`` and start LoRA from ``L1·L2`` with
    ``config.rank``, ``config.alpha``, ``config.target_modules`` and ``config.method_args`` (see
    :data:`METHOD_ARGS`; ``{"quantized": DIR}`` loads the output of ``lorite quantize`` instead). The
    quantization runs on ``config.device``. Bad settings raise :class:`lorite.errors.LoriteError`."""
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
        except DamagedArtifact:  # a damaged folder stays one (exit 1), not bad input
            raise
        except ValueError as error:
            raise LoriteError(str(error)) from error
        saved_rank = (meta.get("settings") or {}).get("rank")
        if saved_rank is not None and saved_rank != config.rank:
            raise LoriteError(f"--rank {config.rank} differs from the quantized model's rank {saved_rank}")
        try:
            return attach_lq_lora(model, args["quantized"], is_trainable=True)
        except DamagedArtifact:
            raise
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
        tokenizer = load_tokenizer(config.model)
        examples = calibration_batches(calib, tokenizer, n_calib, min(config.max_length, 512), config.seed)
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


def save(model: nn.Module, out: Path) -> None:
    """``out/lq_lora/`` (see :func:`lorite.adapters.lq_lora.save_lq_lora`): the quantized ``Q`` and the
    trained adapter."""
    save_lq_lora(model, Path(out) / "lq_lora")
