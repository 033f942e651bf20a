"""``report.md`` and plots for a :func:`lorite.train.compare.compare` result."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text


def _fmt(mean_std: tuple[float, float], scale: float = 100.0) -> str:
    mean, std = mean_std
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


def _grid_cell(lr: str, score: float | None, info: dict[str, Any]) -> str:
    if lr in info["diverged_lrs"]:
        return "diverged"
    return "failed" if score is None else f"{100 * score:.1f}"


def task_folder(task: str) -> str:
    """``task`` as a file or folder name (a comparison's run folders, its loss plots): the spec with ``/``
    as ``__``; a spec with glob characters or too long for a file name (a mixture of many tasks) is
    ``mixture-`` and a hash of it."""
    name = task.replace("/", "__")
    if len(name) <= 120 and not any(c in name for c in "*?[]"):
        return name
    return "mixture-" + hashlib.sha1(task.encode("utf-8")).hexdigest()[:12]


def _task_label(task: str, entry: dict[str, Any]) -> str:
    """``task`` as a table cell: a long mixture spec as "mixture of N tasks" and its beginning."""
    members = next(
        (info["test_per_task"] for info in entry["optimizers"].values() if "test_per_task" in info), None
    )
    if members is None or len(task) <= 80:
        return task
    return f"mixture of {len(members)} tasks ({task[:60]}…)"


def _per_task_tables(tasks: dict[str, Any], optimizers: list[str]) -> list[str]:
    """For each mixture: every member's test score (mean ± std over the seeds at the chosen lr), the
    zero-shot score, and the macro mean the rate was chosen by (on validation) and reported on."""
    lines: list[str] = []
    for task, entry in tasks.items():
        infos = [entry["optimizers"][name] for name in optimizers]
        if not any("test_per_task" in info for info in infos):
            continue
        members = next(info["test_per_task"] for info in infos if "test_per_task" in info)
        zero = ((entry.get("zero_shot") or {}).get("test") or {}).get("per_task", {})
        lines += [
            f"### {_task_label(task, entry)}",
            "",
            "| task | zero-shot | " + " | ".join(optimizers) + " |",
            "|---|---|" + "---|" * len(optimizers),
        ]
        for member in members:
            zero_text = f"{100 * zero[member]['score']:.1f}" if member in zero else "—"
            cells = [
                _fmt(info["test_per_task"][member]) if member in info.get("test_per_task", {}) else "—"
                for info in infos
            ]
            lines.append(f"| {member} | {zero_text} | " + " | ".join(cells) + " |")
        zero_macro = (entry.get("zero_shot") or {}).get("test", {}).get("score")
        lines.append(
            f"| **macro mean** | {'—' if zero_macro is None else f'{100 * zero_macro:.1f}'} | "
            + " | ".join(_fmt(info["test_score"]) for info in infos)
            + " |"
        )
        lines.append("")
    if lines:
        lines = ["## Per-task test scores of the mixtures", "", *lines]
    return lines


def _transfer_tables(tasks: dict[str, Any], optimizers: list[str]) -> list[str]:
    """Zero-shot transfer (FinetuneConfig.transfer_task): each held-out task's test score of the adapters
    trained on each task (mean ± std over the seeds at the chosen lr) next to the base model's."""
    lines: list[str] = []
    for task, entry in tasks.items():
        infos = [entry["optimizers"][name] for name in optimizers]
        if not any("transfer_score" in info for info in infos):
            continue
        zero = (entry.get("zero_shot") or {}).get("transfer") or {}
        members = next((info["transfer_per_task"] for info in infos if "transfer_per_task" in info), {})
        lines += [
            f"### trained on {_task_label(task, entry)}",
            "",
            "| held-out task | zero-shot | " + " | ".join(optimizers) + " |",
            "|---|---|" + "---|" * len(optimizers),
        ]
        for member in members:
            zero_member = zero.get("per_task", {member: zero} if zero else {}).get(member)
            zero_text = f"{100 * zero_member['score']:.1f}" if zero_member else "—"
            cells = [
                _fmt(info["transfer_per_task"][member])
                if member in info.get("transfer_per_task", {})
                else "—"
                for info in infos
            ]
            lines.append(f"| {member} | {zero_text} | " + " | ".join(cells) + " |")
        zero_macro = zero.get("score")
        lines.append(
            f"| **macro mean** | {'—' if zero_macro is None else f'{100 * zero_macro:.1f}'} | "
            + " | ".join(_fmt(info["transfer_score"]) if "transfer_score" in info else "—" for info in infos)
            + " |"
        )
        lines.append("")
    if lines:
        lines = ["## Zero-shot transfer to held-out tasks (test, never trained or selected on)", "", *lines]
    return lines


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``out/report.md`` and PNGs; return the plot paths."""
    plots = _plots(results, out)
    tasks = results["tasks"]
    optimizers = list(next(iter(tasks.values()))["optimizers"])
    metric_note = "accuracy (multiple choice) or ROUGE-L (generation), ×100; perplexity for corpora (negated)"
    if results.get("config", {}).get("classification_score") == "exact_match":
        metric_note += "; exact match for classification tasks (a small label set of answers)"
    lines = [
        "# lorite compare",
        "",
        f"Test score at each optimizer's best learning rate (chosen on validation), mean ± std over "
        f"{results['seeds']} seed(s). Score: {metric_note}.",
        "",
        "| task | zero-shot | " + " | ".join(optimizers) + " |",
        "|---|---|" + "---|" * len(optimizers),
    ]
    averages: dict[str, list[float]] = {name: [] for name in optimizers}
    for task, entry in tasks.items():
        zero = entry.get("zero_shot")
        zero_text = f"{100 * zero['test']['score']:.1f}" if zero else "—"
        cells = []
        for name in optimizers:
            info = entry["optimizers"][name]
            averages[name].append(info["test_score"][0])
            edge = " (lr at grid edge)" if info["best_lr_at_grid_edge"] else ""
            cells.append(_fmt(info["test_score"]) + edge)
        lines.append(f"| {_task_label(task, entry)} | {zero_text} | " + " | ".join(cells) + " |")
    if len(tasks) > 1:
        lines.append(
            "| **average** | | "
            + " | ".join(f"{100 * sum(v) / len(v):.1f}" for v in averages.values())
            + " |"
        )
    lines += ["", *_per_task_tables(tasks, optimizers), *_transfer_tables(tasks, optimizers)]
    lines += ["", "## Best learning rates and validation grids", ""]
    for task, entry in tasks.items():
        lines += [
            f"### {_task_label(task, entry)}",
            "",
            "| optimizer | best lr | validation score per lr (seed 0) | s/step |",
            "|---|---|---|---|",
        ]
        for name in optimizers:
            info = entry["optimizers"][name]
            grid = ", ".join(f"{lr}: {_grid_cell(lr, score, info)}" for lr, score in info["grid"].items())
            timing = "—" if info["seconds_per_step"] is None else f"{info['seconds_per_step']:.3f}"
            lines.append(f"| {name} | {info['best_lr']:g} | {grid} | {timing} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return plots


def _validation_plot(plt, task: str, entry: dict[str, Any], out: Path) -> Path | None:
    """The validation score against the step at each optimizer's best lr (mean over the seeds, at the
    steps every seed evaluated): whether the runs plateaued. None when no run evaluated twice."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name, info in entry["optimizers"].items():
        curves = [
            {p["step"]: p["score"] for p in c if p.get("score") is not None}
            for c in info.get("validation_curves", [])
        ]
        curves = [c for c in curves if c]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if len(steps) < 2:
            continue
        mean = [100 * sum(c[step] for c in curves) / len(curves) for step in steps]
        ax.plot(steps, mean, marker="o", label=f"{name} (lr {info['best_lr']:g})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    title = f"{_task_label(task, entry)[:70]}: validation at each optimizer's best lr"
    path = out / f"validation_{task_folder(task)}.png"
    return _save_curves(plt, fig, ax, "validation score ×100 (mean over seeds)", title, path)


def _save_curves(plt, fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label a per-step curve plot (x: step), write it to ``path`` and close it."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib  # optional dependency (lorite[all]), slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency (lorite[all]), slow to import
    except ImportError:
        return []
    paths = []
    tasks = results["tasks"]
    for task, entry in tasks.items():
        with_curves = {  # a failed run has no curve
            name: (info, [c for c in info["loss_curves"] if c]) for name, info in entry["optimizers"].items()
        }
        with_curves = {name: pair for name, pair in with_curves.items() if pair[1]}
        if not with_curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (info, curves) in with_curves.items():
            length = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
            ax.plot(_smooth(mean, max(1, length // 25)), label=f"{name} (lr {info['best_lr']:g})")
        title = f"{_task_label(task, entry)[:70]}: loss at each optimizer's best lr"
        path = out / f"loss_{task_folder(task)}.png"
        paths.append(_save_curves(plt, fig, ax, "training loss (smoothed)", title, path))
        if path := _validation_plot(plt, task, entry, out):
            paths.append(path)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 3), 4))
    optimizers = list(next(iter(tasks.values()))["optimizers"])
    width = 0.8 / len(optimizers)
    for k, name in enumerate(optimizers):
        means = [100 * tasks[t]["optimizers"][name]["test_score"][0] for t in tasks]
        stds = [100 * tasks[t]["optimizers"][name]["test_score"][1] for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([t.split("/")[-1][:24] for t in tasks], fontsize=7)
    ax.set_ylabel("test score ×100 (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "test_scores.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
