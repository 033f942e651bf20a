"""What every training entry point needs from its surroundings, one copy each: the device, the process
group of a multi-process launch, the learning-rate schedule, the output directory check, and seeding.

Fine-tuning, pre-training, LiGO growth and the federated runs all take these from here, so a launch under
``torchrun`` or ``accelerate launch`` behaves the same everywhere (``LOCAL_RANK`` picks the GPU, rank 0
writes), and two runs that differ only in the entry point use the same schedule.

* **Device** (:func:`pick_device`, :func:`release_cached_gpu_memory`): ``"auto"`` is ``cuda:LOCAL_RANK``
  when CUDA is available, else the CPU.
* **Process group** (:func:`setup`, :func:`resolve_engine`): the launcher sets ``WORLD_SIZE``, ``RANK``
  and ``LOCAL_RANK``; :func:`setup` starts NCCL (GPUs) or gloo (CPU) and returns a :class:`World`. A group
  the caller initialised itself is joined as it is. ``accelerate launch`` flags map to DDP or FSDP2;
  DeepSpeed and FSDP version 1 are refused because they flatten LoRA factors into 1-D shards.
* **Schedule** (:func:`lr_factor`): linear warmup ``(t + 1)/warmup`` to the peak, then cosine or linear
  decay from 1 to ``min_ratio`` at ``total_steps``, or constant.
* **Output directories** (:func:`check_output_dir`): a directory that already holds a run is refused
  unless the run is resumed, and resuming needs a checkpoint there. :func:`run_lock` keeps a second
  lorite process off a directory that one is writing (``RUN/.lorite.lock``).
* **Seeding** (:func:`seed_everything`, :func:`seeded`, :func:`rng_state`): the global RNGs for a run, a
  fork of them for code that must not disturb the caller's stream, and the state a checkpoint keeps.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .cache import restore_interrupted_replace
from .errors import LoriteError

# ------------------------------------------------------------------------------------------- device


def local_rank() -> int:
    """This process's GPU index under a launcher (``LOCAL_RANK``), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; any other name as given
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)."""
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError as error:
            raise LoriteError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from error
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- processes
ENGINES = ("none", "ddp", "fsdp2")

SUPPORTED_ENGINES = (
    "supported: DDP (torchrun, or accelerate launch --multi_gpu, with --parallel ddp) and FSDP2 "
    "(torchrun --parallel fsdp2, or accelerate launch --use_fsdp --fsdp_version 2)"
)


@dataclass(frozen=True)
class World:
    """This process's place in the launch: its device, rank and the number of ranks."""

    device: torch.device
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def release_cached_gpu_memory() -> None:
    """Give the blocks this process's CUDA allocator keeps cached back to the device. Processes that share
    one GPU (``compare --jobs``) train and evaluate at different times, and each would otherwise keep its
    largest peak so far (an evaluation's generation shapes, a finished run) reserved, which the others
    then lack. A no-op without CUDA."""
    gc.collect()  # tensors held only by reference cycles (a finished run's model) go first
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
        raise LoriteError(f"accelerate launch with DeepSpeed ZeRO is not supported; {SUPPORTED_ENGINES}")
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise LoriteError(
                f"accelerate launch with FSDP version {version} is not supported; {SUPPORTED_ENGINES}"
            )
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
    """Join the process group of this launch and return this process's :class:`World`.

    A group the caller already initialised (``torch.distributed.init_process_group``) is used as it is.
    Otherwise the launcher's ``WORLD_SIZE``/``RANK`` decide: one process (no launcher) is a one-rank
    world; several start NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``) or gloo on the CPU, and need an
    ``engine`` other than ``"none"``.
    """
    if engine not in ENGINES:
        raise LoriteError(f"--parallel must be one of {', '.join(ENGINES)}, got {engine!r}")
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if initialised else launched_world_size()
    if size == 1:
        return World(device=device)
    if engine == "none":
        raise LoriteError(
            f"launched with WORLD_SIZE={size}: give --parallel ddp or --parallel fsdp2 (or run one process)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(device=device, rank=dist.get_rank(), size=dist.get_world_size())


def all_ranks_agree(flag: bool, world: World) -> bool:
    """Rank 0's ``flag`` on every rank (ranks must take the same branch, or the next collective hangs)."""
    if not world.active:
        return flag
    on = world.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(flag)], device=on)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def mean_over_ranks(value: float, world: World) -> float:
    """The global mean of a per-rank scalar (for logging the loss)."""
    if not world.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return float(tensor) / world.size


