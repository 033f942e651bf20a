"""BIG-bench tasks (Srivastava et al., arXiv 2206.04615) read from the ``bigbench==1.0.0`` sdist.

The sdist is downloaded once (``pip download --no-deps``; installing it would pull TensorFlow) and
each ``task.json`` is read with :mod:`tarfile` and cached as JSON, so later loads are offline and fast.
Any JSON task works by name, subtasks included (``elementary_math_qa/question_only``); the names are
shipped with lorite (``bigbench_tasks.txt``, :func:`task_names`), so a misspelt one is refused, with the
nearest names, before the sdist is downloaded. A task whose
examples all have ``target_scores`` (choice → score) is multiple choice, its correct choices the
best-scored ones; otherwise examples carry ``target`` (one string or several references) and the task is
generation (:mod:`lorite.tasks.task`).
"""

from __future__ import annotations

import difflib
import json
import sys
import tarfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..cache import atomic_write_text, cache_dir, fetch_distribution
from ..errors import LoriteError
from .task import DEFAULT_CHOICE_PREFIX, DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX, Example, Task

SDIST = ("bigbench", "1.0.0")
_TASKS_ROOT = "bigbench/benchmark_tasks/"
INDEX_FILE = "bigbench_tasks.txt"  # package data next to this module: every task name of SDIST
_INDEX_HEADER = f"""\
# Every JSON task of the {SDIST[0]}=={SDIST[1]} sdist (subtasks included), one name a line: lorite checks
# task names against this list before it downloads the sdist. Programmatic tasks have no task.json.
# Written by lorite.tasks.bigbench.write_index() from the sdist; tests/tasks/test_bigbench.py compares.
"""


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


def _task_members(archive: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """``(task name, member)`` of every ``task.json`` in the sdist ``archive``."""
    for member in archive:
        path = member.name
        if _TASKS_ROOT in path and path.endswith("/task.json"):
            yield path.split(_TASKS_ROOT, 1)[1][: -len("/task.json")], member


def sdist_task_names(sdist: Path) -> list[str]:
    """Every JSON task name in the BIG-bench sdist file ``sdist``, sorted (what :data:`INDEX_FILE` lists)."""
    with tarfile.open(sdist, "r:gz") as archive:
        return sorted(name for name, _ in _task_members(archive))


def write_index() -> Path:
    """Write :data:`INDEX_FILE` (next to this module) from the pinned sdist; for maintainers, when
    :data:`SDIST` changes. Returns its path."""
    path = Path(__file__).with_name(INDEX_FILE)
    atomic_write_text(
        path, _INDEX_HEADER + "".join(f"{name}\n" for name in sdist_task_names(fetch_distribution(*SDIST)))
    )
    return path


def _extract(names: set[str]) -> dict[str, bool]:
    """One pass over the sdist: cache the task.json of ``names`` (and, as before, the sdist's own index)."""
    sdist = fetch_distribution(*SDIST)
    print(f"lorite: reading BIG-bench task files from {sdist.name} (once per task)", file=sys.stderr)
    index, found = [], {}
    with tarfile.open(sdist, "r:gz") as archive:
        for task_name, member in _task_members(archive):
            index.append(task_name)
            if task_name in names:
                handle = archive.extractfile(member)
                atomic_write_text(_task_file(task_name), handle.read().decode("utf-8"))
                found[task_name] = True
    atomic_write_text(_cache_folder() / "index.json", json.dumps(sorted(index)))
    return found


def task_names() -> list[str]:
    """Every JSON task of the pinned BIG-bench sdist, subtasks included (programmatic tasks have no
    task.json and are not listed): the index shipped with lorite, :data:`INDEX_FILE` — no download."""
    text = resources.files(__package__).joinpath(INDEX_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _unknown(name: str, names: list[str]) -> LoriteError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return LoriteError(f"unknown BIG-bench task {name!r}{hint}")


def check_names(names: list[str]) -> None:
    """Raise a :class:`LoriteError` (with the nearest names) for the first name that is no BIG-bench task,
    from the shipped index: nothing is downloaded. Task files already in the cache count as known."""
    index = set(task_names())
    for name in names:
        if name not in index and not _task_file(name).exists():
            raise _unknown(name, sorted(index))


def load_tasks(names: list[str]) -> dict[str, Task]:
    """Load several tasks, reading the sdist at most once for all that are not cached yet (names are
    checked first, against the shipped index, so a misspelt one downloads nothing)."""
    check_names(names)
    missing = {n for n in names if not _task_file(n).exists()}
    if missing:
        found = _extract(missing)
        absent = sorted(missing - set(found))
        if absent:  # the shipped index lists it, the sdist has not: the two disagree
            raise LoriteError(f"BIG-bench task {absent[0]!r} is not in {SDIST[0]}=={SDIST[1]}'s sdist")
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
