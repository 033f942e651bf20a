"""The whole LQ-LoRA pipeline on a model: (Fisher →) costs → ILP → final decompositions → peft model with
quantized base layers, and the report of what it chose."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...tasks.encoding import lm_loss
from ..quant import QuantConfig, quantize_batch, storage_bits
from .allocation import _default_batch_elements, _groups, plan_allocation
from .config import LQLoRAConfig
from .decomposition import LQDecomposition, _errors, lq_decompose_batch, quantization_error
from .layers import apply_lq_lora, storage_report, target_linears


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
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

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
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

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
