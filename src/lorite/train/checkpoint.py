"""Training checkpoints that resume exactly: adapter weights (safetensors), optimizer and scheduler state,
every RNG state, the step and the data position — written to a temporary directory and renamed into
place, so a crash mid-write leaves the previous checkpoint intact.

``RUN/checkpoint/`` is always the newest. With ``keep_last=N`` ≥ 2 the checkpoint it replaces is first
renamed (one rename) to ``RUN/checkpoint-<its step>/``, and once the new one is in place the oldest of
those beyond the newest N - 1 are removed; with N = 1 (the default) only ``RUN/checkpoint/`` exists. Each
kept checkpoint is complete: put one at ``RUN/checkpoint/`` to resume from it (a crash between the two
renames leaves no ``checkpoint/``, and the previous checkpoint whole as ``checkpoint-<step>/``).

Every checkpoint ends with ``manifest.json``, written last inside the temporary directory (so before the
rename): each file's size and sha256, the lorite and torch versions, the format version and a hash of the
run's config (:func:`config_hash`). Resuming (:func:`open_checkpoint`) first checks the checkpoint against
it — every file present, of its size and sha256, none added; the JSON parses, ``torch.load(weights_only=
True)`` and the safetensors read — and a checkpoint that fails is a :class:`~lorite.errors.DamagedArtifact`
naming the file (the CLI's exit code 1). When ``RUN/checkpoint`` is damaged and older ones are kept, the
newest intact one is resumed instead and a line on stderr says so; nothing in ``RUN`` is changed by the
check, and a resume that fails changes nothing. A checkpoint written before manifests existed is checked
for what can be (its files parse). Resuming with another config than the checkpointed run's (except the
keys that may change on resume, e.g. :data:`lorite.train.pretrain.RESUMABLE_CHANGES`) is refused, naming
the keys that differ.

Under ``torchrun`` / ``accelerate launch`` (a ``world`` with more than one rank) the trainable weights and
the optimizer state go through ``torch.distributed.checkpoint`` instead (``dcp/``: each rank writes its
shards — FSDP2's DTensor factors and moments — and replicated DDP state is written once). Rank 0 writes
the scheduler, the step, every rank's RNG state and the manifest (over every rank's shards), then renames
the directory into place; rank 0 checks a checkpoint before resuming it and every rank reads back its own
part. Such a checkpoint resumes under the same engine and number of ranks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import __version__
from ..cache import remove_tree, replace_directory, temporary_sibling
from ..errors import DamagedArtifact, LoriteError
from ..runtime import CHECKPOINT_DIR, World, rng_state, set_rng_state

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of the checkpoint layout and its manifest; a newer one is refused
WEIGHTS = "trainable.safetensors"
TRAINING_STATE = "training_state.pt"
TRAIN_STATE = "train_state.json"
DCP_DIR = "dcp"


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
        return int(json.loads((folder / TRAIN_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------ the manifest
def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, paths strings): what a checkpoint stores."""
    return json.loads(json.dumps(value, default=str))


