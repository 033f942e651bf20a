"""``lorite compare``: optimizers × learning-rate grids × seeds on the same data, best learning rate per
optimizer chosen on validation, test metrics as mean ± std at that learning rate.

Protocol, per task and optimizer:

1. every learning rate of the grid with seed 0 (validation only);
2. the learning rate with the best validation score;
3. that learning rate with every seed (seed 0's run re-evaluated on test), test mean ± std.

Runs are independent processes when ``jobs > 1`` (they share one GPU well: a 135M model leaves it idle
most of the time). Everything lands in ``out/``: one folder per run, ``results.json``, ``report.md`` and
plots.
"""

from __future__ import annotations

import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    "lora_rite": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "lora_rite_reference": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}


def parse_lrs(text: str, optimizers: list[str]) -> dict[str, list[float]]:
    """``auto``, a comma list for every optimizer (``1e-4,3e-4``), or per optimizer
    (``adamw=1e-4:3e-4,lora_rite=1e-3:1e-2``)."""
    if text.strip() == "auto":
        return {name: list(AUTO_GRIDS.get(name, AUTO_GRIDS["adamw"])) for name in optimizers}
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
class RunSpec:
    task: str
    optimizer: str
    lr: float
    seed: int
    with_test: bool

    @property
    def folder(self) -> str:
        return f"{self.task.replace('/', '__')}/{self.optimizer}/lr{self.lr:g}_seed{self.seed}"


def _execute(base: dict[str, Any], spec: RunSpec, out: str, progress: bool) -> tuple[RunSpec, dict]:
    """One run (in a worker process when jobs > 1). A finished run is read back, not redone; the grid run
    of the chosen learning rate gets its test evaluation from its saved adapter."""
    folder = Path(out) / spec.folder
    metrics_file = folder / "metrics.json"
    config = FinetuneConfig(**{**base, "task": spec.task, "optimizer": spec.optimizer, "lr": spec.lr})
    config = replace(config, seed=spec.seed, skip_test=not spec.with_test)
    if metrics_file.exists():
        done = json.loads(metrics_file.read_text())
        if spec.with_test and "test" not in done and not done.get("diverged"):
            done["test"] = evaluate_saved_adapter(config, folder / "adapter", "test", progress)
            atomic_write_text(metrics_file, json.dumps(done, indent=1, default=str))
        return spec, done
    return spec, finetune(config, out=folder, progress=progress)


def evaluate_saved_adapter(config: FinetuneConfig, adapter_dir: Path, split: str, progress: bool) -> dict:
    """Metrics on ``split`` of the base model with the adapter saved in ``adapter_dir``."""
    from peft import PeftModel

    from ..models import load_causal_lm
    from .finetune import evaluate, load_task_data, pick_device

    model, tokenizer = load_causal_lm(config.model)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).to(pick_device(config.device))
    return evaluate(model, tokenizer, load_task_data(config, tokenizer), split, config, progress)


def compare(
    tasks: list[str],
    optimizers: list[str],
    grids: dict[str, list[float]],
    seeds: int,
    base: FinetuneConfig,
    out: str | Path,
    jobs: int = 1,
    progress: bool = True,
    zero_shot: bool = True,
) -> dict:
    """Run the protocol of the module docstring; write ``results.json``, ``report.md`` and plots."""
    from ..optim import available

    out = Path(out)
    unknown = [name for name in optimizers if name not in available()]
    if unknown:
        raise LoriteError(f"unknown optimizer(s) {', '.join(unknown)}; available: {', '.join(available())}")
    if seeds < 1:
        raise LoriteError(f"--seeds must be >= 1, got {seeds}")
    if (out / "results.json").exists():
        raise LoriteError(
            f"output dir {str(out)!r} already holds a comparison (results.json); use another --out"
        )
    base_fields = {k: v for k, v in asdict(base).items() if k not in ("task", "optimizer", "lr", "seed")}
    base_fields["eval_every"] = base.eval_every

    def run_all(specs: list[RunSpec]) -> dict[RunSpec, dict]:
        results = {}
        if jobs <= 1:
            for spec in specs:
                results[spec] = _execute(base_fields, spec, str(out), progress)[1]
            return results
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_execute, base_fields, spec, str(out), False) for spec in specs]
            for future in as_completed(futures):
                spec, result = future.result()
                results[spec] = result
                if progress:
                    score = result.get("validation", {}).get("score")
                    print(f"done {spec.folder}: validation score {score}", flush=True)
        return results

    # 1. the grid, seed 0, validation only
    grid_specs = [RunSpec(t, o, lr, 0, False) for t in tasks for o in optimizers for lr in grids[o]]
    grid = run_all(grid_specs)
    best: dict[tuple[str, str], float] = {}
    for task in tasks:
        for name in optimizers:
            scored = [
                (grid[RunSpec(task, name, lr, 0, False)]["validation"]["score"], lr) for lr in grids[name]
            ]
            best[(task, name)] = max(scored, key=lambda pair: (pair[0], -pair[1]))[1]
    # 2. the best lr with every seed, on test
    final_specs = [
        RunSpec(t, o, best[(t, o)], s, True) for t in tasks for o in optimizers for s in range(seeds)
    ]
    final = run_all(final_specs)

    baseline = {}
    if zero_shot:
        baseline = {task: _zero_shot(replace(base, task=task), progress) for task in tasks}
    results = _summarise(tasks, optimizers, grids, seeds, grid, final, best, baseline, base)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    from .report import write_report

    write_report(results, out)
    return results


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


def _summarise(tasks, optimizers, grids, seeds, grid, final, best, baseline, base) -> dict:
    summary: dict[str, Any] = {"config": asdict(base), "seeds": seeds, "tasks": {}}
    for task in tasks:
        entry: dict[str, Any] = {"zero_shot": baseline.get(task), "optimizers": {}}
        for name in optimizers:
            runs = [final[RunSpec(task, name, best[(task, name)], s, True)] for s in range(seeds)]
            tests = [r["test"]["score"] if "test" in r else float("nan") for r in runs]
            metric_names = [k for k in runs[0].get("test", {}) if k not in ("score", "n", "samples")]
            per_metric = {m: _mean_std([r["test"][m] for r in runs if "test" in r]) for m in metric_names}
            lr_grid = grids[name]
            entry["optimizers"][name] = {
                "best_lr": best[(task, name)],
                "best_lr_at_grid_edge": best[(task, name)] in (min(lr_grid), max(lr_grid)),
                "grid": {
                    f"{lr:g}": grid[RunSpec(task, name, lr, 0, False)]["validation"].get("score")
                    for lr in lr_grid
                },
                "test_score": _mean_std(tests),
                "test_metrics": per_metric,
                "validation_score": _mean_std([r["validation"]["score"] for r in runs]),
                "seconds_per_step": statistics.median(
                    r["seconds_per_step"] for r in runs if r.get("seconds_per_step")
                ),
                "loss_curves": [r["history"]["loss"] for r in runs],
                "validation_curves": [r["history"]["validation"] for r in runs],
                "diverged_lrs": [
                    f"{lr:g}" for lr in lr_grid if grid[RunSpec(task, name, lr, 0, False)].get("diverged")
                ],
            }
        summary["tasks"][task] = entry
    return summary


def prepare_output(out: Path) -> None:
    """Create ``out`` or refuse one that holds a single fine-tuning run."""
    check_output_dir(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
