"""The pieces every benchmark and experiment shares: launch runs, collect metrics, tables, plots.

An experiment script under ``benchmarks/experiments/`` is a plan (which runs, with which settings), a
worker (one run, in its own process) and a summary (tables, plots, the comparison). Everything around
those three lives here, once:

* **launch** — :func:`run_jobs` runs worker processes a few at a time, each with its own log and thread
  count, honours a wall-clock deadline (no new start after it; running ones are stopped or left to
  finish) and calls back between polls so that a summary can be rewritten while runs go on;
  :func:`run_calls` does the same for in-process function calls in a spawn pool, where one failed call
  (out of memory, say) never sinks the others;
* **collect** — :func:`read_json` (``None`` for a file not written yet or half-written by a run still
  going), :func:`write_json` (atomic: a reader never sees half a file; :func:`atomic_write_text` for text), :func:`finished`;
* **tables** — :func:`mean_std`, :func:`fmt`, :func:`fmt_mean_std`, :func:`markdown_table`;
* **plots** — :func:`pyplot` (the Agg backend, imported only when a plot is drawn) and
  :func:`save_figure` (atomic, closes the figure);
* **quick mode** — :func:`quick_model` / :func:`quick_task`: the tests' tiny random-init model and toy
  task, so that every experiment's ``--quick`` smoke test runs on a CPU in seconds.

``lorite compare`` (``lorite.train.compare``) is the harness for grids of fine-tuning runs over tasks,
optimizers, learning rates and seeds; an experiment that is such a grid (``loldu.py``) calls it rather
than launching runs itself.

Scripts import this module as ``from harness import ...`` after :data:`BENCHMARKS` is on ``sys.path``
(each script's first lines put it there, and lorite's ``src/`` too, so that a checkout runs without an
install).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
GPU_CACHE = REPO / ".gpu" / "cache"  # data prepared here for the GPU machine (carried with the tree)

for _path in (REPO / "src", BENCHMARKS):  # a checkout runs without an install
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lorite.cache import atomic_save_figure, atomic_write_text  # noqa: E402 (after the path set-up)

DASH = "—"  # what a table shows for a value that is missing, NaN or not finished


# ------------------------------------------------------------------------------------------ reports
def command_line() -> str:
    """The command that produced this report, quoted so that it can be pasted back into a shell."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return shlex.join(["python3", str(script), *sys.argv[1:]])


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ``None`` when it is missing or half-written (a run still writing it)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically: a reader sees the old file or the new one, never half."""
    atomic_write_text(Path(path), json.dumps(payload, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # a numpy or torch scalar
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finished(run_dir: Path, name: str = "metrics.json") -> dict | None:
    """A run's metrics once the run has finished (its ``final`` entry is written), else ``None``."""
    metrics = read_json(Path(run_dir) / name)
    return metrics if isinstance(metrics, dict) and metrics.get("final") is not None else None


def fresh_output_dir(out: Path, what: str) -> Path:
    """Create ``out`` for a new experiment; exit with one line if it already holds results."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{what}: --out {out} exists and is not empty; choose another")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------------ tables
def usable(value: Any) -> bool:
    """A number that can go into a mean: not None, not NaN, not inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Iterable[Any]) -> tuple[float, float] | None:
    """Mean and sample standard deviation of the usable values (std 0 for one); ``None`` for none."""
    kept = [float(v) for v in values if usable(v)]
    if not kept:
        return None
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    """``value * scale`` formatted with ``spec``; a dash for a missing or non-finite value."""
    if not usable(value):
        return DASH
    return format(value if scale == 1 else value * scale, spec)  # an int stays an int at scale 1


def fmt_mean_std(stat: tuple[float, float] | None, spec: str = ".2f", scale: float = 1.0) -> str:
    """``mean ± std`` of a :func:`mean_std` result (a dash for ``None``)."""
    if stat is None:
        return DASH
    return f"{fmt(stat[0], spec, scale)} ± {fmt(stat[1], spec, scale)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table; each cell is ``str()``-ed, so format numbers first (:func:`fmt`)."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    # matplotlib is a heavy optional dependency: imported only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 120) -> Path:
    """Save ``figure`` atomically to ``path`` and close it."""
    saved = atomic_save_figure(figure, Path(path), dpi=dpi)
    pyplot().close(figure)
    return saved


# ------------------------------------------------------------------------------------------ launching
def echo(line: str) -> None:
    """Progress lines, flushed: an experiment's output usually goes to a log file."""
    print(line, flush=True)


def worker_command(script: str | Path, *arguments: str) -> list[str]:
    """The command line that runs ``script`` again in a worker process."""
    return [sys.executable, str(Path(script).resolve()), *map(str, arguments)]


@dataclass
class Job:
    """One worker process: its command, its log file, its threads, what it waits for."""

    name: str
    command: list[str]
    log: Path
    threads: int | None = None  # OMP/MKL threads of the worker (None: inherited)
    needs: tuple[Path, ...] = ()  # files that must exist before it starts (another job's output)
    env: dict[str, str] = field(default_factory=dict)


