"""Training checkpoints that resume exactly: adapter weights (safetensors), optimizer and scheduler state,
every RNG state, the step and the data position — written to a temporary directory and renamed into
place, so a crash mid-write leaves the previous checkpoint intact.

``RUN/checkpoint/`` is always the newest. With ``keep_last=N`` ≥ 2 the checkpoint it replaces is first
renamed (one rename) to ``RUN/checkpoint-<its step>/``, and once the new one is in place the oldest of
those beyond the newest N - 1 are removed; with N = 1 (the default) only ``RUN/checkpoint/`` exists. Each
kept checkpoint is complete: put one at ``RUN/checkpoint/`` to resume from it (a crash between the two
renames leaves no ``checkpoint/``, and the previous checkpoint whole as ``checkpoint-<step>/``).

Under ``torchrun`` / ``accelerate launch`` (a ``world`` with more than one rank) the trainable weights and
the optimizer state go through ``torch.distributed.checkpoint`` instead (``dcp/``: each rank writes its
shards — FSDP2's DTensor factors and moments — and replicated DDP state is written once). Rank 0 writes
the scheduler, the step and every rank's RNG state, then renames the directory into place; every rank
reads back its own part. Such a checkpoint resumes under the same engine and number of ranks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..cache import remove_tree, replace_directory, temporary_sibling
from ..errors import LoriteError
from ..runtime import CHECKPOINT_DIR, World, rng_state, set_rng_state


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` by name (the LoRA factors, DoRA magnitudes, saved modules…)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


_KEPT = re.compile(re.escape(CHECKPOINT_DIR) + r"-(\d+)")  # checkpoint-<step>


def kept_checkpoints(run_dir: Path) -> list[Path]:
    """The older checkpoints that ``keep_last`` keeps (``run_dir/checkpoint-<step>``), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _KEPT.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def _saved_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "train_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _place(tmp: Path, target: Path, keep_last: int) -> None:
    """Put the finished checkpoint ``tmp`` at ``target``; with ``keep_last`` ≥ 2 the one it replaces becomes
    ``checkpoint-<its step>`` (one rename) and the kept ones beyond ``keep_last - 1`` are removed after."""
    step = _saved_step(target) if keep_last > 1 and target.exists() else None
    if step is None or step == _saved_step(tmp):  # nothing to keep (or the same step written again)
        replace_directory(tmp, target)
    else:
        kept = target.with_name(f"{target.name}-{step}")
        if kept.exists():  # a step written again after a resume: the newer write wins
            remove_tree(kept)
        os.replace(target, kept)
        os.replace(tmp, target)
    older = kept_checkpoints(target.parent)
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        remove_tree(path)


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    train_state: dict[str, Any],
    extra_state: dict | None = None,
    world: World | None = None,
    keep_last: int = 1,
) -> Path:
    """Write ``run_dir/checkpoint`` atomically and return it, keeping the ``keep_last - 1`` before it as
    ``run_dir/checkpoint-<step>`` (see the module docstring). ``extra_state`` (tensors and plain Python,
    e.g. a data sampler's ``state_dict()``) is saved next to the optimizer's. With an active ``world``
    (:class:`lorite.runtime.World`) every rank must call it (see the module docstring)."""
    from safetensors.torch import save_file  # optional dependency (lorite[peft])

    if keep_last < 1:
        raise LoriteError(f"--keep-last must be >= 1, got {keep_last}")
    if world is not None and world.active:
        return _save_distributed(Path(run_dir), model, optimizer, scheduler, train_state, world, keep_last)
    target = Path(run_dir) / CHECKPOINT_DIR
    tmp = temporary_sibling(target)
    try:
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
        _place(tmp, target, keep_last)
    finally:
        if tmp.exists():
            remove_tree(tmp)
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
def _save_distributed(
    run_dir: Path, model, optimizer, scheduler, train_state: dict, world: World, keep_last: int
) -> Path:
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
            _place(tmp, target, keep_last)
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
