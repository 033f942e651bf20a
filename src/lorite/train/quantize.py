"""``lorite quantize``: the LQ-LoRA quantization job — load a model, (estimate the Fisher on calibration
data,) decompose every target matrix under a bits budget, measure held-out perplexity before and after,
and write the saved model with its report. ``lorite finetune --method lq_lora --method-args
'{"quantized": DIR}'`` fine-tunes from the result."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..adapters.lq_lora import (
    LQLoRAConfig,
    estimate_fisher,
    quantize_model,
    resolve_grid,
    target_linears,
    write_lq_lora,
)
from ..adapters.quant import storage_bits
from ..cache import atomic_directory
from ..data import corpora
from ..errors import LoriteError
from ..models import load_causal_lm
from ..runtime import pick_device, require_new_output
from ..tasks import calibration_batches, check_task_specs, heldout_blocks
from ..tasks.evaluation import perplexity


def _model_label(spec: str | None) -> str | None:
    """What ``lq_lora.json`` records as the base model: None (the default) or an absolute path."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


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
    before and after, and write ``out`` atomically — the saved model (:func:`lorite.adapters.lq_lora.save_lq_lora`, so
    ``load_lq_lora(out)`` and ``lorite finetune --method lq_lora --method-args '{"quantized": "OUT"}'`` read
    it), ``report.json`` and ``report.md``. Bad input raises :class:`lorite.errors.LoriteError` before any
    heavy work."""
    out = Path(out)
    require_new_output(out)
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
        try:
            check_task_specs([calib])
        except LoriteError as error:
            raise LoriteError(f"--calib: {error}") from error
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
        examples = calibration_batches(calib, tokenizer, n_calib, calib_length, settings.seed)
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
        write_lq_lora(model, tmp)
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
