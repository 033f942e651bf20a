"""Data-parallel fine-tuning under ``torchrun`` / ``accelerate launch``: DDP or FSDP2.

The launcher sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`setup` reads them, starts the process
group (NCCL on GPUs, gloo on CPU) and gives each rank its device. The global batch is the same as on one
device — each micro-batch of ``batch_size`` examples is split across the ranks (``indices[rank::world]``)
— and the loss is normalised by the *global* number of labelled tokens, so that the averaged gradient
equals the one-device gradient of the whole micro-batch (a plain per-rank token mean would weight ranks
with fewer labelled tokens more). Every rank evaluates the same examples (FSDP2's gathers are collectives,
so ranks must run the same forwards); rank 0 writes the outputs.

* ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel`. Every lorite optimizer works unchanged.
* ``fsdp2``: :func:`torch.distributed.fsdp.fully_shard` on each decoder layer, then on the whole model.
  LoRA factors become DTensors sharded on dim 0; the pair optimizers gather, compute and keep their shard
  (:meth:`lorite.optim._base.PairOptimizer._step_pairs_gathered`).
* FSDP1 and DeepSpeed ZeRO flatten parameters and are refused by the pair optimizers with an error that
  names the supported engines.

``accelerate launch`` is read from the environment it sets (:func:`resolve_engine`): ``--multi_gpu`` means
DDP, ``--use_fsdp --fsdp_version 2`` means FSDP2, so ``--parallel`` may be left out; ``--use_deepspeed``
and FSDP version 1 are refused before the model is loaded, naming what is supported. lorite wraps the
model itself (the same code path as under ``torchrun``); accelerate only starts the processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import LoriteError

ENGINES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    device: torch.device
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


SUPPORTED = (
    "supported: DDP (torchrun, or accelerate launch --multi_gpu, with --parallel ddp) and FSDP2 "
    "(torchrun --parallel fsdp2, or accelerate launch --use_fsdp --fsdp_version 2)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_engine(engine: str) -> str:
    """The engine to use: ``engine`` (``--parallel``) checked against what ``accelerate launch`` asked for.

    * DeepSpeed (``ACCELERATE_USE_DEEPSPEED``) or FSDP version 1 (``ACCELERATE_USE_FSDP`` with
      ``FSDP_VERSION`` ≠ 2): :class:`LoriteError` naming the supported engines — both flatten the LoRA
      factors into 1-D shards that no pair optimizer can use;
    * FSDP version 2: ``"fsdp2"`` (``--parallel`` may be left out; ``ddp`` contradicts it and is refused);
    * any other multi-process accelerate launch: ``"ddp"`` when ``--parallel`` was left out.

    Under ``torchrun`` (no accelerate variables) ``engine`` is returned unchanged.
    """
    if engine not in ENGINES:
        raise LoriteError(f"--parallel must be one of {', '.join(ENGINES)}, got {engine!r}")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise LoriteError(f"accelerate launch with DeepSpeed ZeRO is not supported; {SUPPORTED}")
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise LoriteError(f"accelerate launch with FSDP version {version} is not supported; {SUPPORTED}")
        if engine == "ddp":
            raise LoriteError(
                "accelerate launch --use_fsdp contradicts --parallel ddp: give --parallel fsdp2"
            )
        return "fsdp2"
    accelerate = any(name.startswith("ACCELERATE_") for name in os.environ)
    if accelerate and engine == "none" and launched_world_size() > 1:
        return "ddp"
    return engine


def setup(engine: str, device: torch.device) -> World:
    """Join the process group the launcher describes; one process (no launcher) is ``World()``."""
    if engine not in ENGINES:
        raise LoriteError(f"--parallel must be one of {', '.join(ENGINES)}, got {engine!r}")
    size = launched_world_size()
    if size == 1:
        return World(device=device)
    if engine == "none":
        raise LoriteError(
            f"launched with WORLD_SIZE={size}: give --parallel ddp or --parallel fsdp2 (or run one process)"
        )
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, device=device)


def wrap(model: torch.nn.Module, engine: str, world: World) -> torch.nn.Module:
    """The model under DDP or FSDP2 (unchanged for one process). Build the optimizer afterwards: it must see
    FSDP2's DTensor parameters."""
    if not world.active:
        return model
    if engine == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextmanager
def gathered(model: torch.nn.Module, world: World):
    """Inside: every FSDP2 unit is unsharded (whole parameters, plain tensors), so code that calls
    submodules directly or reads the state dict — evaluation, generation, saving — works as on one device.
    A 135M model fits whole on each rank; the shards come back on exit."""
    units = []
    if world.active:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield unwrap(model)
    finally:
        for unit in reversed(units):
            unit.reshard()


def full_state_dict(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """Under FSDP2: the whole model's state dict as plain CPU tensors (a collective; every rank calls it),
    for saving from rank 0. ``None`` otherwise (the module's own tensors are whole)."""
    from torch.distributed.fsdp import FSDPModule

    if not (world.active and isinstance(model, FSDPModule)):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's part of a micro-batch (the global micro-batch is the same on every rank count)."""
    if not world.active:
        return indices
    if len(indices) < world.size:
        raise LoriteError(f"--batch-size {len(indices)} is smaller than the number of processes {world.size}")
    return indices[world.rank :: world.size]


def distributed_lm_loss(model, batch: dict[str, torch.Tensor], world: World) -> torch.Tensor:
    """Next-token cross-entropy summed over this rank's labelled tokens, divided by the global count
    (times the world size, which the gradient averaging of DDP/FSDP2 divides out again)."""
    import torch.distributed as dist

    from .examples import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    log_probs = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    picked = log_probs.gather(1, targets[keep][:, None]).squeeze(1)
    count = torch.tensor([float(keep.sum())], device=picked.device)
    dist.all_reduce(count)
    return -picked.sum() * world.size / count.clamp(min=1.0)


def mean_over_ranks(value: float, world: World) -> float:
    """The global mean of a per-rank scalar (for logging the loss)."""
    if not world.active:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return float(tensor) / world.size