def config_hash(config: dict[str, Any], ignore: Iterable[str] = ()) -> str:
    """The sha256 of the canonical JSON (sorted keys, no spaces) of ``config`` without the keys ``ignore``
    (those that may change when a run is resumed)."""
    ignore = set(ignore)
    kept = {k: v for k, v in config.items() if k not in ignore}
    text = json.dumps(_plain(kept), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as posix paths relative to it, sorted."""
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def _write_manifest(folder: Path, config: dict | None, resumable: Iterable[str]) -> None:
    ignore = sorted(set(resumable))
    manifest = {
        "format": "lorite-checkpoint",
        "format_version": FORMAT_VERSION,
        "lorite_version": __version__,
        "torch_version": torch.__version__,
        "config_hash": config_hash(config, ignore) if config is not None else None,
        "config_hash_ignores": ignore,
        "files": {
            name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in _files(folder)
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ------------------------------------------------------------------ checking a checkpoint
def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Checkpoint:
    """A checkpoint that passed :func:`open_checkpoint`'s checks: its folder and what it holds (``state``
    is ``training_state.pt``; ``weights`` the trainable tensors of a one-process checkpoint)."""

    folder: Path
    train_state: dict[str, Any]
    state: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    manifest: dict[str, Any] | None = None


class _Damaged(Exception):
    """What is wrong with one checkpoint folder (one clause, naming the file)."""


def _check_against_manifest(folder: Path) -> dict | None:
    """The manifest, once every file matches it (None: a checkpoint written before manifests)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        version = int(manifest.get("format_version", 0))
        entries = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in listed.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise _Damaged(f"{MANIFEST} is not a readable manifest ({_short(error)})") from error
    if version > FORMAT_VERSION:
        raise LoriteError(
            f"checkpoint {folder} has format version {version} (lorite {manifest.get('lorite_version')}); this "
            f"lorite {__version__} reads up to {FORMAT_VERSION}: resume it with a newer lorite"
        )
    present = set(_files(folder))
    for name, (size, _) in sorted(entries.items()):
        if name not in present:
            raise _Damaged(f"{name} is missing (the manifest lists it)")
        if (actual := (folder / name).stat().st_size) != size:
            raise _Damaged(f"{name} has {actual} bytes, the manifest says {size}")
    if extra := sorted(present - set(entries)):
        raise _Damaged(f"{extra[0]} is not in the manifest (a file added, or the manifest changed)")
    for name, (_, digest) in sorted(entries.items()):
        if _sha256(folder / name) != digest:
            raise _Damaged(f"{name} does not match its sha256 in the manifest (its bytes changed)")
    return manifest


