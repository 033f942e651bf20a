"""The ``lorite grow`` job: grow a pretrained small Llama (an HF model dir or a ``lorite pretrain`` run) into a larger
size with LiGO (learned operator, arXiv 2303.00980) or plain stacking, and save it in HF format.

    lorite grow --from runs/20m --to-size 60m --ligo-steps 100 --out runs/60m-ligo-init

Writes ``DIR/`` = ``save_pretrained`` files (loads with ``LlamaForCausalLM.from_pretrained``) plus
``growth.json`` (settings, operator losses, held-out loss of the small model and of the grown one before
and after operator training). The output directory is written atomically and never overwritten.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_directory, atomic_write_text
from ..data.blocks import TokenBlocks, build_token_cache, make_sampler
from ..data.corpora import CORPORA
from ..errors import LoriteError
from ..models.llama import LLAMA_SIZES, llama_config, pretraining_tokenizer
from ..runtime import pick_device, require_new_output
from ..train.pretrain import DEFAULT_CORPORA, DEFAULT_CORPUS_CAPS
from .ligo import METHODS, LiGOConfig, LiGOOperator, OperatorTrainingConfig, held_out_loss, stack_config
from .ligo import train_operator as train


@dataclass
class GrowConfig:
    """One ``lorite grow`` run."""

    source: str  # an HF model dir, or a pretrain run dir (its model/ and token cache are used)
    size: str = "60m"  # a key of lorite.models.llama.LLAMA_SIZES
    method: str = "ligo"  # "ligo" or "stack"
    ligo_steps: int = 100
    data: str | None = None  # a token cache dir; default: the pretrain run's, else built from ``corpora``
    corpora: list[str] | None = None  # default: the pretraining harness's DEFAULT_CORPORA
    block_length: int = 256  # only when a cache is built here
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    width_init: str = "rand"
    depth_init: str = "stack_noisy"
    width_form: str = "identity_plus_C"
    eval_blocks: int = 64  # held-out blocks for the before/after losses (0: skip)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    progress: bool = True
    size_overrides: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields (e.g. tiny test sizes)


def resolve_source(source: str | Path) -> tuple[Path, dict]:
    """(HF model dir, the pretrain run's metrics or {}) of ``source``."""
    path = Path(source)
    if (path / "model" / "config.json").exists():
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return path / "model", metrics
    if (path / "config.json").exists() and "model_type" in json.loads((path / "config.json").read_text()):
        return path, {}
    raise LoriteError(
        f"--from {str(path)!r} is neither a model dir (config.json) nor a pretrain run (model/)"
    )


def resolve_tokens(config: GrowConfig, run_metrics: dict) -> Path:
    """The token cache to train the operator on and to measure held-out loss with."""
    if config.data is not None:
        path = Path(config.data)
    elif run_metrics.get("data") and (Path(run_metrics["data"]) / "meta.json").exists():
        path = Path(run_metrics["data"])
    else:
        corpora = list(config.corpora or DEFAULT_CORPORA)
        if unknown := [c for c in corpora if c not in CORPORA]:
            raise LoriteError(f"unknown corpus {unknown[0]!r}; available: {', '.join(CORPORA)}")
        caps = {c: cap for c, cap in DEFAULT_CORPUS_CAPS.items() if c in corpora}
        return build_token_cache(
            corpora, pretraining_tokenizer(), config.block_length, max_tokens=caps, progress=config.progress
        )
    if not (path / "meta.json").exists():
        raise LoriteError(f"--data {str(path)!r} is not a token cache (no meta.json)")
    return path


def _training_batches(blocks, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    sampler = make_sampler(
        "random", n_blocks=len(blocks), batch_size=batch_size, total_steps=steps, seed=seed
    )
    for _ in range(steps):
        yield blocks[sampler.next_indices()]


def _held_out(blocks, n: int, batch_size: int) -> list[torch.Tensor]:
    ids = torch.linspace(0, len(blocks) - 1, min(n, len(blocks))).round().long().unique()
    return [blocks[ids[i : i + batch_size]] for i in range(0, len(ids), batch_size)]


def grow_run(config: GrowConfig, out: str | Path) -> dict:
    """Load, grow, save (atomically) — see the module docstring. Returns what ``growth.json`` holds."""
    from transformers import LlamaForCausalLM  # optional dependency (lorite[peft])

    out = Path(out)
    require_new_output(out)
    if config.size not in LLAMA_SIZES:
        raise LoriteError(f"unknown --to-size {config.size!r}; available: {', '.join(LLAMA_SIZES)}")
    if config.method not in METHODS:
        raise LoriteError(f"unknown --method {config.method!r}; available: {', '.join(METHODS)}")
    if config.ligo_steps < 0 or config.batch_size < 1:
        raise LoriteError("--ligo-steps must be >= 0 and --batch-size >= 1")
    if config.method == "ligo" and config.ligo_steps and not 0 <= config.warmup_steps < config.ligo_steps:
        raise LoriteError(f"--warmup-steps must be in [0, --ligo-steps={config.ligo_steps})")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise LoriteError(f"--lr must be a positive number, got {config.lr}")
    model_dir, run_metrics = resolve_source(config.source)
    device = pick_device(config.device)

    small = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    overrides = {
        "tie_word_embeddings": bool(small.config.tie_word_embeddings),
        "max_position_embeddings": small.config.max_position_embeddings,
        **config.size_overrides,
    }
    large_config = llama_config(config.size, vocab_size=small.config.vocab_size, **overrides)
    if config.method == "stack":
        ligo = stack_config(seed=config.seed)
    else:
        ligo = LiGOConfig(width_form=config.width_form, depth_init=config.depth_init,
                          width_init=config.width_init, seed=config.seed)  # fmt: skip
    try:
        operator = LiGOOperator(small, large_config, ligo).to(device)
    except ValueError as error:
        raise LoriteError(f"cannot grow {model_dir} into {config.size!r}: {error}") from error

    steps = config.ligo_steps if config.method == "ligo" else 0
    needs_data = steps > 0 or config.eval_blocks > 0
    info: dict[str, Any] = {
        "config": asdict(config), "source_model": str(model_dir), "ligo": asdict(ligo),
        "small_parameters": sum(p.numel() for p in small.parameters()),
        "large_parameters": None, "operator_parameters": operator.parameter_count(),
    }  # fmt: skip
    if needs_data:
        data = resolve_tokens(config, run_metrics)
        train_blocks = TokenBlocks(data, "train")
        if train_blocks.vocab_size > small.config.vocab_size:
            raise LoriteError(
                f"the token cache has {train_blocks.vocab_size} token ids, the model {small.config.vocab_size}"
            )
        info["data"] = str(data)
        held_out = _held_out(TokenBlocks(data, "validation"), config.eval_blocks, config.batch_size)
        if held_out:
            info["small_validation_loss"] = held_out_loss(small, held_out)
            info["grown_validation_loss_at_init"] = held_out_loss(operator, held_out)
    if steps > 0:
        training = OperatorTrainingConfig(
            steps=steps, lr=config.lr, warmup_steps=config.warmup_steps, bf16=config.bf16
        )
        batches = _training_batches(train_blocks, config.batch_size, steps, config.seed)
        info["operator_training"] = asdict(training)
        info["operator_tokens"] = steps * config.batch_size * train_blocks.block_length
        info["operator_losses"] = train(operator, batches, training, progress=config.progress)
        if held_out:
            info["grown_validation_loss"] = held_out_loss(operator, held_out)
    elif needs_data and held_out:
        info["grown_validation_loss"] = info["grown_validation_loss_at_init"]
    grown = operator.materialize()
    info["large_parameters"] = sum(p.numel() for p in grown.parameters())
    with atomic_directory(out) as tmp:
        grown.save_pretrained(tmp)
        atomic_write_text(tmp / "growth.json", json.dumps(info, indent=1))
    return info