# ------------------------------------------------------------------------------------------- schedule
SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise LoriteError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. Then, with
    ``p = min(1, (step − warmup_steps) / (total_steps − warmup_steps))``: ``cosine`` gives
    ``m + (1 − m)·(1 + cos πp)/2``, ``linear`` gives ``m + (1 − m)·(1 − p)``, ``constant`` gives 1, where
    ``m = min_ratio`` (0: decay to zero, as fine-tuning does; pre-training keeps 10% of the peak).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a torch scheduler (stepped once per optimizer step; its state resumes)."""
    check_schedule(schedule)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule, min_ratio)
    )


# ------------------------------------------------------------------------------------------- output dirs
CHECKPOINT_DIR = "checkpoint"
# what a run writes into its directory (finetune: adapter/, model/, lq_lora/, snapshots/; pretrain: config.json,
# model/); a directory holding none of them holds no run
RUN_MARKERS = ("metrics.json", CHECKPOINT_DIR, "config.json", "adapter", "model", "lq_lora", "snapshots")


def check_output_dir(out: str | Path, resume: bool, markers: tuple[str, ...] = RUN_MARKERS) -> None:
    """Refuse to mix two runs in one directory.

    Without ``resume``: ``out`` may be new or hold anything but a run (none of ``markers``), so a folder
    that holds other runs' folders (a comparison) or unrelated files can be written into. With ``resume``:
    ``out`` must hold a checkpoint (``checkpoint/train_state.json``). Either way, a checkpoint whose
    replacement was killed between its two renames is put back first
    (:func:`lorite.cache.restore_interrupted_replace`), so that it is found and not deleted.
    """
    out = Path(out)
    restored = restore_interrupted_replace(out / CHECKPOINT_DIR)
    if restored is not None:  # before anything looks for the checkpoint, and before a write deletes it
        print(
            f"lorite: {out / CHECKPOINT_DIR} was missing (a checkpoint write was killed while replacing it); "
            f"put back the one it replaced, {restored.name}",
            file=sys.stderr,
        )
    if resume:
        state = out / CHECKPOINT_DIR / "train_state.json"
        if not state.exists():
            raise LoriteError(
                f"--resume {str(out)!r}: no checkpoint there (expected {state}; run with --checkpoint-every N)"
            )
        return
    if out.exists() and not out.is_dir():
        raise LoriteError(f"output dir {str(out)!r} is a file; give a directory")
    if out.exists() and any((out / name).exists() for name in markers):
        raise LoriteError(f"output dir {str(out)!r} already holds a run; use --resume {out} or another --out")


def require_new_output(out: str | Path, option: str = "--out") -> None:
    """Refuse an ``out`` that exists and is not an empty directory: artefacts written as one directory
    (a grown model, a quantized model, a federated run) replace their target, so nothing may be there."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoriteError(
            f"{option} {str(out)!r} already exists and holds files; choose a new directory (nothing is overwritten)"
        )