def _inspect(folder: Path, read_weights: bool) -> Checkpoint:
    """Check ``folder`` (manifest, then that each file parses) and read it; :class:`_Damaged` if not."""
    if not folder.is_dir():
        raise _Damaged("the folder is missing")
    manifest = _check_against_manifest(folder)
    if not (folder / TRAIN_STATE).is_file():
        raise _Damaged(f"{TRAIN_STATE} is missing")
    try:
        train_state = json.loads((folder / TRAIN_STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _Damaged(f"{TRAIN_STATE} is not valid JSON ({_short(error)})") from error
    if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
        raise _Damaged(f"{TRAIN_STATE} holds no step")
    distributed_layout = train_state.get("world_size", 1) != 1
    needed = [TRAINING_STATE, f"{DCP_DIR}/.metadata" if distributed_layout else WEIGHTS]
    for name in needed:
        if not (folder / name).is_file():
            raise _Damaged(f"{name} is missing")
    try:
        state = torch.load(folder / TRAINING_STATE, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated zip, a pickle of something else, …: all one answer
        raise _Damaged(f"{TRAINING_STATE} cannot be read ({_short(error)})") from error
    if not isinstance(state, dict) or "scheduler" not in state or "rng" not in state:
        raise _Damaged(f"{TRAINING_STATE} lacks the scheduler or RNG state")
    weights = None
    if not distributed_layout and read_weights:
        from safetensors.torch import load_file  # optional dependency (lorite[peft])

        try:
            weights = load_file(str(folder / WEIGHTS))
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise _Damaged(f"{WEIGHTS} cannot be read ({_short(error)})") from error
    return Checkpoint(folder, train_state, state, weights, manifest)


def _choose(run_dir: Path, read_weights: bool) -> tuple[Checkpoint, list[str]]:
    """The newest intact checkpoint of ``run_dir`` and, when it is not ``checkpoint/``, a clause for each
    damaged one newer than it; :class:`DamagedArtifact` when none is intact."""
    newest = run_dir / CHECKPOINT_DIR
    candidates = [newest, *reversed(kept_checkpoints(run_dir))]
    damaged: list[str] = []
    for folder in candidates:
        try:
            return _inspect(folder, read_weights), damaged
        except _Damaged as problem:
            damaged.append(f"{folder.name}: {problem}" if damaged else str(problem))
    if len(candidates) == 1:
        advice = (
            "no older checkpoint is kept to fall back on (--keep-last 2 or more keeps some): put an intact copy "
            f"at {newest} and resume again with --resume {run_dir}, or start again with a new --out"
        )
    else:
        advice = (
            f"the older ones kept are damaged too ({'; '.join(damaged[1:])}): start again with a new --out"
        )
    raise DamagedArtifact(f"checkpoint {newest} is damaged: {damaged[0]}; {advice}")


def _check_config(checkpoint: Checkpoint, config: dict[str, Any], resumable: Iterable[str]) -> None:
    """Refuse to resume ``checkpoint`` with a ``config`` other than its run's (keys ``resumable`` aside)."""
    manifest = checkpoint.manifest or {}
    if (
        manifest.get("config_hash")
        and config_hash(config, manifest.get("config_hash_ignores", [])) == (manifest["config_hash"])
    ):
        return
    saved = checkpoint.train_state.get("config")
    if not isinstance(saved, dict):
        return  # a checkpoint of no config (written by a caller of save_checkpoint that gives none)
    ignore = set(resumable) | set(manifest.get("config_hash_ignores", []))
    now = _plain(config)
    changed = sorted(k for k in now if k not in ignore and k in saved and saved[k] != now[k])
    if changed:
        what = ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed)
        raise LoriteError(
            f"--resume: the settings {changed} differ from the checkpointed run's ({what}); resume with the "
            "run's own settings, or start a new run with a new --out"
        )


def saved_train_state(run_dir: str | Path) -> dict[str, Any]:
    """The ``train_state`` (step, config, …) of the checkpoint a resume of ``run_dir`` continues: checked
    as :func:`open_checkpoint` checks it (an older kept one when the newest is damaged, silently), from any
    process of any launch; :class:`DamagedArtifact` when none is intact."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_DIR).exists() and not kept_checkpoints(run_dir):
        raise LoriteError(
            f"--resume {str(run_dir)!r}: no checkpoint there (expected {run_dir / CHECKPOINT_DIR}/{TRAIN_STATE})"
        )
    return _choose(run_dir, read_weights=False)[0].train_state


def open_checkpoint(
    run_dir: str | Path,
    world: World | None = None,
    config: dict[str, Any] | None = None,
    resumable: Iterable[str] = (),
    announce: bool = True,
) -> Checkpoint:
    """Check and read the checkpoint to resume ``run_dir`` from: ``checkpoint/``, or — when it is damaged —
    the newest intact ``checkpoint-<step>`` (saying so on stderr when ``announce``). Nothing on disk is
    changed. Raises :class:`DamagedArtifact` when no checkpoint is intact, :class:`LoriteError` when the
    checkpoint was written by another number of processes or (``config`` given) for another config than
    ``config`` (the keys ``resumable`` may differ). With an active ``world`` every rank must call it: rank
    0 checks, every rank reads its own ``training_state.pt``."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_DIR).exists() and not kept_checkpoints(run_dir):
        raise LoriteError(
            f"--resume {str(run_dir)!r}: no checkpoint there (expected {run_dir / CHECKPOINT_DIR}/{TRAIN_STATE})"
        )
    active = world is not None and world.active
    if not active:
        checkpoint, damaged = _choose(run_dir, read_weights=True)
    else:  # rank 0 checks (one read of every shard), the others follow its answer
        answer: list[Any] = [None]
        if world.is_main:
            try:
                checkpoint, damaged = _choose(run_dir, read_weights=False)
                answer = [
                    ("ok", checkpoint.folder.name, checkpoint.train_state, checkpoint.manifest, damaged)
                ]
            except LoriteError as error:
                answer = [("damaged" if isinstance(error, DamagedArtifact) else "error", str(error))]
        dist.broadcast_object_list(answer, src=0)
        kind, *rest = answer[0]
        if kind != "ok":
            raise (DamagedArtifact if kind == "damaged" else LoriteError)(rest[0])
        name, train_state, manifest, damaged = rest
        if not world.is_main:
            folder = run_dir / name
            state = torch.load(folder / TRAINING_STATE, weights_only=True, map_location="cpu")
            checkpoint = Checkpoint(folder, train_state, state, None, manifest)
    saved_world = checkpoint.train_state.get("world_size", 1)
    world_size = world.size if world is not None else 1
    if saved_world != world_size:
        raise LoriteError(
            f"--resume: the checkpoint was written by {saved_world} process(es), this launch has {world_size}; "
            "resume with the same number of processes"
        )
    if config is not None:
        _check_config(checkpoint, config, resumable)
    if damaged and announce and (world is None or world.is_main):
        print(
            f"checkpoint {run_dir / CHECKPOINT_DIR} is damaged ({'; '.join(damaged)}); resuming from "
            f"{checkpoint.folder.name} instead",
            file=sys.stderr,
            flush=True,
        )
    return checkpoint


# ------------------------------------------------------------------ writing and reading
def _intact(folder: Path) -> bool:
    """Whether the checkpoint ``folder`` (about to be kept as ``checkpoint-<step>``) matches its manifest
    (one written before manifests: whether its train_state.json parses, which its step told already)."""
    try:
        _check_against_manifest(folder)
    except (_Damaged, LoriteError, OSError):
        return False
    return True


def _place(tmp: Path, target: Path, keep_last: int) -> None:
    """Put the finished checkpoint ``tmp`` at ``target``; with ``keep_last`` ≥ 2 the one it replaces becomes
    ``checkpoint-<its step>`` (one rename) and the kept ones beyond ``keep_last - 1`` are removed after.

    What a resume from an older checkpoint left behind is not kept: a replaced checkpoint that is damaged
    (its files disagree with its manifest: it is read and hashed once more, so with ``keep_last`` ≥ 2 a
    save reads the checkpoint before it) or of a step at or after the new one's, and kept ones of such
    steps (the steps are written again)."""
    new_step = _saved_step(tmp)
    step = _saved_step(target) if keep_last > 1 and target.exists() else None
    if step is None or (new_step is not None and step >= new_step) or not _intact(target):
        replace_directory(tmp, target)
    else:
        kept = target.with_name(f"{target.name}-{step}")
        if kept.exists():  # a step written again after a resume: the newer write wins
            remove_tree(kept)
        os.replace(target, kept)
        os.replace(tmp, target)
    older = kept_checkpoints(target.parent)
    if new_step is not None:
        stale = [p for p in older if int(_KEPT.fullmatch(p.name).group(1)) >= new_step]
        for path in stale:
            remove_tree(path)
        older = [p for p in older if p not in stale]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        remove_tree(path)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what a killed checkpoint write left behind (``.checkpoint.tmp-*``, ``.checkpoint.old-*``). The
    run lock (:func:`lorite.runtime.run_lock`) makes this process the only writer of ``run_dir``, so any
    such directory that exists before a new write belongs to a session that died."""
    for pattern in (f".{CHECKPOINT_DIR}.tmp-*", f".{CHECKPOINT_DIR}.old-*"):
        for stale in Path(run_dir).glob(pattern):
            remove_tree(stale)


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    train_state: dict[str, Any],
    extra_state: dict | None = None,
    world: World | None = None,
    keep_last: int = 1,
    resumable: Iterable[str] = (),
) -> Path:
    """Write ``run_dir/checkpoint`` atomically and return it, keeping the ``keep_last - 1`` before it as
    ``run_dir/checkpoint-<step>`` (see the module docstring). ``extra_state`` (tensors and plain Python,
    e.g. a data sampler's ``state_dict()``) is saved next to the optimizer's. ``train_state["config"]``
    (when given) is hashed into the manifest without the keys ``resumable``. With an active ``world``
    (:class:`lorite.runtime.World`) every rank must call it (see the module docstring)."""
    from safetensors.torch import save_file  # optional dependency (lorite[peft])

    if keep_last < 1:
        raise LoriteError(f"--keep-last must be >= 1, got {keep_last}")
    if world is not None and world.active:
        return _save_distributed(
            Path(run_dir), model, optimizer, scheduler, train_state, world, keep_last, resumable
        )
    target = Path(run_dir) / CHECKPOINT_DIR
    _remove_stale_temporaries(run_dir)
    tmp = temporary_sibling(target)
    try:
        save_file(trainable_state_dict(model), str(tmp / WEIGHTS))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "extra": extra_state or {},
            },
            tmp / TRAINING_STATE,
        )
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        _write_manifest(tmp, train_state.get("config"), resumable)  # last: it covers every file above
        _place(tmp, target, keep_last)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return target


def load_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    extra_state: dict | None = None,
    world: World | None = None,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved ``train_state``. A dict passed as
    ``extra_state`` is filled with the saved extra state. The checkpoint must come from the same kind of
    launch (one process, or the same number of ranks). ``checkpoint`` is one :func:`open_checkpoint`
    already checked (None: it checks now, falling back to an older kept one when the newest is damaged)."""
    if checkpoint is None:
        checkpoint = open_checkpoint(run_dir, world)
    folder = checkpoint.folder
    if world is not None and world.active:
        return _load_distributed(checkpoint, model, optimizer, scheduler, world)
    weights = checkpoint.weights
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise LoriteError(
            f"--resume: the checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})"
        )
    if unknown := [name for name in weights if name not in params]:
        raise LoriteError(f"--resume: the checkpoint has {unknown[0]!r}, which this model does not")
    state = checkpoint.state
    try:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or groups of another model / optimizer
        raise LoriteError(
            f"--resume: {folder} does not fit this run's model or optimizer ({_short(error)})"
        ) from error
    set_rng_state(state["rng"])
    if extra_state is not None:
        extra_state.update(state.get("extra", {}))
    return checkpoint.train_state


# ------------------------------------------------------------------ several ranks
def _save_distributed(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    train_state: dict,
    world: World,
    keep_last: int,
    resumable: Iterable[str],
) -> Path:
    target = run_dir / CHECKPOINT_DIR
    name = [None]
    if world.is_main:
        _remove_stale_temporaries(run_dir)
        name = [str(temporary_sibling(target))]
    dist.broadcast_object_list(name, src=0)  # one temporary directory for every rank
    tmp = Path(name[0])
    rngs = [None] * world.size
    dist.all_gather_object(rngs, rng_state())
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
        # dcp.save returns once every rank's shards and the metadata are written: rank 0 can hash them
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / DCP_DIR))
        if world.is_main:
            torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, tmp / TRAINING_STATE)
            (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": world.size}, indent=1))
            _write_manifest(tmp, train_state.get("config"), resumable)
            _place(tmp, target, keep_last)
    finally:
        dist.barrier()  # nobody goes on (or reads the checkpoint) before rank 0 has renamed it
        if world.is_main and tmp.exists():
            remove_tree(tmp)
    return target


def _load_distributed(checkpoint: Checkpoint, model, optimizer, scheduler, world: World) -> dict[str, Any]:
    folder = checkpoint.folder
    if not (folder / DCP_DIR).is_dir():
        raise LoriteError(f"--resume: {folder} was written by one process; resume it without a launcher")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    # dcp.load has already failed on any trainable tensor missing from the checkpoint; strict=False only
    # lets the frozen base weights (not saved) be absent
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(strict=False),
    )
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    set_rng_state(checkpoint.state["rng"][world.rank])
    return checkpoint.train_state


def _options(strict: bool = True) -> StateDictOptions:
    # the base model is not trained: not saved
    return StateDictOptions(ignore_frozen_params=True, strict=strict)
