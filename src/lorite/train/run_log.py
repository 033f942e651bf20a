"""Watching a run while it trains: ``RUN/log.jsonl``, one JSON object a line, and (``--report-to
tensorboard``) the same scalars as TensorBoard events in ``RUN/tensorboard/``.

Every optimizer step writes one line::

    {"event": "step", "step": 12, "loss": 2.31, "lr": [0.001, 0.001], "grad_norm": 0.84, "tokens": 4096,
     "tokens_per_s": 15873.2, "elapsed_s": 3.1}

``step`` counts finished optimizer steps (1 after the first, as checkpoints and evaluations count them);
``lr`` holds the learning rate each param group stepped with; ``grad_norm`` is the global L2 norm of the
trainable gradients *before* clipping; ``tokens`` the step's non-pad tokens over all ranks and
``tokens_per_s`` those over the step's wall time; ``elapsed_s`` the seconds of training since the log was
opened (a resumed run's clock goes on from its last kept line). Every evaluation writes
``{"event": "eval", "step", "split", ...its numbers}`` (nested numbers flattened: ``by_corpus/prose/loss``).
A non-finite number (a diverged step) is written as ``null``, so every line is strict JSON.

The file is line-buffered: whatever stops the process, the lines already written are whole, and a reader
(``tail -f``, pandas) sees each step as soon as it ends. Only rank 0 writes (``enabled``). A resumed run
first drops the lines after its checkpoint's step (rewritten atomically), then appends: its log is the
one an uninterrupted run writes, timings aside.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ..cache import atomic_write_text
from ..errors import LoriteError

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")  # --report-to


def check_report_to(report_to: str) -> None:
    """Fail before training on an unknown ``--report-to``, or on tensorboard when it is not installed."""
    if report_to not in REPORT_TO:
        raise LoriteError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise LoriteError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")


def gradient_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float = 0.0) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients before clipping, clipping them to ``max_norm``
    first when it is positive (``clip_grad_norm_`` returns the pre-clip norm). Gradients must already be
    synchronised (after DDP's or FSDP2's backward). Under FSDP2 the gradients are sharded DTensors: the
    norm is reduced over the full tensors, a collective every rank must join."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.detach()


def _number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of ``metrics`` (not the answers, texts or flags), nested dicts flattened with ``/``."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            found.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[f"{prefix}{key}"] = value
    return found


def _kept_lines(path: Path, up_to_step: int) -> list[str]:
    """The lines of an existing log whose step is at most ``up_to_step``; an unreadable line (the tail of a
    write the process did not finish) is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= up_to_step:
            kept.append(line)
    return kept


class RunLog:
    """The run's ``log.jsonl`` (and TensorBoard writer). Use as a context manager, or call :meth:`close`;
    a log that is never closed still holds every whole line written.

    ``folder`` None or ``enabled`` False (the ranks other than 0) gives a log that writes nothing, so the
    training loops call it unconditionally. ``resume_step`` None starts a new log (an old one is
    replaced); an int continues the log of a run resumed from the checkpoint of that step.
    """

    def __init__(
        self,
        folder: str | Path | None,
        resume_step: int | None = None,
        report_to: str = "none",
        enabled: bool = True,
    ):
        check_report_to(report_to)
        self.path = Path(folder) / LOG_FILE if folder is not None and enabled else None
        self._file = None
        self._writer = None
        self._elapsed_before = 0.0  # seconds logged by the sessions before a resume
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = _kept_lines(self.path, resume_step)
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
            steps = [json.loads(line) for line in kept]
            timed = [e["elapsed_s"] for e in steps if e.get("event") == "step" and e.get("elapsed_s")]
            self._elapsed_before = timed[-1] if timed else 0.0
        mode = "a" if resume_step is not None else "w"
        self._file = open(self.path, mode, buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in close())
        if report_to == "tensorboard":
            # optional dependency (lorite[all]): torch.utils.tensorboard imports the tensorboard package
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of steps after the checkpoint that an interrupted session wrote
            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(self.path.parent / TENSORBOARD_DIR), purge_step=purge)
        self._opened = time.perf_counter()

    @property
    def active(self) -> bool:
        """Whether this log writes (rank 0 of a run with an output folder, not yet closed)."""
        return self._file is not None

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, allow_nan=False) + "\n")

    def step(
        self, step: int, loss: float, lr: list[float], grad_norm: float, tokens: int, seconds: float
    ) -> None:
        """One optimizer step: ``step`` steps done, its loss, each param group's lr, the pre-clip gradient
        norm, its non-pad tokens (all ranks) and its wall time in seconds."""
        if not self.active:
            return
        entry = {
            "event": "step",
            "step": step,
            "loss": _number(loss),
            "lr": [float(value) for value in lr],
            "grad_norm": _number(grad_norm),
            "tokens": int(tokens),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "elapsed_s": self._elapsed_before + time.perf_counter() - self._opened,
        }
        self._write(entry)
        if self._writer is not None:
            for name in ("loss", "grad_norm", "tokens_per_s"):
                if entry[name] is not None:
                    self._writer.add_scalar(f"train/{name}", entry[name], step)
            for group, value in enumerate(entry["lr"]):
                self._writer.add_scalar("train/lr" if group == 0 else f"train/lr/group{group}", value, step)

    def evaluation(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """One evaluation of ``split`` after ``step`` steps: its numbers (answers and texts left out; a
        ``step``, ``split`` or ``event`` key of ``metrics`` gives way to the line's own)."""
        if not self.active:
            return
        scalars = {
            name: _number(value)
            for name, value in _scalars(metrics).items()
            if name not in ("event", "step", "split")
        }
        self._write({"event": "eval", "step": step, "split": split, **scalars})
        if self._writer is not None:
            for name, value in scalars.items():
                if value is not None:
                    self._writer.add_scalar(f"{split}/{name}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
