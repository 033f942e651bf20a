"""``lorite compare``: optimizers × learning-rate grids × seeds on the same data, best learning rate per
optimizer chosen on validation, test metrics as mean ± std at that learning rate.

Protocol, per task and optimizer:

1. every learning rate of the grid with seed 0;
2. the learning rate with the best **validation** score;
3. that learning rate with every seed; test mean ± std over those runs.

Every run also evaluates the test split (so that an interrupted comparison can resume from its runs'
``metrics.json`` alone), but only the test metrics of the validation-chosen learning rate are read. A run
whose ``metrics.json`` does not parse (a full disk, a copy cut short) counts as not run: ``compare`` says
so on stderr, moves its folder aside into ``out/.damaged/`` and runs it again; ``--progress`` lists it as
left. A finished run made with other settings than the comparison's (another eval batch size, more steps)
stops the comparison before anything runs (:func:`check_finished_runs`), rather than being mixed in.

An "optimizer" can be a registry name or a labelled variant — ``{"label": "lora_rite/no-escape",
"optimizer": "lora_rite", "args": {"escape_mass": false}, "init_scale": 10}`` in a config file — so that
ablations are comparisons too. An entry's ``training`` overrides settings of the run for that entry only
(``{"label": "loldu", "optimizer": "adamw", "training": {"method": "loldu", "alpha": 1}}``), so that
fine-tuning methods compare on the same data as well.

Runs are independent processes when ``jobs > 1`` (they share one GPU well: a 135M model leaves it idle
most of the time). Everything lands in ``out/``: one folder per run, ``results.json``, ``report.md`` and
plots.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text
from ..errors import LoriteError
from ..optim import available
from ..runtime import check_output_dir, release_cached_gpu_memory
from ..tasks import spec_members
from .finetune import RESUMABLE_CHANGES, FinetuneConfig, evaluate_model, finetune
from .report import task_folder, write_report

# Learning-rate grids for "--lrs auto": five log-spaced values around each method's usual range.
# LoRA-RITE's paper variant does not normalise ḡᵀḡ by the rows, so its steps are ~√rows smaller per
# unit lr than Adam's (the paper reports a best lr ~20× Adam's); Lamb's trust ratio makes its lr a
# relative step size.
AUTO_GRIDS = {
    "adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "lora_plus": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    "scaled_adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "shampoo": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "lamb": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "lora_rite": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "lora_rite_reference": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}


def parse_lrs(text: str | dict, optimizers: list[Any]) -> dict[str, list[float]]:
    """Learning-rate grids by optimizer label: ``auto`` (:data:`AUTO_GRIDS` of each entry's optimizer), a
    comma list for every optimizer (``1e-4,3e-4``), per optimizer (``adamw=1e-4:3e-4,lora_rite=1e-3:1e-2``),
    or (from a config file) a dict label → list."""
    specs = parse_optimizers(optimizers)
    if isinstance(text, dict):
        grids = {label: [float(v) for v in values] for label, values in text.items()}
        missing = [s.label for s in specs if s.label not in grids]
        if missing:
            raise LoriteError(f"lrs gives no learning rates for {', '.join(missing)}")
        return {s.label: grids[s.label] for s in specs}
    if text.strip() == "auto":
        return {s.label: list(AUTO_GRIDS[s.optimizer]) for s in specs}
    optimizers = [s.label for s in specs]
    try:
        if "=" in text:
            grids = {}
            for part in text.split(","):
                name, values = part.split("=", 1)
                grids[name.strip()] = [float(v) for v in values.split(":")]
            missing = [n for n in optimizers if n not in grids]
            if missing:
                raise LoriteError(f"--lrs gives no learning rates for {', '.join(missing)}")
            return {n: grids[n] for n in optimizers}
        values = [float(v) for v in text.split(",")]
    except ValueError as error:
        if isinstance(error, LoriteError):
            raise
        raise LoriteError(
            f"--lrs {text!r} does not parse: use 'auto', '1e-4,3e-4' or 'adamw=1e-4:3e-4,…'"
        ) from error
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise LoriteError(f"--lrs {text!r}: learning rates must be positive numbers")
    return {name: list(values) for name in optimizers}


@dataclass(frozen=True)
class OptimizerSpec:
    """A compared optimizer: a registry name with optional hyperparameters and LoRA init rescaling."""

    label: str
    optimizer: str
    args_json: str = "{}"  # hyperparameters as JSON (hashable)
    init_scale: float = 1.0
    training_json: str = "{}"  # FinetuneConfig overrides for this entry (method, rank, …) as JSON

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.args_json)

    @property
    def training(self) -> dict[str, Any]:
        return json.loads(self.training_json)


def parse_optimizers(items: list[Any]) -> list[OptimizerSpec]:
    """Registry names, or dicts with ``label``, ``optimizer`` and optional ``args``, ``init_scale``."""
    specs = []
    for item in items:
        if isinstance(item, str):
            spec = OptimizerSpec(item, item)
        elif isinstance(item, dict) and "optimizer" in item:
            unknown = set(item) - {"label", "optimizer", "args", "init_scale", "training"}
            if unknown:
                raise LoriteError(f"optimizer entry {item}: unknown keys {sorted(unknown)}")
            overridable = set(FinetuneConfig.__dataclass_fields__) - {"task", "optimizer", "lr", "seed"}
            bad = set(item.get("training", {})) - overridable
            if bad:
                label = item.get("label", item["optimizer"])
                raise LoriteError(f"optimizer entry {label!r}: unknown training settings {sorted(bad)}")
            spec = OptimizerSpec(
                item.get("label", item["optimizer"]),
                item["optimizer"],
                json.dumps(item.get("args", {}), sort_keys=True),
                float(item.get("init_scale", 1.0)),
                json.dumps(item.get("training", {}), sort_keys=True),
            )
        else:
            raise LoriteError(f"optimizer entry {item!r}: give a name or {{'label', 'optimizer', 'args'}}")
        if spec.optimizer not in available():
            raise LoriteError(f"unknown optimizer {spec.optimizer!r}; available: {', '.join(available())}")
        specs.append(spec)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise LoriteError(f"optimizer labels must be unique, got {labels}")
    return specs


@dataclass(frozen=True)
class RunSpec:
    task: str
    spec: OptimizerSpec
    lr: float
    seed: int

    @property
    def folder(self) -> str:
        return f"{task_folder(self.task)}/{self.spec.label.replace('/', '__')}/lr{self.lr:g}_seed{self.seed}"


class _Schedule:
    """Which runs a comparison needs, given the runs finished so far (``results``).

    Per task and optimizer: the planned grid with seed 0; while the finished grid's best validation lr sits
    at an edge, the next half-decade lr past it (at most ``widen`` per side); then ``seeds`` runs at the
    best lr. :func:`compare` executes it; :func:`compare_progress` only reads it against the disk."""

    def __init__(self, tasks, specs, grids, seeds, widen, verbose):
        self.specs, self.grids, self.seeds, self.widen, self.verbose = specs, grids, seeds, widen, verbose
        self.results: dict[RunSpec, dict] = {}
        self.best: dict[tuple[str, str], float] = {}
        self.task_grids = {(t, s.label): sorted(grids[s.label]) for t in tasks for s in specs}
        self.grid_runs = {t: [RunSpec(t, s, lr, 0) for s in specs for lr in grids[s.label]] for t in tasks}

    def grid_finished(self, task: str, spec: OptimizerSpec) -> bool:
        return all(RunSpec(task, spec, lr, 0) in self.results for lr in self.task_grids[(task, spec.label)])

    def best_lr(self, task: str, spec: OptimizerSpec) -> float:
        """The best validation lr among the finished grid runs of ``spec`` on ``task``."""
        scored = [
            (self.results[RunSpec(task, spec, lr, 0)], lr)
            for lr in self.task_grids[(task, spec.label)]
            if RunSpec(task, spec, lr, 0) in self.results
        ]
        return _best_lr(scored)

    def widening(self, task: str, spec: OptimizerSpec) -> RunSpec | None:
        """The next grid run of ``spec`` on ``task`` when its finished grid's best lr sits at an edge."""
        grid = self.task_grids[(task, spec.label)]
        if self.widen == 0 or len(grid) < 2 or not self.grid_finished(task, spec):
            return None
        lr = self.best_lr(task, spec)
        if not self._edge_is_strictly_best(task, spec, lr):
            return None
        planned = self.grids[spec.label]
        if lr == grid[-1] and sum(g > max(planned) for g in grid) < self.widen:
            new = neighbour_lr(lr, upward=True)
        elif lr == grid[0] and sum(g < min(planned) for g in grid) < self.widen:
            new = neighbour_lr(lr, upward=False)
        else:
            return None
        self.task_grids[(task, spec.label)] = sorted([*grid, new])
        if self.verbose:
            print(
                f"widening {task} {spec.label}: best lr {lr:g} at the grid's edge, adding {new:g}", flush=True
            )
        return RunSpec(task, spec, new, 0)

    def _edge_is_strictly_best(self, task: str, spec: OptimizerSpec, lr: float) -> bool:
        """Whether the edge rate ``lr`` beats every other rate of the grid (:func:`_strict_edge_best`). A
        plateau (the smaller rate wins a tie, so a flat grid's best is its lowest rate) says the optimum is
        inside the grid; widening past it would walk down the rates forever. When no rate has a finite
        score (all diverged), go on widening."""
        runs = {g: self.results[RunSpec(task, spec, g, 0)] for g in self.task_grids[(task, spec.label)]}
        return _run_score(runs[lr]) == -math.inf or _strict_edge_best(lr, runs)

    def seed_runs(self, task: str, specs: list[OptimizerSpec] | None = None) -> list[RunSpec]:
        """The seed runs at the best lr of each of ``specs`` (default: all), whose grids are finished."""
        runs = []
        for spec in self.specs if specs is None else specs:
            self.best[(task, spec.label)] = self.best_lr(task, spec)
            runs += [RunSpec(task, spec, self.best[(task, spec.label)], seed) for seed in range(self.seeds)]
        return runs


DAMAGED_DIR = ".damaged"  # run folders whose metrics.json did not parse, moved aside to be run again


def read_run_metrics(out: Path, run: RunSpec, move_aside: bool) -> dict | None:
    """The ``metrics.json`` of ``run`` in the comparison ``out``; None when the run is not finished — no
    ``metrics.json``, or one that does not parse or holds no JSON object (said on stderr; with
    ``move_aside`` the run's folder goes to ``out/.damaged/<time>/`` so that the run can be done again)."""
    folder = Path(out) / run.folder
    file = folder / "metrics.json"
    try:
        metrics = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"does not parse ({' '.join(str(error).split())})"
    else:
        if isinstance(metrics, dict):
            return metrics
        problem = "holds no JSON object"
    if move_aside:
        aside = Path(out) / DAMAGED_DIR / time.strftime("%Y%m%d-%H%M%S") / run.folder
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, aside)
        then = f"it is run again (its old folder is now {aside})"
    else:
        then = "the run counts as not run; the next lorite compare runs it again"
    print(f"lorite compare: note: {file} {problem}; {then}", file=sys.stderr, flush=True)
    return None


