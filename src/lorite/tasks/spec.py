"""Task specs: the one parser of the strings ``--task``, ``--tasks``, ``--calib``, ``--commonsense`` and
``--data`` take, and the one loader of what they name.

=====================  ==========================================================================
spec                   what it names
=====================  ==========================================================================
``social_iqa``         a BIG-bench JSON task by name, subtasks included
                       (``elementary_math_qa/question_only``), from the ``bigbench`` sdist;
                       ``bigbench:social_iqa`` says the same explicitly
``file:PATH``          a ``task.json`` of your own in BIG-bench's format
``jsonl:PATH``         a JSON Lines file of your own rows, in TRL's formats (one kind per file):
                       ``{"prompt", "completion"}`` (generation, loss on the completion),
                       ``{"messages": [{"role", "content"}, …]}`` (chat: the model's chat template,
                       loss on every assistant turn), ``{"prompt", "choices", "answer"}`` (multiple
                       choice; ``answer`` an index or the choice's text); conversational
                       prompt/completion (lists of messages) too — see :mod:`lorite.tasks.rows`
``hf:PATH``            the same rows from a Hugging Face ``datasets`` dataset (``datasets``
                       installed): a ``save_to_disk`` folder, a folder of data files, or a
                       ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` file; of several splits
                       ``train``, or the one ``hf:PATH#SPLIT`` names
``corpus:NAME``        a public-domain corpus of :mod:`lorite.data.corpora` (language modelling)
=====================  ==========================================================================

Every task is split by the one rule of :mod:`lorite.tasks.splits` (a dataset's own splits are not used
for validation or test).

:func:`check_task_specs` validates specs before anything heavy is loaded (an unknown corpus, a missing
file, an unreadable or malformed first row of a ``jsonl:`` file, ``hf:`` without ``datasets``, an unknown
BIG-bench name with "did you mean"), reading the BIG-bench sdist at most once for all of them;
:func:`load_task` and :func:`load_documents` load what a spec names (a ``jsonl:`` or ``hf:`` source is
read in full, every row checked, only then)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import corpora
from ..data.corpora import Document
from ..errors import LoriteError
from . import bigbench, rows
from .task import Task

SOURCES = ("bigbench", "file", "jsonl", "hf", "corpus")
_PREFIXES = {"file": "file:", "jsonl": "jsonl:", "hf": "hf:", "corpus": "corpus:"}
_BIGBENCH_PREFIX = "bigbench:"  # optional: a bare name is a BIG-bench task


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task spec: its ``source`` (one of :data:`SOURCES`) and the ``name`` within it (a BIG-bench
    task name, a file path, a dataset path, a corpus name)."""

    source: str
    name: str

    def __str__(self) -> str:
        return _PREFIXES.get(self.source, "") + self.name

    @property
    def is_corpus(self) -> bool:
        return self.source == "corpus"


def parse_task_spec(spec: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` of ``spec`` (syntax only: nothing is read)."""
    if isinstance(spec, TaskSpec):
        return spec
    if not isinstance(spec, str):
        raise LoriteError(f"a task spec is a string, got {type(spec).__name__}")
    text = spec.strip()
    for source, prefix in _PREFIXES.items():
        if text.startswith(prefix):
            name = text[len(prefix) :].strip()
            if not name:
                raise LoriteError(f"task spec {spec!r}: nothing after {prefix!r}")
            return TaskSpec(source, name)
    if text.startswith(_BIGBENCH_PREFIX):
        text = text[len(_BIGBENCH_PREFIX) :].strip()
    if not text:
        raise LoriteError(
            f"empty task spec {spec!r}: give a BIG-bench task name, file:PATH, jsonl:PATH, hf:PATH or corpus:NAME"
        )
    return TaskSpec("bigbench", text)


def check_task_specs(specs: list[str | TaskSpec]) -> list[TaskSpec]:
    """Parse ``specs`` and check that each names something that exists: a known corpus, an existing file
    (a ``jsonl:`` file readable, its first row a good row), a dataset path ``datasets`` can read, a
    BIG-bench task (the sdist is read at most once, for all names together). Raises :class:`LoriteError`
    naming the first bad one."""
    parsed = [parse_task_spec(spec) for spec in specs]
    for spec in parsed:
        if spec.source == "corpus" and spec.name not in corpora.CORPORA:
            raise LoriteError(f"unknown corpus {spec.name!r}; available: {', '.join(corpora.CORPORA)}")
        if spec.source == "file" and not Path(spec.name).exists():
            raise LoriteError(f"task file {spec.name!r} does not exist")
        if spec.source == "jsonl":
            rows.check_jsonl(spec.name)
        if spec.source == "hf":
            rows.check_hf(spec.name)
    names = [spec.name for spec in parsed if spec.source == "bigbench"]
    if names:
        bigbench.load_tasks(names)
    return parsed


def load_tasks(specs: list[str | TaskSpec]) -> dict[str, Task]:
    """The :class:`Task` of every spec (no corpora), keyed by the spec as given; BIG-bench names are read
    from the sdist in one pass."""
    parsed = {str(spec): parse_task_spec(spec) for spec in specs}
    given_corpora = [text for text, spec in parsed.items() if spec.is_corpus]
    if given_corpora:
        raise LoriteError(f"{given_corpora[0]!r} is a corpus, not a task of examples")
    named = bigbench.load_tasks([spec.name for spec in parsed.values() if spec.source == "bigbench"])
    readers = {"file": bigbench.load_task_file, "jsonl": rows.load_jsonl, "hf": rows.load_hf}
    return {
        text: named[spec.name] if spec.source == "bigbench" else readers[spec.source](spec.name)
        for text, spec in parsed.items()
    }


def load_task(spec: str | TaskSpec) -> Task:
    """The :class:`Task` a BIG-bench name, ``file:PATH``, ``jsonl:PATH`` or ``hf:PATH`` names."""
    return next(iter(load_tasks([spec]).values()))


def load_documents(spec: str | TaskSpec) -> list[Document]:
    """The documents of ``corpus:NAME``."""
    parsed = parse_task_spec(spec)
    if not parsed.is_corpus:
        raise LoriteError(f"{str(parsed)!r} is not a corpus (give corpus:NAME)")
    return corpora.load_corpus(parsed.name)
