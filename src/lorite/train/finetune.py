"""Fine-tuning of a causal LM on a task (a BIG-bench task, a task file, a text corpus: any spec of
:mod:`lorite.tasks`) — the loop reads top to bottom:

    config → model + method (LoRA, full, …) → data → optimizer + schedule → [resume] → train (checkpoints)
    → evaluate → save

Data order depends only on ``seed`` (not on the optimizer), so runs that differ only in their optimizer or
learning rate see the same batches in the same order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_write_text
from ..errors import LoriteError
from ..models import DTYPE_CHOICES, load_causal_lm
from ..optim import create, default_lr
from ..runtime import (
    ENGINES,
    World,
    check_output_dir,
    check_schedule,
    lr_scheduler,
    mean_over_ranks,
    pick_device,
    release_cached_gpu_memory,
    resolve_engine,
    seed_everything,
    setup,
)
from ..tasks import MixtureData, TaskData, evaluate_split, load_task_data, spec_members
from ..tasks.encoding import collate, lm_loss
from ..tasks.evaluation import CLASSIFICATION_SCORES
from ..tasks.mixture import (
    DEFAULT_MAX_EXAMPLES_PER_TASK,
    MixtureSampler,
    check_mixture_settings,
    mixture_probabilities,
)
from . import distributed
from .checkpoint import load_checkpoint, open_checkpoint, save_checkpoint
from .methods import get_method
from .run_log import RunLog, check_report_to, gradient_norm

SNAPSHOT_DIR = "snapshots"  # save_every: snapshots/step_000050/{adapter,model}
# settings that may change when a run is resumed (they do not change what is computed); any other
# difference from the checkpointed run's config is refused
RESUMABLE_CHANGES = (
    "keep_last",
    "report_to",
    "device",
    "checkpoint_every",
    "save_every",
    "skip_test",
    "gradient_checkpointing",
)


@dataclass
class FinetuneConfig:
    """Everything a run depends on (written into its ``metrics.json``)."""

    task: (
        str  # a task spec (lorite.tasks.spec): a BIG-bench name, "file:PATH/task.json", "corpus:shakespeare"
    )
    model: str | None = None  # default SmolLM2-135M-Instruct; a .gguf file, a model dir, a hub id owner/name
    optimizer: str = "lora_rite"
    lr: float | None = None  # None: the optimizer's own default (lorite.optim.default_lr)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank, scaling s = α/r = 1 (the LoRA-RITE authors' setting)
    dropout: float = 0.0  # the paper sets dropout 0 for every method
    init_scale: float = 1.0  # start from (A·s, B/s): the same B·A, another factorisation
    target_modules: str | list[str] = "all-linear"
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int | None = None  # None: 10% of steps
    schedule: str = "cosine"
    max_grad_norm: float = 0.0  # raw-gradient clipping; 0 = off (it breaks LoRA-RITE's invariance)
    seed: int = 0  # LoRA init, dropout and data order
    split_seed: int = 0  # the train/validation/test split (fixed across seeds)
    # a task mixture (A+B, natural_instructions/*; lorite.tasks.mixture): each member trains on at most
    # this many examples, drawn with p_i ∝ n_i^(1/T) (T = 1: proportional to the capped sizes; inf: uniform)
    max_examples_per_task: int = DEFAULT_MAX_EXAMPLES_PER_TASK
    mixture_temperature: float = 1.0
    n_validation: int = 200
    n_test: int = 400
    # what `score` is for a generation task whose answers form a small label set (Yes/No, categories):
    # rouge_l (as every other generation task) or exact_match (Super-NaturalInstructions' rule)
    classification_score: str = "rouge_l"
    # a task or mixture the run never trains on, scored after test on its test split (zero-shot transfer);
    # compare sets it from a config's heldout_tasks
    transfer_task: str | None = None
    max_length: int = 512
    eval_every: int = 0  # validation every N steps (0: only at the end)
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    keep_last: int = 1  # checkpoints kept: checkpoint/ and keep_last - 1 checkpoint-<step>/ (checkpoint.py)
    device: str = "auto"
    bf16: bool = True  # autocast to bf16 on CUDA
    dtype: str = "auto"  # the base weights: fp32, bf16, fp16 or auto (see base_dtype); LoRA factors stay fp32
    load_in_4bit: bool = False  # the base's linear layers in 4-bit NF4 (bitsandbytes, CUDA; --method lora)
    skip_test: bool = False  # compare evaluates test only at the chosen learning rates
    parallel: str = "none"  # under torchrun / accelerate launch: "ddp" or "fsdp2" (see lorite.runtime)
    gradient_checkpointing: bool = False  # recompute layer activations in backward (less memory, slower)
    save_every: int = (
        0  # also save the method's weights to snapshots/step_N every N steps (forgetting curves)
    )
    method_args: dict[str, Any] = field(default_factory=dict)  # the method's own options (--method-args)
    report_to: str = "none"  # also write the run log's scalars to: tensorboard (RUN/tensorboard/)

    def validate(self) -> None:
        if self.rank < 1:
            raise LoriteError(f"--rank must be >= 1, got {self.rank}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise LoriteError("--steps, --batch-size and --grad-accum must be >= 1")
        if self.save_every < 0:
            raise LoriteError(f"--save-every must be >= 0, got {self.save_every}")
        if self.keep_last < 1:
            raise LoriteError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.lr is not None and not (self.lr >= 0 and math.isfinite(self.lr)):
            raise LoriteError(f"--lr must be a non-negative number, got {self.lr}")
        check_schedule(self.schedule)
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise LoriteError(f"init_scale must be a positive number, got {self.init_scale}")
        get_method(self.method)
        check_report_to(self.report_to)
        check_mixture_settings(self.max_examples_per_task, self.mixture_temperature)
        if self.classification_score not in CLASSIFICATION_SCORES:
            raise LoriteError(
                f"--classification-score must be one of {', '.join(CLASSIFICATION_SCORES)}, "
                f"got {self.classification_score!r}"
            )
        if self.transfer_task is not None:
            trained = set(spec_members(self.task))
            overlap = [str(member) for member in spec_members(self.transfer_task) if member in trained]
            if overlap:
                raise LoriteError(f"--transfer-task {overlap[0]!r} is also trained on (--task)")
        if self.parallel not in ENGINES:
            raise LoriteError(f"--parallel must be one of {', '.join(ENGINES)}, got {self.parallel!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise LoriteError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.load_in_4bit and (self.method != "lora" or self.parallel == "fsdp2"):
            raise LoriteError(
                f"--load-in-4bit trains LoRA on a frozen 4-bit base (QLoRA): it needs --method lora and no "
                f"fsdp2, got --method {self.method} --parallel {self.parallel}"
            )


# ------------------------------------------------------------------------------------------- pieces
def batch_indices(
    n_items: int, batch_size: int, seed: int, step: int, micro: int, grad_accum: int
) -> list[int]:
    """The example indices of micro-batch ``micro`` of optimizer step ``step``: epochs are seeded
    permutations, so the data position is a pure function of (seed, step) and resumes exactly."""
    start = (step * grad_accum + micro) * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(indices), n_items - offset)
        indices.extend(order[offset : offset + take].tolist())
    return indices


def make_batch(data: TaskData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    if data.kind == "language_model":
        ids = data.train[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return collate([data.train[i] for i in indices], pad_id)


def data_for(config: FinetuneConfig, tokenizer, encode_train: bool = True) -> TaskData | MixtureData:
    """The task data of ``config`` (its task spec and split settings; a mixture's per-task cap)."""
    return load_task_data(
        config.task, tokenizer, split_seed=config.split_seed, n_validation=config.n_validation,
        n_test=config.n_test, max_length=config.max_length, encode_train=encode_train,
        max_examples_per_task=config.max_examples_per_task,
    )  # fmt: skip


def data_order(config: FinetuneConfig, data: TaskData | MixtureData):
    """``(step, micro) → example indices`` of the run: :func:`batch_indices` over the training examples,
    or a mixture's :class:`~lorite.tasks.MixtureSampler` (temperature sampling over its members); both a
    pure function of (seed, step, micro)."""
    if isinstance(data, MixtureData):
        sizes = data.train_sizes
        sampler = MixtureSampler(
            sizes, mixture_probabilities(sizes, config.mixture_temperature), config.seed,
            config.batch_size, config.grad_accum,
        )  # fmt: skip
        return sampler.indices
    n_train = data.n_train

    def order(step: int, micro: int) -> list[int]:
        return batch_indices(n_train, config.batch_size, config.seed, step, micro, config.grad_accum)

    return order


def base_dtype(config: FinetuneConfig, device: torch.device) -> str:
    """The dtype the base weights load in: ``config.dtype``, with ``"auto"`` made concrete — bf16 for
    ``--method lora`` on CUDA with bf16 autocast on (the frozen base is only read; the fp32 LoRA factors
    train), fp32 otherwise: ``full``, ``loldu`` and ``lq_lora`` train or decompose the base weights, which
    stay fp32 master weights unless ``--dtype`` asks for less."""
    if config.dtype != "auto":
        return config.dtype
    return "bf16" if config.method == "lora" and config.bf16 and device.type == "cuda" else "fp32"


def evaluate(model, tokenizer, data: TaskData, split: str, config: FinetuneConfig, progress: bool) -> dict:
    """:func:`lorite.tasks.evaluate_split` at ``config.eval_batch_size``; then the blocks evaluation cached
    (generation's many shapes) go back to the device (:func:`~lorite.runtime.release_cached_gpu_memory`),
    so that a run does not keep its evaluation peak reserved while it trains beside others."""
    metrics = evaluate_split(
        model, tokenizer, data, split, config.eval_batch_size, progress=progress,
        classification_score=config.classification_score,
    )  # fmt: skip
    release_cached_gpu_memory()
    return metrics


def evaluate_model(config: FinetuneConfig, adapter: str | Path | None = None, progress: bool = False) -> dict:
    """Validation and test metrics of the base model (zero-shot), or of the model with ``adapter`` (a peft
    LoRA adapter folder, e.g. a run's ``adapter/``). The task, its splits and the evaluation settings
    (``n_validation``, ``n_test``, ``split_seed``, ``max_length``, ``eval_batch_size``, ``device``) come from
    ``config``; a run evaluated with its own config gives its ``metrics.json`` numbers again."""
    device = pick_device(config.device)
    model, tokenizer = load_causal_lm(
        config.model, base_dtype(config, device), device, load_in_4bit=config.load_in_4bit
    )
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise LoriteError(f"{str(adapter)!r} holds no peft adapter (no adapter_config.json)")
        from peft import PeftModel  # optional dependency (lorite[peft])

        model = PeftModel.from_pretrained(model, str(adapter))  # fp32 factors on a bf16/fp16 base, as trained
    model.to(device)
    data = data_for(config, tokenizer, encode_train=False)
    return {
        split: evaluate(model, tokenizer, data, split, config, progress) for split in ("validation", "test")
    }


def evaluate_on_all_ranks(model, tokenizer, data, split, config, progress, world: World) -> dict:
    """:func:`evaluate` on the whole model; under torchrun every rank evaluates the same examples."""
    with distributed.gathered(model, world) as whole:
        return evaluate(whole, tokenizer, data, split, config, progress and world.is_main)


def _scalars(metrics: dict) -> dict:
    """The numbers of an evaluation, for the validation curve (the answers and their shares stay in the
    final evaluation only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


# ------------------------------------------------------------------------------------------- the run
def finetune(
    config: FinetuneConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train, evaluate and (with ``out``) save ``adapter/``, ``metrics.json``, checkpoints and ``log.jsonl``
    (a line per step and per evaluation, written as the run goes: :mod:`lorite.train.run_log`).

    ``stop_after`` ends the session after that many steps (the last checkpoint stays for ``resume``), as
    an interrupted job would; the run's schedule still spans ``config.steps``.
    """
    config.validate()
    if config.lr is None:  # the optimizer's own default rate, recorded in metrics.json
        config = replace(config, lr=default_lr(config.optimizer))
    run_began = time.perf_counter()
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_dir(out, resume)
    config = replace(config, parallel=resolve_engine(config.parallel))  # accelerate launch
    world = setup(config.parallel, pick_device(config.device))
    device = world.device
    if world.active and config.parallel == "fsdp2" and config.method != "lora":
        raise LoriteError(f"--parallel fsdp2 supports --method lora only, got {config.method!r} (use ddp)")
    checkpoint = None
    if resume:  # checked, and its config compared, before anything is loaded or written
        if out is None:
            raise LoriteError("resuming needs the run's output directory")
        checkpoint = open_checkpoint(out, world, asdict(config), RESUMABLE_CHANGES)
    seed_everything(config.seed)

    model, tokenizer = load_causal_lm(  # on the CPU unless 4-bit: methods prepare it there (lq_lora moves it)
        config.model, base_dtype(config, device), device if config.load_in_4bit else None, config.load_in_4bit
    )
    method = get_method(config.method)
    model = method.prepare(model, config).to(device)
    if config.gradient_checkpointing:  # non-reentrant: works with a frozen base (LoRA) as well
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = distributed.wrap(model, config.parallel, world)  # before the optimizer: it must see DTensors
    data = data_for(config, tokenizer)
    try:
        optimizer = create(
            config.optimizer, distributed.unwrap(model), lr=config.lr, **config.optimizer_kwargs
        )
    except (TypeError, ValueError) as error:  # unknown or invalid --optimizer-args
        raise LoriteError(f"optimizer {config.optimizer!r}: {error}") from error
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 10)
    scheduler = lr_scheduler(optimizer, config.steps, warmup, config.schedule)

    history: dict[str, list] = {"loss": [], "validation": []}
    start_step = 0
    if resume:
        saved = load_checkpoint(out, model, optimizer, scheduler, world=world, checkpoint=checkpoint)
        start_step, history = saved["step"], saved["history"]

    evaluating = 0.0  # seconds spent in evaluation (reported next to the step time: GPU planning)

    def evaluate_split(split: str, show: bool) -> dict:
        nonlocal evaluating
        began = time.perf_counter()
        scores = evaluate_on_all_ranks(model, tokenizer, data, split, config, show, world)
        evaluating += time.perf_counter() - began
        return scores

    use_bf16 = config.bf16 and device.type == "cuda"
    order = data_order(config, data)
    step_times = []
    # RUN/log.jsonl (rank 0); closed at the two returns below, and its lines are whole if neither is reached
    log = RunLog(out, start_step if resume else None, config.report_to, world.is_main)
    bar = range(start_step, config.steps)
    if progress:
        from tqdm.auto import tqdm  # optional dependency (lorite[all])

        bar = tqdm(bar, desc=f"{config.optimizer} lr={config.lr:g}", initial=start_step, total=config.steps)
    for step in bar:
        model.train()
        began = time.perf_counter()
        total = 0.0
        tokens = 0  # non-pad tokens of this rank's micro-batches
        for micro in range(config.grad_accum):
            indices = order(step, micro)
            indices = distributed.shard(indices, world)  # the global micro-batch, split across ranks
            batch = make_batch(data, indices, tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if world.active:
                    loss = distributed.distributed_lm_loss(model, batch, world) / config.grad_accum
                else:
                    loss = lm_loss(model, batch) / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        total = mean_over_ranks(total, world)
        tokens = round(mean_over_ranks(tokens, world) * world.size)
        # the pre-clip norm (clipped when max_grad_norm > 0); every rank joins (a collective under FSDP2)
        norm = gradient_norm((p for p in model.parameters() if p.requires_grad), config.max_grad_norm)
        lrs = [group["lr"] for group in optimizer.param_groups]  # what this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        norm = float(norm)  # (synchronises the device: the step's time is complete)
        step_times.append(time.perf_counter() - began)
        log.step(step + 1, total, lrs, norm, tokens, step_times[-1])
        history["loss"].append(total)
        if progress:
            bar.set_postfix(loss=f"{total:.4f}")
        if not math.isfinite(total):
            history["diverged_at"] = step + 1
            break
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            history["validation"].append(
                {
                    "step": done,
                    **_scalars(evaluate_split("validation", False)),
                }
            )
            log.evaluation(done, "validation", history["validation"][-1])
        if out is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
            save_trained(model, method, world, out / SNAPSHOT_DIR / f"step_{done:06d}")
        if out is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            train_state = {"step": done, "history": history, "config": asdict(config)}
            save_checkpoint(
                out, model, optimizer, scheduler, train_state, world=world, keep_last=config.keep_last,
                resumable=RESUMABLE_CHANGES,
            )  # fmt: skip
        if stop_after is not None and done >= stop_after:
            log.close()
            return {"config": asdict(config), "history": history, "stopped_at": done}

    diverged = "diverged_at" in history
    results: dict[str, Any] = {"config": asdict(config), "history": history, "diverged": diverged}
    results["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results["base_dtype"] = "nf4" if config.load_in_4bit else base_dtype(config, device)
    timed = step_times[min(5, len(step_times) // 2) :] or step_times
    results["seconds_per_step"] = sorted(timed)[len(timed) // 2] if timed else None
    if diverged:
        results["validation"] = {"score": -math.inf}
    else:
        results["validation"] = evaluate_split("validation", progress)
        history["validation"].append({"step": config.steps, **_scalars(results["validation"])})
        log.evaluation(config.steps, "validation", results["validation"])
        if not config.skip_test:
            results["test"] = evaluate_split("test", progress)
            log.evaluation(config.steps, "test", results["test"])
            if config.transfer_task is not None:  # tasks never trained on: their test split, zero-shot
                began = time.perf_counter()
                transfer = data_for(replace(config, task=config.transfer_task), tokenizer, encode_train=False)
                results["transfer"] = evaluate_on_all_ranks(
                    model, tokenizer, transfer, "test", config, progress, world
                )
                evaluating += time.perf_counter() - began
                log.evaluation(config.steps, "transfer", results["transfer"])
    log.close()
    results["world_size"] = world.size
    results["seconds_evaluating"] = evaluating
    results["seconds_total"] = time.perf_counter() - run_began  # this session's, from loading to evaluation
    if out is not None:
        save_trained(model, method, world, out)
        if world.is_main:
            atomic_write_text(out / "metrics.json", json.dumps(results, indent=1, default=str))
    return results


def save_trained(model, method, world: World, folder: Path) -> None:
    """The method's weights (adapter, or the whole model) into ``folder``, from rank 0. Under FSDP2 every
    rank must call it: the full state dict is gathered first (a collective)."""
    full = distributed.full_state_dict(model, world)
    if world.is_main:
        if full is None:
            method.save(distributed.unwrap(model), folder)
        else:
            method.save(model, folder, state_dict=full)
