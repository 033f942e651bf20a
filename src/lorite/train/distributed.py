"""Data-parallel fine-tuning under ``torchrun`` / ``accelerate launch``: DDP or FSDP2.

The process group and each rank's device come from :func:`lorite.runtime.setup` (which also maps
``accelerate launch`` flags to an engine); this module wraps the model and splits the work. The global batch is the same as on one
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

Under ``accelerate launch`` lorite wraps the model itself (the same code path as under ``torchrun``);
accelerate only starts the processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..errors import LoriteError
from ..runtime import World
from ..tasks.encoding import IGNORE


def wrap(model: torch.nn.Module, engine: str, world: World) -> torch.nn.Module:
    """The model under DDP or FSDP2 (unchanged for one process). Build the optimizer afterwards: it must see
    FSDP2's DTensor parameters."""
    if not world.active:
        return model
    if engine == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        # gradients as views of DDP's buckets: no second copy of every gradient
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
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
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if world.active else []
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
    if not (world.active and isinstance(model, FSDPModule)):
        return None
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
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    log_probs = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    picked = log_probs.gather(1, targets[keep][:, None]).squeeze(1)
    count = torch.tensor([float(keep.sum())], device=picked.device)
    dist.all_reduce(count)
    return -picked.sum() * world.size / count.clamp(min=1.0)
