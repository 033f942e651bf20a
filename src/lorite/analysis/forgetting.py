r"""Learning vs forgetting: source-domain ability before and after fine-tuning, across checkpoints.

Biderman et al., "LoRA Learns Less and Forgets Less" (arXiv 2405.09673, §4–5) plot, for every checkpoint of
every run, the **target** score (what fine-tuning is for) against a **forgetting score** (what the base
model could already do, measured on data the run never saw):

.. math::
    \text{forgetting score} = \frac{1}{|T|} \sum_{t \in T} \text{accuracy}_t
    \qquad (\text{higher} = \text{less forgetting})

The paper's T is HellaSwag, ARC-Challenge and WinoGrande. Here T is a set of commonsense multiple-choice
BIG-bench tasks, each choice scored by its log-likelihood per UTF-8 byte (lm-eval-harness's ``acc_norm``; the
unnormalised BIG-bench grade is reported beside it), with the same prompt format for the base and every
fine-tuned model. By default: ``winowhy`` (Winograd schemas, WinoGrande's ancestor), ``social_iqa`` (social
commonsense) and ``general_knowledge`` (everyday world knowledge, the nearest JSON task to ARC's knowledge
questions) — chosen because a 135M model is above chance on them, while on the HellaSwag-like
``goal_step_wikihow/step_inference`` it is at chance and that task would only add noise (the measured
accuracies are in docs/results.md, "LoRA vs full fine-tuning"). A second source
metric is the **perplexity on held-out English prose** — by default the Shakespeare works that
``corpus:shakespeare`` fine-tuning would hold out (the same document split, ``split_seed`` 0).

Every point lies in the plane (target, forgetting score); the **Pareto frontier** is the set of points no
other point beats on both axes. The base model is every curve's starting point (step 0).

A run directory of ``lorite finetune`` contributes its snapshots (``--save-every``: ``snapshots/step_N``),
its final ``adapter/`` or ``model/`` and, for an interrupted run, its ``checkpoint/``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_save_figure, atomic_write_text
from ..data.blocks import tokenize_documents
from ..data.corpora import CORPORA
from ..errors import LoriteError
from ..models import load_causal_lm
from ..runtime import pick_device
from ..tasks import evaluation, load_documents, load_tasks, split_documents
from ..train.finetune import FinetuneConfig, data_for, evaluate
from ..train.methods import get_method

DEFAULT_COMMONSENSE = ("winowhy", "social_iqa", "general_knowledge")
PROSE_SPLITS = ("heldout", "all")
TARGET_SPLITS = ("validation", "test")


@dataclass
class ForgettingConfig:
    """What "source-domain ability" is measured on."""

    prose: str = "shakespeare"  # a lorite.data.corpora name ("" or None: no prose perplexity)
    prose_split: str = "heldout"  # heldout: the documents corpus:<prose> fine-tuning holds out; all
    prose_blocks: int = 64  # blocks evaluated, evenly spread over the documents
    block_length: int = 256
    commonsense: list[str] = field(default_factory=lambda: list(DEFAULT_COMMONSENSE))
    n_examples: int = 300  # per commonsense task (a fixed seeded subset)
    normalize: bool = True  # score choices by Σ log p / UTF-8 bytes of the choice (lm-eval's acc_norm)
    target: bool = True  # also evaluate each run's own task (its learning) at every point
    target_split: str = "validation"
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0  # the commonsense subsets

    def validate(self) -> None:
        if self.prose and self.prose not in CORPORA:
            raise LoriteError(f"--prose: unknown corpus {self.prose!r}; available: {', '.join(CORPORA)}")
        if self.prose_split not in PROSE_SPLITS:
            raise LoriteError(
                f"--prose-split must be one of {', '.join(PROSE_SPLITS)}, got {self.prose_split!r}"
            )
        if self.target_split not in TARGET_SPLITS:
            raise LoriteError(
                f"--target-split must be one of {', '.join(TARGET_SPLITS)}, got {self.target_split!r}"
            )
        if self.prose_blocks < 1 or self.block_length < 2 or self.n_examples < 1 or self.batch_size < 1:
            raise LoriteError(
                "--prose-blocks, --n-examples and --batch-size must be >= 1, --block-length >= 2"
            )
        if not self.prose and not self.commonsense:
            raise LoriteError("nothing to measure: give --prose CORPUS or --commonsense TASKS")


# ------------------------------------------------------------------------------------------- metrics
def forgetting_score(accuracies: dict[str, float]) -> float | None:
    """The mean accuracy over the source tasks (the paper's y-axis); None without tasks."""
    return statistics.fmean(accuracies.values()) if accuracies else None


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, maximising both coordinates (learning ↑, forgetting
    score ↑): q dominates p when q ≥ p on both axes and q > p on one. Equal points do not dominate each
    other, so ties all stay. NaN points are never on the frontier. Sorted by the first coordinate."""
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    frontier = []
    for i in valid:
        x, y = points[i]
        dominated = any(
            points[j][0] >= x and points[j][1] >= y and (points[j][0] > x or points[j][1] > y) for j in valid
        )
        if not dominated:
            frontier.append(i)
    return sorted(frontier, key=lambda i: points[i])


# ------------------------------------------------------------------------------------------- the suite
@dataclass
class SourceSuite:
    prose_blocks: torch.Tensor | None  # (N, L) token blocks of held-out prose
    tasks: dict[str, tuple[Any, list]]  # name -> (Task, the evaluated examples)


def build_source_suite(config: ForgettingConfig, tokenizer) -> SourceSuite:
    blocks = None
    if config.prose:
        documents = load_documents(f"corpus:{config.prose}")
        if config.prose_split == "heldout":  # what corpus:<prose> fine-tuning with split_seed 0 holds out
            documents = split_documents(documents, seed=0).heldout
        every = tokenize_documents(tokenizer, [d.text for d in documents], config.block_length)
        if every.shape[0] == 0:
            raise LoriteError(f"--prose {config.prose}: fewer than {config.block_length} tokens held out")
        picks = torch.linspace(0, every.shape[0] - 1, min(config.prose_blocks, every.shape[0])).round().long()
        blocks = every[picks.unique()]
    tasks = {}
    for name, task in load_tasks(list(config.commonsense)).items():
        if task.kind != "multiple_choice":
            raise LoriteError(f"--commonsense {name!r} is a generation task; give multiple-choice tasks")
        order = list(range(len(task.examples)))
        random.Random(config.seed).shuffle(order)
        tasks[name] = (task, [task.examples[i] for i in order[: config.n_examples]])
    return SourceSuite(blocks, tasks)


def evaluate_source(
    model, tokenizer, suite: SourceSuite, batch_size: int = 32, normalize: bool = True
) -> dict[str, Any]:
    """Prose perplexity, commonsense accuracy per task and their mean (the forgetting score).

    Each choice c is scored by ``Σ log p(c | prompt)`` (BIG-bench's multiple-choice grade,
    ``commonsense_accuracy``) and by that sum over the UTF-8 length of c (lm-eval-harness's ``acc_norm``,
    which the paper's HellaSwag/ARC numbers use; ``commonsense_accuracy_norm``). ``commonsense`` — and the
    forgetting score — take the normalised one when ``normalize``.
    """
    result: dict[str, Any] = {}
    if suite.prose_blocks is not None:
        result["prose_perplexity"] = evaluation.perplexity(
            model, suite.prose_blocks, batch_size=max(1, batch_size // 4)
        )
    plain, normalized = {}, {}
    for name, (task, examples) in suite.tasks.items():
        scores = evaluation.choice_log_likelihoods(model, tokenizer, task, examples, batch_size)
        correct = [ex.correct for ex in examples]
        plain[name] = evaluation.accuracy_from_scores(scores, correct)
        per_byte = [
            [score / max(1, len(choice.encode("utf-8"))) for score, choice in zip(row, ex.choices)]
            for row, ex in zip(scores, examples)
        ]
        normalized[name] = evaluation.accuracy_from_scores(per_byte, correct)
    result["commonsense"] = normalized if normalize else plain
    result["commonsense_accuracy"] = plain
    result["commonsense_accuracy_norm"] = normalized
    result["forgetting_score"] = forgetting_score(result["commonsense"])
    return result


# ------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Point:
    """One set of weights to evaluate: ``kind`` is "base", "adapter", "model" or "checkpoint"."""

    step: int | None
    kind: str
    path: str | None


def _weights_in(folder: Path) -> tuple[str, Path] | None:
    for kind, path, marker in (
        ("adapter", folder / "adapter", "adapter_config.json"),
        ("model", folder / "model", "config.json"),
        ("adapter", folder, "adapter_config.json"),
        ("model", folder, "config.json"),
    ):
        if (path / marker).exists():
            return kind, path
    return None


def _run_config(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "metrics.json", folder / "checkpoint" / "train_state.json"):
        if candidate.exists():
            return json.loads(candidate.read_text()).get("config")
    return None


def discover_points(entry: str | Path) -> tuple[dict[str, Any] | None, list[Point]]:
    """``(run config, points)`` of a run directory (snapshots, final weights, an unfinished checkpoint), or
    of one snapshot / adapter / model directory (its run's config is looked up in the parent folders)."""
    folder = Path(entry)
    if not folder.is_dir():
        raise LoriteError(f"--runs: {str(entry)!r} is not a directory")
    config = _run_config(folder)
    if config is not None:  # a run directory
        points = []
        for snapshot in sorted((folder / "snapshots").glob("step_*")):
            found = _weights_in(snapshot)
            if found and snapshot.name[5:].isdigit():
                points.append(Point(int(snapshot.name[5:]), found[0], str(found[1])))
        final = _weights_in(folder)
        if final and (folder / "metrics.json").exists():
            points.append(Point(int(config["steps"]), final[0], str(final[1])))
        state = folder / "checkpoint" / "train_state.json"
        if state.exists():
            step = json.loads(state.read_text())["step"]
            if step not in {p.step for p in points}:
                points.append(Point(step, "checkpoint", str(folder / "checkpoint")))
        if not points:
            raise LoriteError(f"--runs: {str(entry)!r} holds no saved weights (adapter/, model/, snapshots/)")
        return config, sorted(points, key=lambda p: p.step)
    found = _weights_in(folder)
    if found is None:
        raise LoriteError(
            f"--runs: {str(entry)!r} is neither a run directory nor a snapshot, adapter or model directory"
        )
    for parent in list(folder.parents)[:3]:
        config = _run_config(parent)
        if config is not None:
            break
    match = re.search(r"step_(\d+)", str(folder))
    step = int(match.group(1)) if match else (int(config["steps"]) if config else None)
    return config, [Point(step, found[0], str(found[1]))]


class ForgettingEvaluator:
    """Evaluates points (base, adapters, full models, checkpoints) with shared caches: the base model is
    loaded once per name, the source suite and each target task's data are built once."""

    def __init__(self, config: ForgettingConfig, base: str | None = None, progress: bool = True):
        config.validate()
        self.config = config
        self.base = base
        self.progress = progress
        self._bases: dict[str, tuple[Any, Any]] = {}
        self._suite: tuple[Any, SourceSuite] | None = None
        self._targets: dict[str, Any] = {}
        self.device = pick_device(config.device)

    def _log(self, text: str) -> None:
        if self.progress:
            print(f"lorite analyze forgetting: {text}", file=sys.stderr, flush=True)

    def base_name(self, run_config: dict[str, Any] | None) -> str | None:
        return self.base if self.base is not None else (run_config or {}).get("model")

    def _base_model(self, name: str | None):
        key = str(name)
        if key not in self._bases:
            self._bases[key] = load_causal_lm(name)
        model, tokenizer = self._bases[key]
        return copy.deepcopy(model), tokenizer

    def load(self, point: Point, run_config: dict[str, Any] | None):
        """``(model, tokenizer)`` of ``point`` on the evaluation device, in eval mode."""
        if point.kind == "model":
            model, tokenizer = load_causal_lm(point.path)
        else:
            model, tokenizer = self._base_model(self.base_name(run_config))
            if point.kind == "adapter":
                from peft import PeftModel  # optional dependency (lorite[peft])

                model = PeftModel.from_pretrained(model, point.path, autocast_adapter_dtype=False)
            elif point.kind == "checkpoint":
                model = self._from_checkpoint(model, Path(point.path), run_config)
        return model.to(self.device).eval(), tokenizer

    @staticmethod
    def _from_checkpoint(model, folder: Path, run_config: dict[str, Any] | None):
        from safetensors.torch import load_file  # optional dependency (lorite[peft])

        if run_config is None:
            raise LoriteError(f"--runs: checkpoint {str(folder)!r} has no run config")
        config = FinetuneConfig(**run_config)
        model = get_method(config.method).prepare(model, config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(folder / "trainable.safetensors")).items():
                if name not in params:
                    raise LoriteError(f"checkpoint {str(folder)!r} has {name!r}, which the model does not")
                params[name].copy_(value)
        return model

    def suite(self, tokenizer) -> SourceSuite:
        key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
        if self._suite is None or self._suite[0] != key:
            self._suite = (key, build_source_suite(self.config, tokenizer))
        return self._suite[1]

    def target_data(self, run_config: dict[str, Any], tokenizer):
        """``(FinetuneConfig, TaskData)`` of a run's task, built once: the same validation and test splits as
        the run's (the training split is not encoded: only evaluated splits are used)."""
        config = FinetuneConfig(**run_config)
        key = json.dumps(
            [
                config.task,
                config.split_seed,
                config.n_validation,
                config.n_test,
                config.max_length,
                len(tokenizer),
            ]
        )
        if key not in self._targets:
            self._targets[key] = data_for(config, tokenizer, encode_train=False)
        return config, self._targets[key]

    def check_independent(self, run_config: dict[str, Any] | None) -> None:
        """The source data must be data the run did not train on."""
        if not run_config:
            return
        task = run_config.get("task", "")
        if task in self.config.commonsense:
            raise LoriteError(f"--commonsense {task!r} is the training task of a run; measure other tasks")
        if task == f"corpus:{self.config.prose}" and (
            self.config.prose_split != "heldout" or run_config.get("split_seed", 0) != 0
        ):
            raise LoriteError(
                f"--prose {self.config.prose}: a run trained on it (split_seed "
                f"{run_config.get('split_seed', 0)}); only --prose-split heldout with split_seed 0 is unseen"
            )

    def evaluate(self, model, tokenizer, run_config: dict[str, Any] | None) -> dict[str, Any]:
        """Source metrics and (with a run config and ``config.target``) the run's target metrics."""
        suite = self.suite(tokenizer)
        result = {
            "source": evaluate_source(model, tokenizer, suite, self.config.batch_size, self.config.normalize)
        }
        if self.config.target and run_config:
            config, data = self.target_data(run_config, tokenizer)
            target = evaluate(model, tokenizer, data, self.config.target_split, config, False)
            result["target"] = {k: v for k, v in target.items() if k != "samples"}
        return result

    def evaluate_base(self, run_config: dict[str, Any] | None) -> dict[str, Any]:
        name = self.base_name(run_config)
        self._log(f"base model {name or 'default'}")
        model, tokenizer = self._base_model(name)
        evaluated = self.evaluate(model.to(self.device).eval(), tokenizer, run_config)
        task = (run_config or {}).get("task")
        return {"step": 0, "kind": "base", "model": name, "task": task, **evaluated}

    def evaluate_run(self, entry: str | Path) -> dict[str, Any]:
        """Every point of one run (without the base model): ``{"config", "points": [...]}``."""
        run_config, points = discover_points(entry)
        self.check_independent(run_config)
        evaluated = []
        for point in points:
            self._log(f"{entry}: step {point.step} ({point.kind})")
            model, tokenizer = self.load(point, run_config)
            evaluated.append({**asdict(point), **self.evaluate(model, tokenizer, run_config)})
            del model
        return {"config": run_config, "points": evaluated}


def analyze_forgetting(
    runs: list[str | Path], config: ForgettingConfig, base: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate the base model(s) and every point of every run; see :func:`write_forgetting_report`."""
    evaluator = ForgettingEvaluator(config, base, progress)
    discovered = {str(entry): discover_points(entry)[0] for entry in runs}  # fail fast on bad entries
    for run_config in discovered.values():
        evaluator.check_independent(run_config)
    result: dict[str, Any] = {"config": asdict(config), "base": {}, "runs": {}}
    for entry, run_config in discovered.items():
        key = base_key(run_config, evaluator.base_name(run_config))
        if key not in result["base"]:
            result["base"][key] = evaluator.evaluate_base(run_config)
        result["runs"][entry] = {**evaluator.evaluate_run(entry), "base": key}
    return result


def base_key(run_config: dict[str, Any] | None, base_name: str | None) -> str:
    """Runs share a base point when they share the base model and the target task."""
    return f"{(run_config or {}).get('task', '-')} from {base_name or 'default'}"


# ------------------------------------------------------------------------------------------- report
def _target_axis(point: dict[str, Any]) -> tuple[str, float] | None:
    target = point.get("target") or {}
    for name in ("perplexity", "accuracy", "rouge_l"):
        if name in target:
            return name, target[name]
    return None


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _label(run: dict[str, Any], name: str) -> str:
    config = run.get("config") or {}
    if not config:
        return Path(name).name
    if config.get("method") == "full":
        return f"full {config.get('optimizer')} lr={config.get('lr'):g}"
    return f"lora r={config.get('rank')} {config.get('optimizer')} lr={config.get('lr'):g}"


def forgetting_markdown(result: dict[str, Any]) -> str:
    tasks = list(result["config"]["commonsense"])
    lines = [
        "# Learning vs forgetting",
        "",
        f"Source metrics: perplexity on {result['config']['prose_split']} `{result['config']['prose']}` "
        f"prose ({result['config']['prose_blocks']} blocks of {result['config']['block_length']} tokens); "
        f"{'length-normalised ' if result['config'].get('normalize', True) else ''}accuracy on "
        f"{', '.join(tasks)} ({result['config']['n_examples']} examples each); forgetting score "
        "= their mean (higher = less forgetting). Target: each run's own task, "
        f"{result['config']['target_split']} split.",
        "",
        "| run | step | target | prose ppl | " + " | ".join(tasks) + " | forgetting score |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]

    def row(name: str, point: dict[str, Any]) -> str:
        source = point["source"]
        axis = _target_axis(point)
        target = f"{axis[0]} {axis[1]:.4g}" if axis else "–"
        prose = f"{source['prose_perplexity']:.3f}" if "prose_perplexity" in source else "–"
        cells = [f"{100 * source['commonsense'][t]:.1f}" for t in tasks]
        score = source["forgetting_score"]
        return (
            f"| {name} | {point['step']} | {target} | {prose} | "
            + " | ".join(cells)
            + f" | {'–' if score is None else f'{100 * score:.1f}'} |"
        )

    for key, point in result["base"].items():
        lines.append(row(f"base ({key})", point))
    for name, run in result["runs"].items():
        for point in run["points"]:
            lines.append(row(_label(run, name), point))
    return "\n".join(lines) + "\n"


def plot_learning_vs_forgetting(result: dict[str, Any], path: Path) -> Path | None:
    """One row per target task: target metric (x) against the forgetting score and against the prose
    perplexity (y); one line per run from the base point through its checkpoints; the Pareto frontier of the
    fine-tuned points (target ↑, forgetting score ↑) dashed."""
    import matplotlib  # optional dependency (lorite[all]), slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (lorite[all])

    groups: dict[str, list[str]] = {}
    for name, run in result["runs"].items():
        groups.setdefault(run["base"], []).append(name)
    groups = {k: v for k, v in groups.items() if _target_axis(result["base"][k])}
    if not groups:
        return None
    has_prose = any("prose_perplexity" in p["source"] for p in result["base"].values())
    columns = 2 if has_prose else 1
    fig, axes = plt.subplots(len(groups), columns, figsize=(6.5 * columns, 4.5 * len(groups)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for row, (key, names) in enumerate(groups.items()):
        base = result["base"][key]
        metric = _target_axis(base)[0]
        frontier_points = []
        for index, name in enumerate(names):
            run = result["runs"][name]
            curve = [base, *run["points"]]
            xs = [_target_axis(p)[1] if _target_axis(p) else math.nan for p in curve]
            ys = [_nan(p["source"]["forgetting_score"]) for p in curve]
            style = "s-" if (run.get("config") or {}).get("method") == "full" else "o-"
            colour = colours(index % 20)
            axes[row][0].plot(xs, ys, style, color=colour, markersize=3, label=_label(run, name))
            frontier_points += list(zip(xs[1:], ys[1:]))
            if has_prose:
                prose = [p["source"].get("prose_perplexity", math.nan) for p in curve]
                axes[row][1].plot(xs, prose, style, color=colour, markersize=3)
        sign = -1 if metric == "perplexity" else 1  # the frontier maximises; lower perplexity is better
        on_front = pareto_frontier([(sign * x, y) for x, y in frontier_points])
        if on_front:
            front = sorted((frontier_points[i] for i in on_front), key=lambda p: p[0])
            axes[row][0].plot(*zip(*front), "k--", linewidth=1, label="Pareto frontier")
        for column in range(columns):
            ax = axes[row][column]
            ax.plot(
                [_target_axis(base)[1]],
                [_nan(base["source"]["forgetting_score"]) if column == 0 else base["source"]["prose_perplexity"]],
                "k*", markersize=12,
            )  # fmt: skip
            ax.set_xlabel(f"target {metric} ({base.get('task')})")
            if metric == "perplexity":
                ax.invert_xaxis()  # right = learned more
        axes[row][0].set_ylabel("forgetting score (mean commonsense accuracy)")
        axes[row][0].legend(fontsize=6)
        if has_prose:
            axes[row][1].set_ylabel(f"{result['config']['prose']} perplexity (held out)")
            axes[row][1].invert_yaxis()  # up = forgot less
    fig.suptitle("learning vs forgetting (★ base model; right/up = better)", fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def write_forgetting_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``forgetting.json``, ``forgetting.md`` and ``learning_vs_forgetting.png`` in ``out`` (atomic)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "forgetting.json", "markdown": out / "forgetting.md"}
    atomic_write_text(paths["json"], json.dumps(result, indent=1, default=str))
    atomic_write_text(paths["markdown"], forgetting_markdown(result))
    plot = plot_learning_vs_forgetting(result, out / "learning_vs_forgetting.png")
    if plot is not None:
        paths["plot"] = plot
    return paths
