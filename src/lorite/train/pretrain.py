"""Pre-training a small LLaMA from scratch on a token cache — the loop reads top to bottom:

    config → data (token cache) → model → optimizer + schedule → sampler → [resume] → train → evaluate → save

The recipe follows the GaLore/Fira small-LLaMA pre-training setup (arXiv 2403.03507 §5, arXiv 2410.01623
App. B.1): packed blocks of 256 tokens, linear warmup over the first 10% of steps, then cosine decay to
10% of the peak learning rate, bf16 autocast on CUDA (weights and optimizer state stay fp32).

Each micro-batch's per-block mean token loss (from the training forward, detached) goes to the sampler's
``observe``, so adaptive data schedules (LFR, arXiv 2409.06131) plug in through ``config.sampler``.
Validation perplexity is measured on held-out *documents*, per corpus and for the training mix, every
``eval_every`` steps and logged against tokens seen in ``metrics.json``.

A run directory holds ``config.json``, ``metrics.json`` (rewritten atomically at every evaluation, so an
interrupted run still leaves its curve), ``checkpoint/`` (model, optimizer, scheduler, sampler and RNG
state, written atomically), ``log.jsonl`` (a line per step and per evaluation: :mod:`lorite.train.run_log`)
and, at the end, ``model/`` (``save_pretrained``). Resuming from a checkpoint continues exactly as the
uninterrupted run would have.

Under ``torchrun`` (or a process group the caller initialised), :func:`lorite.runtime.setup` joins the group,
the model is wrapped in DDP (:func:`lorite.train.distributed.wrap`), each rank draws its own shard of every
global micro-batch, losses are all-reduced, and rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cache import atomic_directory, atomic_write_text
from ..data.blocks import SAMPLERS, TokenBlocks, build_token_cache, make_sampler, read_token_cache
from ..data.corpora import CORPORA
from ..errors import LoriteError
from ..models.llama import LLAMA_SIZES, build_llama, pretraining_tokenizer
from ..optim import REGISTRY, create
from ..runtime import (
    CHECKPOINT_DIR,
    World,
    all_ranks_agree,
    check_output_dir,
    check_schedule,
    lr_scheduler,
    pick_device,
    setup,
)
from . import distributed
from .checkpoint import load_checkpoint, open_checkpoint, save_checkpoint, saved_train_state
from .run_log import RunLog, check_report_to, gradient_norm

ENGLISH_CORPORA = ("shakespeare", "bible", "austen", "webster")
DEFAULT_CORPORA = (*ENGLISH_CORPORA, "cpython")
DEFAULT_CORPUS_CAPS = {"webster": 4_000_000}
# settings that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = (
    "progress",
    "time_limit",
    "checkpoint_every",
    "keep_last",
    "device",
    "log_every",
    "report_to",
)


@dataclass
class PretrainConfig:
    """Everything a pre-training run depends on (saved in ``config.json`` and every checkpoint)."""

    size: str = "60m"  # a key of lorite.models.llama.LLAMA_SIZES (a label only when a model is passed)
    optimizer: str = "adamw"  # a lorite.optim registry name
    lr: float = 1e-3  # peak learning rate
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: int = 10_000_000  # training budget over all ranks; fixes the number of optimizer steps
    block_length: int = 256
    batch_size: int = 64  # blocks per micro-batch, per rank
    grad_accum: int = 1
    warmup: float = 0.1  # fraction of the optimizer steps
    schedule: str = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio·lr, or constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    sampler: str = "random"  # see lorite.data.blocks.make_sampler
    sampler_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 100  # validation every N optimizer steps (and at step 0); 0: only at the end
    eval_blocks: int | None = 256  # per corpus in periodic evaluations; the final one uses all
    eval_batch_size: int = 64
    seed: int = 0  # model initialisation and data order
    device: str = "auto"
    bf16: bool = True  # autocast to bf16 on CUDA
    checkpoint_every: int = 0  # optimizer steps; 0: only when stopped early
    keep_last: int = 1  # checkpoints kept: checkpoint/ and keep_last - 1 checkpoint-<step>/ (checkpoint.py)
    corpora: list[str] = field(default_factory=lambda: list(DEFAULT_CORPORA))  # built into the cache
    train_corpora: list[str] | None = None  # the subset trained on (None: all); all are evaluated
    data: str | None = None  # an existing token cache directory (then ``corpora`` must be in it)
    # subsample corpora when building the cache (the dictionary would otherwise be 60% of the mix)
    max_corpus_tokens: int | dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_CORPUS_CAPS))
    validation_fraction: float = 0.05
    time_limit: float | None = None  # seconds of training; then checkpoint, final evaluation, stop
    log_every: int = 10
    progress: bool = False  # tqdm progress bar
    report_to: str = "none"  # also write the run log's scalars to: tensorboard (RUN/tensorboard/)

    def validate(self) -> None:
        if self.size not in LLAMA_SIZES:
            raise LoriteError(f"unknown model size {self.size!r}; available: {', '.join(LLAMA_SIZES)}")
        if self.tokens < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.block_length < 2:
            raise LoriteError("--tokens, --batch-size, --grad-accum must be >= 1 and the block length >= 2")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise LoriteError(f"--lr must be a non-negative number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise LoriteError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        check_schedule(self.schedule)
        if self.eval_every < 0 or self.checkpoint_every < 0 or self.grad_clip < 0:
            raise LoriteError("--eval-every, --checkpoint-every and --grad-clip must be >= 0")
        if self.keep_last < 1:
            raise LoriteError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.eval_blocks is not None and self.eval_blocks < 1:
            raise LoriteError(f"eval_blocks must be >= 1 or None, got {self.eval_blocks}")
        if not self.corpora:
            raise LoriteError("--corpora is empty")
        if self.train_corpora is not None and (
            bad := [c for c in self.train_corpora if c not in self.corpora]
        ):
            raise LoriteError(f"train corpus {bad[0]!r} is not among --corpora {', '.join(self.corpora)}")
        if self.data is None and (unknown := [c for c in self.corpora if c not in CORPORA]):
            raise LoriteError(f"unknown corpus {unknown[0]!r}; available: {', '.join(CORPORA)}")
        if self.sampler not in SAMPLERS:
            raise LoriteError(f"unknown sampler {self.sampler!r}; available: {', '.join(SAMPLERS)}")
        if self.optimizer not in REGISTRY:
            raise LoriteError(f"unknown optimizer {self.optimizer!r}; available: {', '.join(REGISTRY)}")
        check_report_to(self.report_to)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise LoriteError(f"unknown pretraining settings {unknown}")
        return cls(**values)


# ------------------------------------------------------------------------------------------- pieces
def block_losses(model, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block (shape ``(n,)``): the training objective, and the
    per-block statistic samplers observe. Under autocast the loss is computed in fp32."""
    logits = model(input_ids=blocks).logits
    # targets shifted left; the last position has none (ignored), so the logits need no sliced copy
    targets = F.pad(blocks[:, 1:], (0, 1), value=-100)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return losses.float().view(blocks.shape)[:, :-1].mean(dim=1)


