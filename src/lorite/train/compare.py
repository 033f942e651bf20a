"""``lorite compare``: optimizers × learning-rate grids × seeds on the same data, best learning rate per
optimizer chosen on validation, test metrics as mean ± std at that learning rate.

Protocol, per task and optimizer:

1. every learning rate of the grid with seed 0;
2. the learning rate with the best **validation** score;
3. that learning rate with every seed; test mean ± std over those runs.

Every run also evaluates the test split (so that an interrupted comparison can resume from its runs'
``metrics.json`` alone), but only the test metrics of the validation-chosen learning rate are read.

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
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text
from ..errors import LoriteError
from .finetune import FinetuneConfig, check_output_dir, finetune

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
    from ..optim import available

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
        return f"{self.task.replace('/', '__')}/{self.spec.label.replace('/', '__')}/lr{self.lr:g}_seed{self.seed}"


def _execute(base: dict[str, Any], run: RunSpec, out: str, progress: bool) -> tuple[RunSpec, dict]:
    """One run (in a worker process when jobs > 1). A finished run is read back, not redone."""
    folder = Path(out) / run.folder
    metrics_file = folder / "metrics.json"
    if metrics_file.exists():
        return run, json.loads(metrics_file.read_text())
    config = FinetuneConfig(
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
    return run, finetune(config, out=folder, progress=progress)


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
    base_fields = {k: v for k, v in asdict(base).items() if k not in ("task", "optimizer", "lr", "seed")}
    base_fields["skip_test"] = False

    def execute(run: RunSpec, pool=None):
        if pool is None:
            return _execute(base_fields, run, str(out), progress)[1]
        return pool.submit(_execute, base_fields, run, str(out), False)

    def collect(run: RunSpec, future) -> dict:
        try:
            result = future.result()[1]
        except Exception as error:  # one failed run (e.g. out of memory) must not sink the rest
            result = {"failed": f"{type(error).__name__}: {error}"[:500], "validation": {"score": None}}
            print(f"FAILED {run.folder}: {result['failed']}", flush=True)
        if progress:
            print(
                f"done {run.folder}: validation score {result.get('validation', {}).get('score')}", flush=True
            )
        return result

    # Tasks are finished one after another (grid, then seeds at the best lr) so that an interrupted
    # comparison leaves whole tasks behind; with jobs > 1 the next task's grid fills idle workers while
    # the previous task's last runs finish, and a task's seed runs go ahead of later tasks' grids.
    results: dict[RunSpec, dict] = {}
    best: dict[tuple[str, str], float] = {}
    task_grids = {(t, s.label): sorted(grids[s.label]) for t in tasks for s in specs}
    grid_runs = {t: [RunSpec(t, s, lr, 0) for s in specs for lr in grids[s.label]] for t in tasks}

    def widening(task: str, spec: OptimizerSpec) -> RunSpec | None:
        """The next grid run of ``spec`` on ``task`` when its finished grid's best lr sits at an edge."""
        grid = task_grids[(task, spec.label)]
        if widen == 0 or len(grid) < 2 or any(RunSpec(task, spec, lr, 0) not in results for lr in grid):
            return None
        lr = _best_lr([(results[RunSpec(task, spec, g, 0)], g) for g in grid])
        planned = grids[spec.label]
        if lr == grid[-1] and sum(g > max(planned) for g in grid) < widen:
            new = neighbour_lr(lr, upward=True)
        elif lr == grid[0] and sum(g < min(planned) for g in grid) < widen:
            new = neighbour_lr(lr, upward=False)
        else:
            return None
        task_grids[(task, spec.label)] = sorted([*grid, new])
        if progress:
            print(
                f"widening {task} {spec.label}: best lr {lr:g} at the grid's edge, adding {new:g}", flush=True
            )
        return RunSpec(task, spec, new, 0)

    def seed_runs(task: str) -> list[RunSpec]:
        for s in specs:
            grid = task_grids[(task, s.label)]
            best[(task, s.label)] = _best_lr([(results[RunSpec(task, s, lr, 0)], lr) for lr in grid])
        return [RunSpec(task, s, best[(task, s.label)], seed) for s in specs for seed in range(seeds)]

    if jobs <= 1:
        for task in tasks:
            todo = list(grid_runs[task])
            while todo:
                run = todo.pop(0)
                results[run] = execute(run)
                extra = widening(task, run.spec)
                if extra is not None:
                    todo.insert(0, extra)
            for run in seed_runs(task):
                if run not in results:
                    results[run] = execute(run)
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, wait

        queue = [run for task in tasks for run in grid_runs[task]]  # in priority order
        pending_grid = {task: len(grid_runs[task]) for task in tasks}
        in_flight: dict = {}
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            while queue or in_flight:
                while queue and len(in_flight) < jobs:
                    run = queue.pop(0)
                    if run in results or run in in_flight.values():
                        continue
                    in_flight[execute(run, pool)] = run
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in done:
                    run = in_flight.pop(future)
                    results[run] = collect(run, future)
                    if run.seed != 0 or run.lr not in task_grids[(run.task, run.spec.label)]:
                        continue
                    if pending_grid[run.task] == 0:
                        continue  # a seed-0 run at the best lr, already a grid run
                    pending_grid[run.task] -= 1
                    extra = widening(run.task, run.spec)
                    position = tasks.index(run.task)
                    ahead = [r for r in queue if tasks.index(r.task) <= position]
                    behind = [r for r in queue if tasks.index(r.task) > position]
                    if extra is not None:  # the task's grid is not finished without it
                        pending_grid[run.task] += 1
                        queue = [extra, *ahead, *behind]
                    elif pending_grid[run.task] == 0:  # this task's grid is complete: its seeds next
                        queue = ahead + [r for r in seed_runs(run.task) if r not in results] + behind
    final = results

    baseline = {task: _zero_shot(replace(base, task=task), progress) for task in tasks} if zero_shot else {}
    results = _summarise(tasks, specs, task_grids, seeds, final, best, baseline, base)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    from .report import write_report

    write_report(results, out)
    return results


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