# ------------------------------------------------------------------------------------------- run locks
LOCK_FILE = ".lorite.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when it cannot be read (being written, or damaged)."""
    try:
        holder = json.loads(path.read_text())
        int(holder["pid"])
        return holder if isinstance(holder.get("host"), str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _create_lock(path: Path, holder: dict) -> bool:
    """Create ``path`` holding ``holder``, only if it does not exist (``O_CREAT | O_EXCL``)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(holder))
    return True


def _in_use(out: Path, holder: dict | None, option: str) -> LoriteError:
    if holder is None:
        who = f"its lock {out / LOCK_FILE} is unreadable"
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        where = "" if holder["host"] == socket.gethostname() else f" on {holder['host']}"
        who = f"pid {holder['pid']}{where}, started {started}"
    return LoriteError(
        f"{out} is in use by another lorite process ({who}); wait for it or choose another {option} "
        f"(if no lorite process uses it any more, delete {out / LOCK_FILE})"
    )


def acquire_run_lock(out: str | Path, option: str = "--out") -> Path:
    """Take ``out/.lorite.lock`` for this process (creating ``out``) and return its path.

    The lock holds this process's pid, host name and start time. A lock that exists refuses the run with
    a :class:`LoriteError` (exit 2), unless it is **stale**: written on this host by a process that is
    gone (``os.kill(pid, 0)`` finds none; a run killed by SIGKILL or a lost node leaves one) — then it is
    taken over, with a note on stderr. A lock of another host cannot be checked and always refuses. Two
    processes taking over the same stale lock at once are serialised by a short-lived ``.takeover`` file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoriteError(f"{option} {str(out)!r} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(50):
        if _create_lock(path, holder):
            return path
        found = _read_lock(path)
        if found is None:  # being written this instant, or damaged: look again, then judge by its age
            time.sleep(0.05)
            found = _read_lock(path)
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if found is None and age < 10:
                raise _in_use(out, None, option)
        if found is not None and (found["host"] != socket.gethostname() or _pid_alive(int(found["pid"]))):
            raise _in_use(out, found, option)
        # stale: take it over, one taker at a time (a second one waits and then finds a live lock)
        mutex = out / f"{LOCK_FILE}.takeover"
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > 30:  # left by a taker that died
                    mutex.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            continue
        try:
            if _read_lock(path) == found:  # still the stale lock we judged
                path.unlink(missing_ok=True)
                what = "unreadable" if found is None else f"pid {found['pid']} is gone"
                print(f"lorite: note: taking over the stale lock {path} ({what})", file=sys.stderr)
        finally:
            mutex.unlink(missing_ok=True)
    raise _in_use(out, _read_lock(path), option)


def release_run_lock(path: Path, remove_empty_dir: bool = False) -> None:
    """Remove a lock taken by :func:`acquire_run_lock`, if it is still this process's; with
    ``remove_empty_dir``, then the run directory too when the lock was all it held."""
    holder = _read_lock(path)
    if holder is not None and int(holder["pid"]) == os.getpid() and holder["host"] == socket.gethostname():
        path.unlink(missing_ok=True)
        if remove_empty_dir:
            with suppress(OSError):
                path.parent.rmdir()  # only when empty


@contextmanager
def run_lock(out: str | Path | None, option: str = "--out") -> Iterator[Path | None]:
    """Hold ``out/.lorite.lock`` for the body (see :func:`acquire_run_lock`); released when the body ends,
    normally or by an exception. Under a multi-process launch only rank 0 (``RANK``) locks: the other
    ranks write nothing of their own, and torchrun stops them when rank 0 exits. ``out`` None: no lock."""
    if out is None or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    created = not Path(out).exists()
    path = acquire_run_lock(out, option)
    try:
        yield path
    finally:  # a directory made for the lock and left empty (a run refused on bad input) goes too
        release_run_lock(path, remove_empty_dir=created)


# ------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed torch's generators (CPU and every GPU) and Python's ``random`` for a run."""
    torch.manual_seed(seed)
    random.seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded by ``seed``, restoring the caller's RNG state after,
    so that what the body draws (a model's initial weights) depends on ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def rng_state() -> dict[str, Any]:
    """Every RNG state a run draws from (torch CPU and CUDA, Python's ``random``), as tensors and plain
    Python for ``torch.save(weights_only=True)``."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
