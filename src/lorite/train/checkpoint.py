"""Training checkpoints that resume exactly: adapter weights (safetensors), optimizer and scheduler state,
every RNG state, the step and the data position — written to a temporary directory and renamed into
place, so a crash mid-write leaves the previous checkpoint intact.

Under ``torchrun`` / ``accelerate launch`` (a ``world`` with more than one rank) the trainable weights and
the optimizer state go through ``torch.distributed.checkpoint`` instead (``dcp/``: each rank writes its
shards — FSDP2's DTensor factors and moments — and replicated DDP state is written once). Rank 0 writes
the scheduler, the step and every rank's RNG state, then renames the directory into place; every rank
reads back its own part. Such a checkpoint resumes under the same engine and number of ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..cache import atomic_directory, remove_tree, replace_directory, temporary_sibling
from ..errors import LoriteError
from ..runtime import CHECKPOINT_DIR, World, rng_state, set_rng_state


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` by name (the LoRA factors, DoRA magnitudes, saved modules…)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    train_state: dict[str, Any],
    extra_state: dict | None = None,
    world: World | None = None,
) -> Path:
    """Write ``run_dir/checkpoint`` atomically and return it. ``extra_state`` (tensors and plain Python,
    e.g. a data sampler's ``state_dict()``) is saved next to the optimizer's. With an active ``world``
    (:class:`lorite.runtime.World`) every rank must call it (see the module docstring)."""
    from safetensors.torch import save_file  # optional dependency (lorite[peft])

    if world is not None and world.active:
        return _save_distributed(Path(run_dir), model, optimizer, scheduler, train_state, world)
    target = Path(run_dir) / CHECKPOINT_DIR
    with atomic_directory(target) as tmp:
        save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "extra": extra_state or {},
            },
            tmp / "training_state.pt",
        )
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
    return target


def load_checkpoint(
    run_dir: Path, model, optimizer, scheduler, extra_state: dict | None = None, world: World | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved ``train_state``. A dict passed as
    ``extra_state`` is filled with the saved extra state. The checkpoint must come from the same kind of
    launch (one process, or the same number of ranks)."""
    from safetensors.torch import load_file  # optional dependency (lorite[peft])

    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "train_state.json").exists():
        raise LoriteError(
            f"--resume {str(run_dir)!r}: no checkpoint there (expected {folder}/train_state.json)"
        )
    saved_world = json.loads((folder / "train_state.json").read_text()).get("world_size", 1)
    world_size = world.size if world is not None else 1
    if saved_world != world_size:
        raise LoriteError(
            f"--resume: the checkpoint was written by {saved_world} process(es), this launch has {world_size}; "
            "resume with the same number of processes"
        )
    if world is not None and world.active:
        return _load_distributed(folder, model, optimizer, scheduler, world)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise LoriteError(
            f"--resume: the checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})"
        )
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise LoriteError(f"--resume: the checkpoint has {name!r}, which this model does not")
            params[name].copy_(value)
    state = torch.load(folder / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if extra_state is not None:
        extra_state.update(state.get("extra", {}))
    return json.loads((folder / "train_state.json").read_text())


# ------------------------------------------------------------------ several ranks
def _save_distributed(run_dir: Path, model, optimizer, scheduler, train_state: dict, world: World) -> Path:
    target = run_dir / CHECKPOINT_DIR
    name = [None]
    if world.is_main:
        name = [str(temporary_sibling(target))]
    dist.broadcast_object_list(name, src=0)  # one temporary directory for every rank
    tmp = Path(name[0])
    rngs = [None] * world.size
    dist.all_gather_object(rngs, rng_state())
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "dcp"))
        if world.is_main:
            torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "training_state.pt")
            (tmp / "train_state.json").write_text(
                json.dumps({**train_state, "world_size": world.size}, indent=1)
            )
            replace_directory(tmp, target)
    finally:
        dist.barrier()  # nobody goes on (or reads the checkpoint) before rank 0 has renamed it
        if world.is_main and tmp.exists():
            remove_tree(tmp)
    return target


def _load_distributed(folder: Path, model, optimizer, scheduler, world: World) -> dict[str, Any]:
    if not (folder / "dcp").is_dir():
        raise LoriteError(f"--resume: {folder} was written by one process; resume it without a launcher")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / "dcp"))
    # dcp.load has already failed on any trainable tensor missing from the checkpoint; strict=False only
    # lets the frozen base weights (not saved) be absent
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(strict=False),
    )
    saved = torch.load(folder / "training_state.pt", weights_only=True, map_location="cpu")
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"][world.rank])
    return json.loads((folder / "train_state.json").read_text())


def _options(strict: bool = True) -> StateDictOptions:
    # the base model is not trained: not saved
    return StateDictOptions(ignore_frozen_params=True, strict=strict)