def resolve_data(config: PretrainConfig) -> Path:
    """The token cache directory: ``config.data``, or built (once) from ``config.corpora`` with the
    SmolLM2 tokenizer."""
    if config.data is not None:
        path = Path(config.data)
        if not (path / "meta.json").exists():
            raise LoriteError(f"--data {str(path)!r} is not a token cache (no meta.json)")
        meta = read_token_cache(path)  # a damaged cache: DamagedArtifact, saying to delete it
        if meta["block_length"] != config.block_length:
            raise LoriteError(
                f"--data has blocks of {meta['block_length']} tokens, the run asks {config.block_length}"
            )
        if missing := [c for c in config.corpora if c not in meta["splits"]["train"]["corpora"]]:
            raise LoriteError(f"--data lacks corpus {missing[0]!r}; it has {', '.join(meta['corpora'])}")
        return path
    caps = config.max_corpus_tokens
    if isinstance(caps, dict):  # caps of corpora not in this run are irrelevant to it
        caps = {name: cap for name, cap in caps.items() if name in config.corpora}
    return build_token_cache(
        list(config.corpora),
        pretraining_tokenizer(),
        config.block_length,
        validation_fraction=config.validation_fraction,
        seed=0,  # the split is fixed across run seeds
        max_tokens=caps,
        progress=config.progress,
    )