def _execute(base: dict[str, Any], run: RunSpec, out: str, progress: bool) -> tuple[RunSpec, dict]:
    """One run (in a worker process when jobs > 1). A finished run is read back, not redone."""
    folder = Path(out) / run.folder
    if (finished := read_run_metrics(Path(out), run, move_aside=True)) is not None:
        return run, finished
    try:
        return run, finetune(_run_config(base, run), out=folder, progress=progress)
    finally:
        release_cached_gpu_memory()


def _base_fields(base: FinetuneConfig) -> dict[str, Any]:
    """The settings every run of a comparison shares (each run evaluates test: see the module docstring)."""
    fields = {k: v for k, v in asdict(base).items() if k not in ("task", "optimizer", "lr", "seed")}
    return {**fields, "skip_test": False}


def _run_config(base: dict[str, Any], run: RunSpec) -> FinetuneConfig:
    """The fine-tuning settings of ``run``: the comparison's ``base`` fields, the optimizer entry's own."""
    return FinetuneConfig(
        **{
            **base,
            **run.spec.training,
            "task": run.task,
            "optimizer": run.spec.optimizer,
            "optimizer_kwargs": {**base.get("optimizer_kwargs", {}), **run.spec.args},
            "init_scale": run.spec.init_scale,
            "lr": run.lr,
            "seed": run.seed,
        }
    )