def run_jobs(
    jobs: Sequence[Job],
    parallel: int,
    deadline: float | None = None,
    *,
    kill_at_deadline: bool = True,
    poll: float = 2.0,
    on_tick: Callable[[], None] | None = None,
    on_finish: Callable[[Job, int | None], None] | None = None,
    echo: Callable[[str], None] = echo,
) -> dict[str, int | None]:
    """Run ``jobs`` as subprocesses, at most ``parallel`` at once, in order as their inputs appear.

    ``deadline`` (seconds from the call): no job starts after it; running jobs are killed at it when
    ``kill_at_deadline`` (what they wrote so far stays on disk), else left to finish. A job whose
    ``needs`` can never appear (nothing running, none of the pending jobs startable) is given up.
    ``on_tick`` runs after every poll (rewrite a partial summary), ``on_finish(job, returncode)`` when a
    job ends (``None``: killed at the deadline). Returns each started job's return code (``None`` if it
    was killed); jobs never started are absent.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    began = time.monotonic()
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    codes: dict[str, int | None] = {}

    def elapsed() -> float:
        return time.monotonic() - began

    def end(job: Job, code: int | None) -> None:
        codes[job.name] = code
        status = "killed at the deadline" if code is None else f"exit {code}"
        echo(f"[{elapsed():6.0f}s] {job.name}: {status}")
        if on_finish is not None:
            on_finish(job, code)

    while pending or running:
        for name, (job, process) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                end(job, process.returncode)
        past_deadline = deadline is not None and elapsed() > deadline
        if past_deadline:
            if pending:
                echo(f"deadline ({deadline:.0f}s): not started: {[j.name for j in pending]}")
                pending.clear()
            if kill_at_deadline:
                for name, (job, process) in list(running.items()):
                    process.kill()
                    process.wait()
                    del running[name]
                    end(job, None)
        for job in list(pending):
            if len(running) >= parallel:
                break
            if all(Path(n).exists() for n in job.needs):
                pending.remove(job)
                running[job.name] = (job, _start(job))
                echo(f"[{elapsed():6.0f}s] started {job.name}")
        if pending and not running:  # what they wait for will never come (the job making it failed)
            echo(f"giving up on {[j.name for j in pending]}: their inputs are missing")
            pending.clear()
        if on_tick is not None:
            on_tick()
        if running:
            time.sleep(poll)
    return codes


def _start(job: Job) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **job.env}
    if job.threads is not None:
        env.update(OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads))
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_calls(
    function: Callable[..., Any],
    calls: Sequence[tuple],
    parallel: int,
    deadline: float | None = None,
    *,
    name: Callable[[tuple], str] = repr,
    on_done: Callable[[tuple, Any, BaseException | None], Sequence[tuple]] | None = None,
    echo: Callable[[str], None] = echo,
) -> dict[str, BaseException | None]:
    """Call ``function(*arguments)`` for each tuple in ``calls``, ``parallel`` at once.

    With ``parallel == 1`` the calls run in this process (a debugger and tracebacks work); otherwise in
    a spawn pool (CUDA-safe). No call starts after ``deadline`` (seconds from the call); running ones
    finish. A call that raises is reported and recorded, and the others go on. ``on_done(arguments,
    result, error)`` may return more calls, which run next (ahead of the rest). Returns each finished
    call's error (``None`` for success) by ``name(arguments)``.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    began = time.monotonic()
    queue = list(calls)
    outcome: dict[str, BaseException | None] = {}

    def finish(arguments: tuple, result: Any, error: BaseException | None) -> None:
        label = name(arguments)
        outcome[label] = error
        if error is None:
            echo(f"[{time.monotonic() - began:6.0f}s] done {label}")
        else:
            echo(
                f"[{time.monotonic() - began:6.0f}s] FAILED {label}: {type(error).__name__}: {str(error)[:300]}"
            )
        if on_done is not None:
            queue[:0] = list(on_done(arguments, result, error))

    def open_for_starts() -> bool:
        return deadline is None or time.monotonic() - began < deadline

    if parallel == 1:
        while queue and open_for_starts():
            arguments = queue.pop(0)
            try:
                result = function(*arguments)
            except Exception as error:  # one failed run must not sink the rest
                finish(arguments, None, error)
            else:
                finish(arguments, result, None)
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        in_flight: dict = {}
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            while queue or in_flight:
                while queue and len(in_flight) < parallel and open_for_starts():
                    arguments = queue.pop(0)
                    in_flight[pool.submit(function, *arguments)] = arguments
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    arguments = in_flight.pop(future)
                    try:
                        result = future.result()
                    except Exception as error:  # one failed run (e.g. out of memory) must not sink the rest
                        finish(arguments, None, error)
                    else:
                        finish(arguments, result, None)
    if queue:
        echo(f"deadline: {len(queue)} calls not started")
    return outcome


# ------------------------------------------------------------------------------------------ quick mode
def _test_helpers():
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import helpers  # the tests' tiny-model helpers: one definition of the toy model and task

    return helpers


def quick_model(directory: Path, **sizes: int) -> Path:
    """A tiny random-init Llama saved in ``directory`` (made once; reused after)."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        _test_helpers().tiny_model_dir(directory, **sizes)
    return directory


def quick_task(path: Path, n: int = 80) -> str:
    """A toy multiple-choice task written to ``path`` once (atomically: workers may read it meanwhile);
    returns its task spec (``file:PATH``)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        _test_helpers().write_task(tmp, n=n)
        os.replace(tmp, path)
    return f"file:{path}"
