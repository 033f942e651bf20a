"""BIG-bench tasks (Srivastava et al., arXiv 2206.04615) read from the ``bigbench==1.0.0`` sdist.

The sdist is downloaded once (``pip download --no-deps``; installing it would pull TensorFlow) and
each ``task.json`` is read with :mod:`tarfile` and cached as JSON, so later loads are offline and fast.
Any JSON task works by name, subtasks included (``elementary_math_qa/question_only``). A task whose
examples all have ``target_scores`` (choice → score) is multiple choice, its correct choices the
best-scored ones; otherwise examples carry ``target`` (one string or several references) and the task is
generation (:mod:`lorite.tasks.task`).
"""

from __future__ import annotations

import difflib
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text, cache_dir, fetch_distribution
from ..errors import LoriteError
from .task import DEFAULT_CHOICE_PREFIX, DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX, Example, Task

SDIST = ("bigbench", "1.0.0")
_TASKS_ROOT = "bigbench/benchmark_tasks/"


def parse_task(data: dict[str, Any], name: str) -> Task:
    """A :class:`Task` from the contents of a BIG-bench ``task.json``."""
    raw = data.get("examples") or []
    if not raw:
        raise LoriteError(f"BIG-bench task {name!r} has no examples in its task.json")
    examples = []
    multiple_choice = all("target_scores" in ex for ex in raw)
    for ex in raw:
        text = str(ex["input"])
        if multiple_choice:
            scores = ex["target_scores"]
            choices = tuple(str(c) for c in scores)
            best = max(float(s) for s in scores.values())
            correct = tuple(i for i, s in enumerate(scores.values()) if float(s) == best)
            examples.append(Example(text, choices=choices, correct=correct))
        else:
            target = ex.get("target")
            if target is None:
                raise LoriteError(f"BIG-bench task {name!r}: an example has neither target_scores nor target")
            targets = (target,) if isinstance(target, str) else tuple(str(t) for t in target)
            if not targets:
                continue
            examples.append(Example(text, targets=targets))
    return Task(
        name=name,
        kind="multiple_choice" if multiple_choice else "generation",
        examples=tuple(examples),
        description=str(data.get("description", "")),
        task_prefix=str(data.get("task_prefix", "")),
        input_prefix=str(data.get("example_input_prefix", DEFAULT_INPUT_PREFIX)),
        output_prefix=str(data.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)),
        choice_prefix=str(data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)),
        append_choices=bool(data.get("append_choices_to_input", True)),
        metrics=tuple(data.get("metrics", ())),
    )


# ---------------------------------------------------------------------------------------------- files
def _cache_folder() -> Path:
    folder = cache_dir() / "bigbench"
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    return folder


def _task_file(name: str) -> Path:
    return _cache_folder() / "tasks" / (name.replace("/", "__") + ".json")


def _extract(names: set[str]) -> dict[str, bool]:
    """One pass over the sdist: cache the task.json of ``names`` and the index of all task names."""
    sdist = fetch_distribution(*SDIST)
    print(f"lorite: reading BIG-bench task files from {sdist.name} (once per task)", file=sys.stderr)
    index, found = [], {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            path = member.name
            if _TASKS_ROOT not in path or not path.endswith("/task.json"):
                continue
            task_name = path.split(_TASKS_ROOT, 1)[1][: -len("/task.json")]
            index.append(task_name)
            if task_name in names:
                handle = archive.extractfile(member)
                atomic_write_text(_task_file(task_name), handle.read().decode("utf-8"))
                found[task_name] = True
    atomic_write_text(_cache_folder() / "index.json", json.dumps(sorted(index)))
    return found


def task_names() -> list[str]:
    """Every JSON task in the BIG-bench sdist (programmatic tasks have no task.json and are not listed)."""
    index = _cache_folder() / "index.json"
    if not index.exists():
        _extract(set())
    return json.loads(index.read_text())


def _unknown(name: str, names: list[str]) -> LoriteError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return LoriteError(f"unknown BIG-bench task {name!r}{hint}")


def load_tasks(names: list[str]) -> dict[str, Task]:
    """Load several tasks, reading the sdist at most once for all that are not cached yet."""
    missing = {n for n in names if not _task_file(n).exists()}
    if missing:
        index_file = _cache_folder() / "index.json"
        if index_file.exists():
            index = json.loads(index_file.read_text())
            for n in missing:
                if n not in index:
                    raise _unknown(n, index)
        _extract(missing)
        index = json.loads(index_file.read_text())
        for n in missing:
            if n not in index:
                raise _unknown(n, index)
    tasks = {}
    for name in names:
        data = json.loads(_task_file(name).read_text())
        if not data.get("examples"):
            subtasks = [n for n in task_names() if n.startswith(name + "/")]
            if subtasks:
                raise LoriteError(
                    f"BIG-bench task {name!r} is a group of subtasks; name one: {', '.join(subtasks)}"
                )
        tasks[name] = parse_task(data, name)
    return tasks


def load_task(name: str) -> Task:
    """A BIG-bench JSON task by name (``"social_iqa"``, ``"elementary_math_qa/question_only"``)."""
    return load_tasks([name])[name]


def load_task_file(path: str | Path) -> Task:
    """A task from a ``task.json`` file of your own (BIG-bench's format)."""
    path = Path(path)
    if not path.exists():
        raise LoriteError(f"task file {str(path)!r} does not exist")
    return parse_task(
        json.loads(path.read_text()), path.parent.name if path.name == "task.json" else path.stem
    )