def _best_lr(scored: list[tuple[dict, float]]) -> float:
    """The learning rate with the best validation score (a diverged run scores −∞; ties: smaller lr)."""

    def score(result: dict) -> float:
        value = result.get("validation", {}).get("score")
        bad = value is None or result.get("diverged") or result.get("failed") or math.isnan(value)
        return -math.inf if bad else value

    return max(scored, key=lambda pair: (score(pair[0]), -pair[1]))[1]


def _zero_shot(config: FinetuneConfig, progress: bool) -> dict:
    """Validation and test metrics of the model before fine-tuning."""
    from ..models import load_causal_lm
    from .finetune import evaluate, load_task_data, pick_device

    model, tokenizer = load_causal_lm(config.model)
    model.to(pick_device(config.device))
    data = load_task_data(config, tokenizer)
    return {
        "validation": evaluate(model, tokenizer, data, "validation", config, progress),
        "test": evaluate(model, tokenizer, data, "test", config, progress),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(tasks, specs, grids, seeds, runs, best, baseline, base) -> dict:
    summary: dict[str, Any] = {"config": asdict(base), "seeds": seeds, "tasks": {}}
    for task in tasks:
        entry: dict[str, Any] = {"zero_shot": baseline.get(task), "optimizers": {}}
        for spec in specs:
            lr = best[(task, spec.label)]
            chosen = [runs[RunSpec(task, spec, lr, s)] for s in range(seeds)]
            tests = [r["test"]["score"] if "test" in r else float("nan") for r in chosen]
            metric_names = [k for k in chosen[0].get("test", {}) if k not in ("score", "n", "samples")]
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
                "best_lr_at_grid_edge": len(lr_grid) > 1 and lr in (min(lr_grid), max(lr_grid)),
                "grid": {g: r.get("validation", {}).get("score") for g, r in grid_runs.items()},
                "test_score": _mean_std(tests),
                "test_metrics": per_metric,
                "validation_score": _mean_std([r["validation"]["score"] for r in chosen]),
                "seconds_per_step": statistics.median(timing) if timing else None,
                "loss_curves": [r["history"]["loss"] for r in chosen],
                "validation_curves": [r["history"]["validation"] for r in chosen],
                "diverged_lrs": [g for g, r in grid_runs.items() if r.get("diverged")],
            }
        summary["tasks"][task] = entry
    return summary


def prepare_output(out: Path) -> None:
    """Create ``out`` or refuse one that holds a single fine-tuning run."""
    check_output_dir(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
