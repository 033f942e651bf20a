"""Training checkpoints that resume exactly: adapter weights (safetensors), optimizer and scheduler state,
every RNG state, the step and the data position — written to a temporary directory and renamed into
place, so a crash mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_directory
from ..errors import LoriteError

CHECKPOINT_DIR = "checkpoint"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model`` by name (the LoRA factors, DoRA magnitudes, saved modules…)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, train_state: dict[str, Any], extra_state: dict | None = None
) -> Path:
    """Write ``run_dir/checkpoint`` atomically and return it. ``extra_state`` (tensors and plain Python,
    e.g. a data sampler's ``state_dict()``) is saved next to the optimizer's."""
    from safetensors.torch import save_file

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
    run_dir: Path, model, optimizer, scheduler, extra_state: dict | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved ``train_state``. A dict passed as
    ``extra_state`` is filled with the saved extra state."""
    from safetensors.torch import load_file

    folder = Path(run_dir) / CHECKPOINT_DIR
    if not (folder / "train_state.json").exists():
        raise LoriteError(
            f"--resume {str(run_dir)!r}: no checkpoint there (expected {folder}/train_state.json)"
        )
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