@torch.no_grad()
def evaluate(model, validation: dict, weights: dict[str, float], config, world: World, max_blocks) -> dict:
    """Validation loss and perplexity of ``model`` (unwrapped: no DDP collectives) per corpus and for the training mix (per-corpus losses weighted by
    held-out size ``weights``; with every block evaluated this is the loss over the mix's held-out set).
    ``max_blocks`` evenly spaced blocks per corpus (None: all); ranks split the blocks, sums all-reduced."""
    device = world.device
    use_bf16 = config.bf16 and device.type == "cuda"
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {"by_corpus": {}}
    for corpus, blocks in validation.items():
        n = len(blocks)
        ids = torch.arange(n)
        if max_blocks is not None and n > max_blocks:
            ids = torch.linspace(0, n - 1, max_blocks).round().long().unique()
        ids = ids[world.rank :: world.size]
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        for start in range(0, len(ids), config.eval_batch_size):
            batch = blocks[ids[start : start + config.eval_batch_size]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                losses = block_losses(model, batch)
            total[0] += losses.double().sum() * (batch.shape[1] - 1)
            total[1] += losses.numel() * (batch.shape[1] - 1)
        if world.active:
            dist.all_reduce(total)
        loss = float(total[0] / total[1])
        result["by_corpus"][corpus] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    mix = sum(weights[c] * result["by_corpus"][c]["loss"] for c in weights) / sum(weights.values())
    result.update(loss=mix, ppl=math.exp(min(mix, 50.0)))
    model.train(was_training)
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, projection bases, …)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (plain values) and size, as the optimizer resolved them."""
    settings = []
    for group in optimizer.param_groups:
        plain = {
            k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple))
        }
        plain.update(tensors=len(group["params"]), elements=sum(p.numel() for p in group["params"]))
        settings.append(plain)
    return settings


def saved_config(out: str | Path) -> PretrainConfig:
    """The configuration of the run whose checkpoint is in ``out`` (the one a resume continues: checked,
    and an older kept one when the newest is damaged; :class:`~lorite.errors.DamagedArtifact` if none is
    intact)."""
    state = Path(out) / CHECKPOINT_DIR / "train_state.json"
    if not state.exists():
        raise LoriteError(f"--resume {str(out)!r}: no checkpoint there (expected {state})")
    return PretrainConfig.from_dict(saved_train_state(out)["config"])


# ------------------------------------------------------------------------------------------- the run
def pretrain(
    config: PretrainConfig,
    out: str | Path,
    resume: bool = False,
    model=None,
    stop_after: int | None = None,
) -> dict:
    """Pre-train ``model`` (None: ``build_llama(config.size, seed=config.seed)``) and return the metrics.

    ``resume`` continues the run checkpointed in ``out`` (``config`` must equal the saved one, except
    for :data:`RESUMABLE_CHANGES`). ``stop_after`` ends the session after that many optimizer steps with
    a checkpoint and no final evaluation, as a pre-empted job would; the schedule still spans the budget.
    A passed ``model`` (e.g. a grown one, for LiGO) is trained in place.
    """
    config.validate()
    out = Path(out)
    world = setup("ddp", pick_device(config.device))
    is_main = world.is_main
    check_output_dir(out, resume)
    checkpoint = None
    if resume:  # checked, and its config compared, before anything is loaded or written
        checkpoint = open_checkpoint(out, None, asdict(config), RESUMABLE_CHANGES, announce=is_main)
    device = world.device
    use_bf16 = config.bf16 and device.type == "cuda"

    # data: one token cache; training blocks from train_corpora, validation blocks of every corpus
    if is_main:
        data_path = resolve_data(config)
    if world.active:  # the other ranks wait for rank 0 to build the cache, then find it
        dist.barrier()
        if not is_main:
            data_path = resolve_data(config)
    train_corpora = list(config.train_corpora or config.corpora)
    train_blocks = TokenBlocks(data_path, "train", corpora=train_corpora)
    validation = {c: TokenBlocks(data_path, "validation", corpora=[c]) for c in config.corpora}
    weights = {c: float(len(validation[c])) for c in train_corpora}

    tokens_per_step = config.batch_size * config.grad_accum * world.size * config.block_length
    total_steps = config.tokens // tokens_per_step
    if total_steps < 1:
        raise LoriteError(
            f"--tokens {config.tokens} is less than one optimizer step ({tokens_per_step} tokens)"
        )
    warmup_steps = round(config.warmup * total_steps)

    # model, optimizer, schedule, sampler
    if model is None:
        model = build_llama(config.size, vocab_size=train_blocks.vocab_size, seed=config.seed)
    if model.get_input_embeddings().num_embeddings < train_blocks.vocab_size:
        raise LoriteError(f"the model's vocabulary is smaller than the data's ({train_blocks.vocab_size})")
    model.to(device).train()
    raw_model = model
    model = distributed.wrap(model, "ddp", world)
    try:
        optimizer = create(config.optimizer, raw_model, lr=config.lr, **config.optimizer_kwargs)
    except (TypeError, ValueError) as error:
        raise LoriteError(f"optimizer {config.optimizer!r}: {error}") from error
    scheduler = lr_scheduler(optimizer, total_steps, warmup_steps, config.schedule, config.min_lr_ratio)
    sampler = make_sampler(
        config.sampler,
        n_blocks=len(train_blocks),
        batch_size=config.batch_size,
        total_steps=total_steps * config.grad_accum,
        seed=config.seed,
        rank=world.rank,
        world_size=world.size,
        **config.sampler_options,
    )

    metrics: dict[str, Any] = {
        "config": asdict(config),
        "data": str(data_path),
        "model_parameters": sum(p.numel() for p in raw_model.parameters()),
        "optimizer_groups": optimizer_settings(optimizer),
        "total_steps": total_steps,
        "tokens_per_step": tokens_per_step,
        "train_blocks": len(train_blocks),
        "validation": [],  # {step, tokens, loss, ppl, by_corpus}
        "train": [],  # {step, tokens, loss, lr}
    }
    start_step = 0
    if resume:
        extra: dict[str, Any] = {}
        state = load_checkpoint(
            out, raw_model, optimizer, scheduler, extra_state=extra, checkpoint=checkpoint
        )
        sampler.load_state_dict(extra["sampler"])
        start_step, metrics = state["step"], state["metrics"]
        metrics["config"] = asdict(config)
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(asdict(config), indent=1))

    # RUN/log.jsonl (rank 0); closed at the two returns below, and its lines are whole if neither is reached
    log = RunLog(out, start_step if resume else None, config.report_to, is_main)

    def write_metrics() -> None:
        if is_main:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))

    def checkpoint(step: int) -> None:
        if is_main:
            train_state = {"step": step, "metrics": metrics, "config": asdict(config)}
            sampler_state = {"sampler": sampler.state_dict()}
            save_checkpoint(
                out, raw_model, optimizer, scheduler, train_state, sampler_state, keep_last=config.keep_last,
                resumable=RESUMABLE_CHANGES,
            )  # fmt: skip

    def record_validation(step: int, max_blocks) -> dict:
        result = evaluate(raw_model, validation, weights, config, world, max_blocks)
        metrics["validation"].append({"step": step, "tokens": step * tokens_per_step, **result})
        log.evaluation(step, "validation", metrics["validation"][-1])
        write_metrics()
        return result

    if config.eval_every and start_step == 0:
        record_validation(0, config.eval_blocks)

    # train
    bar = None
    if config.progress and is_main:
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

        bar = tqdm(
            total=total_steps, initial=start_step, desc=f"{config.size} {config.optimizer}", unit="step"
        )
    began, train_seconds, timed_steps = time.perf_counter(), 0.0, 0
    interval_start, interval_steps = time.perf_counter(), 0
    stopped = None
    step = start_step
    for step in range(start_step, total_steps):
        step_began = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            ids = sampler.next_indices()
            blocks = train_blocks[ids].to(device, non_blocking=True)
            syncing = not world.active or micro == config.grad_accum - 1
            with nullcontext() if syncing else model.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    per_block = block_losses(model, blocks)
                (per_block.mean() / config.grad_accum).backward()
            sampler.observe(ids, per_block.detach().cpu())
            loss_sum += per_block.detach().mean() / config.grad_accum
        norm = gradient_norm(raw_model.parameters(), config.grad_clip)  # before clipping (if grad_clip > 0)
        lrs = [group["lr"] for group in optimizer.param_groups]  # what this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        interval_steps += 1
        if world.active:
            dist.all_reduce(loss_sum)
            loss_sum /= world.size
        loss, norm = float(loss_sum), float(norm)  # (synchronises the device: the step's timing is complete)
        log.step(done, loss, lrs, norm, tokens_per_step, time.perf_counter() - step_began)

        if done % config.log_every == 0 or done == total_steps:
            seconds = time.perf_counter() - interval_start
            if done > start_step + interval_steps:  # the first interval includes warm-up costs: skip it
                train_seconds, timed_steps = train_seconds + seconds, timed_steps + interval_steps
            interval_start, interval_steps = time.perf_counter(), 0
            lr = scheduler.get_last_lr()[0]
            metrics["train"].append({"step": done, "tokens": done * tokens_per_step, "loss": loss, "lr": lr})
            if not math.isfinite(loss):
                metrics["diverged_at"] = done
                stopped = "diverged"
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.update(1)
        if stopped:
            break
        if config.eval_every and done % config.eval_every == 0 and done < total_steps:
            evaluate_began = time.perf_counter()
            result = record_validation(done, config.eval_blocks)
            interval_start += time.perf_counter() - evaluate_began  # evaluation is not training time
            if bar is not None:
                bar.set_postfix(val_ppl=f"{result['ppl']:.2f}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total_steps:
            checkpoint(done)
        if stop_after is not None and done >= stop_after and done < total_steps:
            checkpoint(done)
            write_metrics()
            if bar is not None:
                bar.close()
            log.close()
            return {**metrics, "stopped_at": done}
        if (
            config.time_limit is not None
            and done < total_steps
            and all_ranks_agree(time.perf_counter() - began > config.time_limit, world)
        ):
            stopped = "time_limit"
            checkpoint(done)
            break
    if bar is not None:
        bar.close()

    # final evaluation on every held-out block, timings, memory; save the model
    done = step + 1 if total_steps > start_step else start_step
    if stopped:
        metrics["stopped"] = {"reason": stopped, "step": done, "tokens": done * tokens_per_step}
    metrics["final"] = {"step": done, "tokens": done * tokens_per_step}
    if stopped != "diverged":
        metrics["final"].update(evaluate(raw_model, validation, weights, config, world, None))
        metrics["validation"].append({"step": done, "tokens": done * tokens_per_step, **metrics["final"]})
        log.evaluation(done, "validation", metrics["validation"][-1])
    log.close()
    if timed_steps:
        metrics["seconds_per_step"] = train_seconds / timed_steps
        metrics["tokens_per_second"] = timed_steps * tokens_per_step / train_seconds
    metrics["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    if device.type == "cuda":
        metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if is_main:
        with atomic_directory(out / "model") as tmp:
            raw_model.save_pretrained(tmp)
    write_metrics()
    return metrics