def check_finished_runs(
    out: Path, tasks: list[str], specs: list[OptimizerSpec], base: dict[str, Any]
) -> None:
    """Refuse to resume a comparison whose finished runs were made with other settings.

    Runs are found by folder (task, optimizer label, lr, seed), so a changed config resumed into the same
    ``out`` would otherwise choose learning rates and average seeds across runs that computed different
    things (another eval batch size, more steps). Every finished run's ``metrics.json`` config must equal
    what this comparison would run there, except the settings a resumed run may change
    (``RESUMABLE_CHANGES``); a setting newer than the run counts as its default (the run computed that).
    Optimizer arguments are compared where the run recorded them: a run records the arguments it was
    given, not every hyperparameter, so one it lacks was its optimizer's default then (e.g. runs from
    before ``rank_tolerance`` existed, which configs now pin to 0, what those runs computed).
    Folders of other tasks or labels, and unreadable files (run again anyway), are left alone."""
    by_folder = {task_folder(task): task for task in tasks}
    by_label = {spec.label.replace("/", "__"): spec for spec in specs}
    for file in sorted(out.glob("*/*/*/metrics.json")):
        task, spec = by_folder.get(file.parents[2].name), by_label.get(file.parents[1].name)
        if task is None or spec is None:
            continue
        try:
            stored = json.loads(file.read_text())["config"]
            run = RunSpec(task, spec, float(stored["lr"]), int(stored["seed"]))
        except (OSError, ValueError, TypeError, KeyError):
            continue
        expected = _as_json(asdict(_run_config(base, run)))
        defaults = _as_json(asdict(FinetuneConfig(task=task)))
        recorded = {key: stored.get(key, defaults[key]) for key in expected}
        if isinstance(recorded["optimizer_kwargs"], dict):  # only the arguments the run was given
            recorded["optimizer_kwargs"] = {**expected["optimizer_kwargs"], **recorded["optimizer_kwargs"]}
        differences = [
            f"{key} {recorded[key]!r} there, {value!r} here"
            for key, value in expected.items()
            if key not in RESUMABLE_CHANGES and recorded[key] != value
        ]
        if differences:
            raise LoriteError(
                f"{file.parent} was run with other settings than this comparison's ({'; '.join(differences[:3])}): "
                "resume with the settings it was made with, or use another --out"
            )


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from a metrics.json (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def compare(
    tasks: list[str],
    optimizers: list[Any],
    grids: dict[str, list[float]],
    seeds: int,
    base: FinetuneConfig,
    out: str | Path,
    jobs: int = 1,
    progress: bool = True,
    zero_shot: bool = True,
    widen: int = 0,
) -> dict:
    """Run the protocol of the module docstring; write ``results.json``, ``report.md`` and plots.

    ``optimizers``: registry names or labelled variants (see :func:`parse_optimizers`); ``grids`` maps each
    label to its learning rates. ``widen``: when an optimizer's best validation lr on a task lies at an edge
    of its grid, run the next half-decade lr past that edge (:func:`neighbour_lr`), up to ``widen`` extra
    rates per side, before its seeds; so each task's grid per optimizer can grow.
    """
    out = Path(out)
    specs = parse_optimizers(optimizers)
    missing = [s.label for s in specs if s.label not in grids]
    if missing:
        raise LoriteError(f"no learning-rate grid for {', '.join(missing)}")
    if seeds < 1:
        raise LoriteError(f"--seeds must be >= 1, got {seeds}")
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 0:
        raise LoriteError(f"widen must be a whole number >= 0, got {widen!r}")
    if (out / "results.json").exists():
        raise LoriteError(
            f"output dir {str(out)!r} already holds a comparison (results.json); use another --out"
        )
    base_fields = _base_fields(base)
    check_finished_runs(out, tasks, specs, base_fields)

    def execute(run: RunSpec, pool=None):
        if pool is None:
            return _execute(base_fields, run, str(out), progress)[1]
        return pool.submit(_execute, base_fields, run, str(out), False)

    failed_once: set[RunSpec] = set()

    def collect(run: RunSpec, get_result) -> dict | None:
        """The run's metrics; None when it failed for the first time (it is run again, once)."""
        try:
            result = get_result()
        except Exception as error:  # one failed run (e.g. out of memory) must not sink the rest
            result = {"failed": f"{type(error).__name__}: {error}"[:500], "validation": {"score": None}}
            print(f"FAILED {run.folder}: {result['failed']}", flush=True)
            if run not in failed_once:  # runs sharing a GPU can run out of memory together: try once more
                failed_once.add(run)
                return None
        if progress:
            print(
                f"done {run.folder}: validation score {result.get('validation', {}).get('score')}", flush=True
            )
        return result

    # Tasks are finished one after another (grid, then seeds at the best lr) so that an interrupted
    # comparison leaves whole tasks behind; with jobs > 1 the next task's grid fills idle workers while
    # the previous task's last runs finish, and a task's seed runs go ahead of later tasks' grids.
    schedule = _Schedule(tasks, specs, grids, seeds, widen, progress)
    results = schedule.results

    def execute_serially(run: RunSpec) -> dict:
        result = collect(run, lambda: execute(run))
        return result if result is not None else collect(run, lambda: execute(run))

    if jobs <= 1:
        for task in tasks:
            todo = list(schedule.grid_runs[task])
            while todo:
                run = todo.pop(0)
                results[run] = execute_serially(run)
                extra = schedule.widening(task, run.spec)
                if extra is not None:
                    todo.insert(0, extra)
            for run in schedule.seed_runs(task):
                if run not in results:
                    results[run] = execute_serially(run)
    else:
        queue = [run for task in tasks for run in schedule.grid_runs[task]]  # in priority order
        pending_grid = {task: len(schedule.grid_runs[task]) for task in tasks}
        in_flight: dict = {}
        # A run that failed once runs again alone, after the runs in flight, before any new one: runs that
        # ran out of GPU memory together and were put back beside each other failed together again.
        retry: list[RunSpec] = []
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            while queue or in_flight or retry:
                if retry and not in_flight:
                    run = retry.pop(0)
                    in_flight[execute(run, pool)] = run
                while not retry and queue and len(in_flight) < jobs:
                    run = queue.pop(0)
                    if run in results or run in in_flight.values():
                        continue
                    in_flight[execute(run, pool)] = run
                if not in_flight:
                    continue
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in done:
                    run = in_flight.pop(future)
                    result = collect(run, lambda done_future=future: done_future.result()[1])
                    if result is None:
                        retry.append(run)
                        continue
                    results[run] = result
                    if run.seed != 0 or run.lr not in schedule.task_grids[(run.task, run.spec.label)]:
                        continue
                    if pending_grid[run.task] == 0:
                        continue  # a seed-0 run at the best lr, already a grid run
                    pending_grid[run.task] -= 1
                    extra = schedule.widening(run.task, run.spec)
                    position = tasks.index(run.task)
                    ahead = [r for r in queue if tasks.index(r.task) <= position]
                    behind = [r for r in queue if tasks.index(r.task) > position]
                    if extra is not None:  # the task's grid is not finished without it
                        pending_grid[run.task] += 1
                        queue = [extra, *ahead, *behind]
                    elif pending_grid[run.task] == 0:  # this task's grid is complete: its seeds next
                        queue = ahead + [r for r in schedule.seed_runs(run.task) if r not in results] + behind
    baseline = {task: _zero_shot(replace(base, task=task), progress) for task in tasks} if zero_shot else {}
    if zero_shot and base.transfer_task:  # the base model on the held-out tasks: what transfer starts from
        for task in tasks:
            baseline[task]["transfer"] = _zero_shot(replace(base, task=base.transfer_task), progress)["test"]
    results = _summarise(tasks, specs, schedule.task_grids, seeds, results, schedule.best, baseline, base)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    write_report(results, out)
    return results


def compare_progress(
    tasks: list[str],
    optimizers: list[Any],
    grids: dict[str, list[float]],
    seeds: int,
    out: str | Path,
    widen: int = 0,
    base: FinetuneConfig | None = None,
) -> dict:
    """What ``out`` holds of a comparison and which runs are left; trains nothing. With ``base`` (the
    comparison's settings, as :func:`compare` takes them) finished runs made with other settings are
    refused, as :func:`compare` refuses them (:func:`check_finished_runs`).

    The same schedule as :func:`compare` (grids widened past an edge best, seeds at the best lr), read
    against the runs' ``metrics.json``, so an interrupted comparison (a lease that ended, a killed job)
    shows its partial table and what the next ``lorite compare`` with the same arguments will run.

    Returns ``{"finished", "left", "waiting", "other_runs", "tasks": {task: {label: {"grid": {lr: validation
    score, None (not run) or NaN (diverged)}, "grid_finished", "best_lr", "tests": {seed: test score or
    None}, "validation_curve": {step: mean validation score of the seeds done at the best lr}}}}}``: ``left`` counts the runs known to be missing; ``waiting`` the seed runs that follow grids
    not yet finished (a grid that widens adds to both later); ``other_runs`` the run folders in ``out`` that
    the schedule does not use (e.g. seeds at a best lr that a widened grid has since replaced). A best lr
    from an unfinished grid is provisional (``grid_finished`` false).
    """
    report, schedule = _read_progress(tasks, optimizers, grids, seeds, out, widen)
    if base is not None:
        check_finished_runs(Path(out), tasks, schedule.specs, _base_fields(base))
    return report


def compare_finished_tasks(
    tasks: list[str],
    optimizers: list[Any],
    grids: dict[str, list[float]],
    seeds: int,
    out: str | Path,
    base: FinetuneConfig,
    widen: int = 0,
) -> dict:
    """The ``results.json`` of :func:`compare` restricted to the tasks of ``out`` that are finished (every
    grid, widening included, and every seed at each best lr); trains nothing, and has no zero-shot rows.

    For a table that a lease cut short: the finished tasks' numbers, curves and plots are final, because
    :func:`compare` would choose and report exactly these runs. ``unfinished_tasks`` lists the rest."""
    report, schedule = _read_progress(tasks, optimizers, grids, seeds, out, widen)
    check_finished_runs(Path(out), tasks, schedule.specs, _base_fields(base))
    finished = [
        task
        for task in tasks
        if all(
            entry["grid_finished"] and all(v is not None for v in entry["tests"].values())
            for entry in report["tasks"][task].values()
        )
    ]
    if not finished:
        raise LoriteError(f"no task of the comparison in {str(out)!r} is finished yet (see --progress)")
    results = _summarise(
        finished, schedule.specs, schedule.task_grids, seeds, schedule.results, schedule.best, {}, base
    )
    results["unfinished_tasks"] = [task for task in tasks if task not in finished]
    return results


def _read_progress(tasks, optimizers, grids, seeds, out, widen) -> tuple[dict, _Schedule]:
    out = Path(out)
    specs = parse_optimizers(optimizers)
    missing_grids = [s.label for s in specs if s.label not in grids]
    if missing_grids:
        raise LoriteError(f"no learning-rate grid for {', '.join(missing_grids)}")
    if not out.is_dir():
        raise LoriteError(f"{str(out)!r} is not a folder: no comparison to report on")
    schedule = _Schedule(tasks, specs, grids, seeds, widen, verbose=False)

    def stored(run: RunSpec) -> bool:
        if run not in schedule.results and run not in unreadable:
            metrics = read_run_metrics(out, run, move_aside=False)  # trains nothing, moves nothing
            if metrics is None:
                unreadable.add(run)  # (or absent: either way not run; asked once)
            else:
                schedule.results[run] = metrics
        return run in schedule.results

    unreadable: set[RunSpec] = set()

    report: dict[str, Any] = {"out": str(out), "seeds": seeds, "finished": 0, "left": 0, "waiting": 0}
    report["tasks"] = {}
    for task in tasks:
        entry = report["tasks"][task] = {}
        for spec in specs:
            missing = [r for r in schedule.grid_runs[task] if r.spec == spec and not stored(r)]
            while not missing and (extra := schedule.widening(task, spec)) is not None:
                if not stored(extra):
                    missing.append(extra)
            grid = {
                lr: _validation_score(schedule.results.get(RunSpec(task, spec, lr, 0)))
                for lr in schedule.task_grids[(task, spec.label)]
            }
            finished = not missing
            best = schedule.best_lr(task, spec) if any(v is not None for v in grid.values()) else None
            tests: dict[int, float | None] = {}
            if finished:
                for run in schedule.seed_runs(task, [spec]):
                    tests[run.seed] = (
                        schedule.results[run].get("test", {}).get("score") if stored(run) else None
                    )
            else:
                report["waiting"] += seeds - 1  # seed 0 at the best lr is a grid run
            report["left"] += len(missing) + sum(v is None for v in tests.values())
            curve = _mean_validation_curve(
                [
                    schedule.results[RunSpec(task, spec, best, seed)]
                    for seed, v in tests.items()
                    if v is not None
                ]
            )
            entry[spec.label] = {
                "grid": grid,
                "grid_finished": finished,
                "best_lr": best,
                "tests": tests,
                "validation_curve": curve,
            }
    report["finished"] = len(schedule.results)
    scheduled = {(out / run.folder).resolve() for run in [*schedule.results, *unreadable]}
    report["other_runs"] = sorted(
        str(file.parent.relative_to(out))
        for file in out.glob("*/*/*/metrics.json")
        if file.parent.resolve() not in scheduled
    )
    return report, schedule


def _mean_validation_curve(runs: list[dict]) -> dict[int, float]:
    """Validation score by step, averaged over ``runs`` (steps that every run evaluated): has training
    converged at the chosen rate?"""
    curves = [
        {point["step"]: point["score"] for point in run.get("history", {}).get("validation", [])}
        for run in runs
    ]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {step: statistics.fmean(c[step] for c in curves) for step in steps}


def lr_text(lr: float) -> str:
    """A learning rate as papers write it: 3e-4, 1e-2, 2.5e-3."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _validation_score(result: dict | None) -> float | None:
    """None: not run yet; NaN: diverged or failed."""
    if result is None:
        return None
    value = result.get("validation", {}).get("score")
    return math.nan if value is None or result.get("diverged") else value


def progress_markdown(report: dict) -> str:
    """:func:`compare_progress`'s report as Markdown: per task, validation per lr and test at the best lr."""

    def pct(value: float | None) -> str:
        return "·" if value is None else "diverged" if math.isnan(value) else f"{100 * value:.1f}"

    lines = [
        f"# lorite compare: progress of {report['out']}",
        "",
        f"Runs finished: {report['finished']}; known to be left: {report['left']}; seed runs after the grids "
        f"still running: {report['waiting']} (a grid whose best lr sits at an edge widens). `·`: not run yet.",
    ]
    if report["other_runs"]:
        lines += [
            "",
            f"{len(report['other_runs'])} run folders here are not part of this schedule (e.g. seeds at a best "
            "lr that a widened grid replaced): " + ", ".join(report["other_runs"]),
        ]
    for task, entry in report["tasks"].items():
        done = sum(info["grid_finished"] for info in entry.values())
        lines += [
            "",
            f"## {task}: {done} of {len(entry)} grids finished",
            "",
            f"| optimizer | validation ×100 per lr (seed 0) | best lr | test ×100 at the best lr, "
            f"{report['seeds']} seeds | validation ×100 by step at the best lr (mean of the seeds done) |",
            "|---|---|---|---|---|",
        ]
        for label, info in entry.items():
            grid = ", ".join(f"{lr_text(lr)}: {pct(score)}" for lr, score in info["grid"].items())
            best = "·" if info["best_lr"] is None else lr_text(info["best_lr"])
            if not info["grid_finished"]:
                best += " (so far)" if info["best_lr"] is not None else ""
                test = "after the grid"
            else:
                scores = [v for v in info["tests"].values() if v is not None]
                test = " ".join(pct(v) for v in info["tests"].values())
                if len(scores) > 1:
                    mean, std = _mean_std(scores)
                    test += f" → {100 * mean:.1f} ± {100 * std:.1f}"
            curve = ", ".join(f"{step}: {pct(score)}" for step, score in info["validation_curve"].items())
            lines.append(f"| {label} | {grid} | {best} | {test} | {curve or '·'} |")
    return "\n".join(lines) + "\n"


def neighbour_lr(lr: float, upward: bool) -> float:
    """The next learning rate on the half-decade ladder …, 1e-4, 3e-4, 1e-3, 3e-3, …: ×3 from a 1,
    ×10/3 from a 3 (and back down). Rates off the ladder step by √10 and are rounded to one digit."""
    if not (lr > 0 and math.isfinite(lr)):
        raise LoriteError(f"a learning rate must be a positive number, got {lr}")
    mantissa = lr / 10 ** math.floor(math.log10(lr))
    if math.isclose(mantissa, 1.0, rel_tol=1e-6) or math.isclose(mantissa, 10.0, rel_tol=1e-6):
        factor = 3.0 if upward else 0.3
    elif math.isclose(mantissa, 3.0, rel_tol=1e-6):
        factor = 10 / 3 if upward else 1 / 3
    else:
        factor = math.sqrt(10) if upward else 1 / math.sqrt(10)
    return float(f"{lr * factor:.0e}")


def _run_score(result: dict) -> float:
    """A run's validation score for choosing rates; a diverged or failed run scores −∞."""
    value = result.get("validation", {}).get("score")
    bad = value is None or result.get("diverged") or result.get("failed") or math.isnan(value)
    return -math.inf if bad else value


def _best_lr(scored: list[tuple[dict, float]]) -> float:
    """The learning rate with the best validation score (a diverged run scores −∞; ties: smaller lr)."""
    return max(scored, key=lambda pair: (_run_score(pair[0]), -pair[1]))[1]


def _zero_shot(config: FinetuneConfig, progress: bool) -> dict:
    """Validation and test metrics of the model before fine-tuning."""
    return evaluate_model(config, progress=progress)


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the finite values (a failed or diverged run has none); NaN when none are."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _strict_edge_best(lr: float, grid_runs: dict[str | float, dict]) -> bool:
    """Whether the chosen ``lr`` sits at an edge of its grid (runs keyed by rate) and beats every other rate:
    a tie with an inner rate is a plateau, not an optimum past the edge."""
    rates = sorted(float(g) for g in grid_runs)
    if len(rates) < 2 or lr not in (rates[0], rates[-1]):
        return False
    scores = {float(g): _run_score(r) for g, r in grid_runs.items()}
    return scores[lr] > max(v for g, v in scores.items() if g != lr)


def _summarise(tasks, specs, grids, seeds, runs, best, baseline, base) -> dict:
    summary: dict[str, Any] = {"config": asdict(base), "seeds": seeds, "tasks": {}}
    for task in tasks:
        entry: dict[str, Any] = {"zero_shot": baseline.get(task), "optimizers": {}}
        for spec in specs:
            lr = best[(task, spec.label)]
            chosen = [runs[RunSpec(task, spec, lr, s)] for s in range(seeds)]
            tests = [r["test"]["score"] if "test" in r else None for r in chosen]
            metric_names = [  # the numeric metrics (not the answers shown or their shares)
                k
                for k, v in chosen[0].get("test", {}).items()
                if k not in ("score", "n") and isinstance(v, int | float)
            ]
            per_metric = {m: _mean_std([r["test"][m] for r in chosen if "test" in r]) for m in metric_names}
            lr_grid = grids[(task, spec.label)]
            grid_runs = {f"{g:g}": runs[RunSpec(task, spec, g, 0)] for g in lr_grid}
            timing = [r["seconds_per_step"] for r in chosen if r.get("seconds_per_step")]
            entry["optimizers"][spec.label] = {
                "optimizer": spec.optimizer,
                "args": spec.args,
                "init_scale": spec.init_scale,
                "training": spec.training,
                "trainable_parameters": chosen[0].get("trainable_parameters"),
                "best_lr": lr,
                "best_lr_at_grid_edge": _strict_edge_best(lr, grid_runs),
                "grid": {g: r.get("validation", {}).get("score") for g, r in grid_runs.items()},
                "test_score": _mean_std(tests),
                "test_metrics": per_metric,
                "validation_score": _mean_std([r["validation"]["score"] for r in chosen]),
                "failed_runs": [f"{lr:g}/seed{s}" for s, r in enumerate(chosen) if r.get("failed")],
                "seconds_per_step": statistics.median(timing) if timing else None,
                "loss_curves": [r.get("history", {}).get("loss", []) for r in chosen],
                "validation_curves": [r.get("history", {}).get("validation", {}) for r in chosen],
                "diverged_lrs": [g for g, r in grid_runs.items() if r.get("diverged")],
            }
            transfers = [r["transfer"] for r in chosen if r.get("transfer")]
            if transfers:  # zero-shot transfer to tasks no run trained on (FinetuneConfig.transfer_task)
                entry["optimizers"][spec.label]["transfer_score"] = _mean_std(
                    [t.get("score") for t in transfers]
                )
                members = transfers[0].get("per_task", {base.transfer_task: None})  # a single task: itself
                entry["optimizers"][spec.label]["transfer_per_task"] = {
                    member: _mean_std(
                        [t.get("per_task", {member: t}).get(member, {}).get("score") for t in transfers]
                    )
                    for member in members
                }
            if any("per_task" in r.get("test", {}) for r in chosen):  # a mixture: every member's test score
                members = next(r["test"]["per_task"] for r in chosen if "per_task" in r.get("test", {}))
                entry["optimizers"][spec.label]["test_per_task"] = {
                    member: _mean_std(
                        [r["test"]["per_task"].get(member, {}).get("score") for r in chosen if "test" in r]
                    )
                    for member in members
                }
        summary["tasks"][task] = entry
    return summary


CONFIG_KEYS = ("description", "tasks", "optimizers", "lrs", "seeds", "widen", "training", "heldout_tasks")


def load_config(path: str | Path) -> dict:
    """A comparison described in a JSON file (see benchmarks/configs/): ``tasks``, ``optimizers`` (names or
    labelled variants), ``lrs`` (``"auto"`` or label → list), ``seeds``, ``widen`` (extra learning rates
    allowed past each grid edge, see :func:`compare`) and ``training`` (FinetuneConfig fields). Makes each
    results table reproducible by one command. ``heldout_tasks`` (optional) names tasks or mixtures that
    no run of the comparison trains or chooses on, for transfer evaluation afterwards (``lorite evaluate
    --run RUN --task SPEC``); none of their tasks may be a member of ``tasks``."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise LoriteError(f"--config {str(path)!r} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:  # (the same words as finetune's)
        raise LoriteError(f"--config {str(path)!r} is not a readable JSON file: {error}") from error
    if not isinstance(config, dict):
        raise LoriteError(f"--config {str(path)!r} must hold a JSON object")
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise LoriteError(f"--config {str(path)!r}: unknown keys {sorted(unknown)}")
    for key in ("tasks", "optimizers"):
        if not isinstance(config.get(key), list) or not config[key]:
            raise LoriteError(f"--config {str(path)!r}: {key!r} must be a non-empty list")
    for key in ("seeds", "widen"):
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], int)):
            raise LoriteError(f"--config {str(path)!r}: {key!r} must be a whole number, got {config[key]!r}")
    if not isinstance(config.get("training", {}), dict):
        raise LoriteError(
            f"--config {str(path)!r}: 'training' must be a JSON object of FinetuneConfig fields"
        )
    fields = set(FinetuneConfig.__dataclass_fields__) - {"task", "optimizer", "lr", "seed"}
    bad = set(config.get("training", {})) - fields
    if bad:
        raise LoriteError(f"--config {str(path)!r}: unknown training settings {sorted(bad)}")
    trained = {member for task in config.get("tasks", []) for member in spec_members(task)}
    for heldout in config.get("heldout_tasks", []):
        overlap = [str(member) for member in spec_members(heldout) if member in trained]
        if overlap:
            raise LoriteError(
                f"--config {str(path)!r}: held-out task {overlap[0]!r} is also trained on (tasks)"
            )
    return config


def prepare_output(out: Path) -> None:
    """Create ``out`` or refuse one that holds a single fine-tuning run."""
    check_output_dir(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
