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
``A+B+C``              a **mixture** (:class:`MixtureSpec`) of the tasks above (no corpora), each
                       split on its own; a BIG-bench member may be a glob over the shipped name index
                       (``natural_instructions/*``, :func:`fnmatch.fnmatchcase`; groups of subtasks are
                       not matched), expanded in index order. A ``+`` always separates members, so a
                       path with a ``+`` in it cannot be named; a glob matching nothing and a task
                       named twice are errors
=====================  ==========================================================================

Every task is split by the one rule of :mod:`lorite.tasks.splits` (a dataset's own splits are not used
for validation or test).

:func:`check_task_specs` validates specs before anything heavy is loaded (an unknown corpus, a missing
file, an unreadable or malformed first row of a ``jsonl:`` file, ``hf:`` without ``datasets``, an unknown
BIG-bench name with "did you mean"), reading the BIG-bench sdist at most once for all of them;
:func:`load_task` and :func:`load_documents` load what a spec names (a ``jsonl:`` or ``hf:`` source is
read in full, every row checked, only then)."""

from __future__ import annotations

import fnmatch
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


@dataclass(frozen=True)
class MixtureSpec:
    """A task mixture ``A+B+C``: its member tasks (globs expanded), in the order given; each is split on
    its own and evaluated on its own (:mod:`lorite.tasks.mixture`)."""

    members: tuple[TaskSpec, ...]

    def __str__(self) -> str:
        return "+".join(str(member) for member in self.members)

    @property
    def is_corpus(self) -> bool:
        return False


MIXTURE_SEPARATOR = "+"
_GLOB_CHARACTERS = "*?["


def is_mixture(spec: str | TaskSpec | MixtureSpec) -> bool:
    """Whether ``spec`` names a mixture (a ``+`` or a BIG-bench glob); syntax only."""
    return isinstance(parse_spec(spec), MixtureSpec)


def parse_spec(spec: str | TaskSpec | MixtureSpec) -> TaskSpec | MixtureSpec:
    """The :class:`TaskSpec` of ``spec``, or its :class:`MixtureSpec` when it has members joined by ``+``
    or a BIG-bench glob (syntax and the shipped name index only: nothing is read or downloaded)."""
    if isinstance(spec, TaskSpec | MixtureSpec):
        return spec
    if not isinstance(spec, str):
        raise LoriteError(f"a task spec is a string, got {type(spec).__name__}")
    parts = spec.split(MIXTURE_SEPARATOR)
    if len(parts) == 1 and not _is_glob(_single(spec)):
        return _single(spec)
    if any(not part.strip() for part in parts):
        raise LoriteError(
            f"task mixture {_short(spec)!r}: an empty member (two '+' in a row, or one at an end)"
        )
    members: list[TaskSpec] = []
    for part in parts:
        member = _single(part)
        if member.is_corpus:
            raise LoriteError(
                f"task mixture {_short(spec)!r}: {str(member)!r} is a corpus; a mixture holds tasks of examples"
            )
        members += _expand(member) if _is_glob(member) else [member]
    seen: set[TaskSpec] = set()
    for member in members:
        if member in seen:
            raise LoriteError(f"task mixture {_short(spec)!r} names {str(member)!r} twice")
        seen.add(member)
    return MixtureSpec(tuple(members))


def spec_members(spec: str | TaskSpec | MixtureSpec) -> tuple[TaskSpec, ...]:
    """The single tasks of ``spec``: a mixture's members (globs expanded), or the task itself."""
    parsed = parse_spec(spec)
    return parsed.members if isinstance(parsed, MixtureSpec) else (parsed,)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_glob(spec: TaskSpec) -> bool:
    return spec.source == "bigbench" and any(c in spec.name for c in _GLOB_CHARACTERS)


def _expand(pattern: TaskSpec) -> list[TaskSpec]:
    """The BIG-bench tasks of the shipped index that the glob ``pattern`` matches (groups of subtasks, which
    have no examples of their own, left out), in index order."""
    names = bigbench.task_names()
    groups = {name.rsplit("/", 1)[0] for name in names if "/" in name}
    matched = [n for n in names if n not in groups and fnmatch.fnmatchcase(n, pattern.name)]
    if not matched:
        raise LoriteError(f"task glob {pattern.name!r} matches no BIG-bench task")
    return [TaskSpec("bigbench", name) for name in matched]


def parse_task_spec(spec: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` of ``spec`` (syntax only: nothing is read); a mixture is an error here (where
    one task is needed; :func:`parse_spec` takes both)."""
    parsed = parse_spec(spec)
    if isinstance(parsed, MixtureSpec):
        raise LoriteError(f"{_short(str(spec))!r} is a task mixture; one task is needed here")
    return parsed


def _single(spec: str | TaskSpec) -> TaskSpec:
    """One task spec (no mixture)."""
    if isinstance(spec, TaskSpec):
        return spec
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


def check_task_specs(specs: list[str | TaskSpec | MixtureSpec]) -> list[TaskSpec | MixtureSpec]:
    """Parse ``specs`` and check that each names something that exists: a known corpus, an existing file
    (a ``jsonl:`` file readable, its first row a good row), a dataset path ``datasets`` can read, a
    BIG-bench task (the sdist is read at most once, for all names together); every member of a mixture.
    Raises :class:`LoriteError` naming the first bad one (a mixture's member: which one); BIG-bench names
    are checked against the shipped index before anything is downloaded."""
    parsed = [parse_spec(spec) for spec in specs]
    for mixture in (spec for spec in parsed if isinstance(spec, MixtureSpec)):
        for number, member in enumerate(mixture.members, 1):
            try:
                _check_singles([member], download=False)
            except LoriteError as error:
                where = (
                    f"member {number} of {len(mixture.members)} of the task mixture {_short(str(mixture))!r}"
                )
                raise LoriteError(f"{error} ({where})") from error
    singles = [
        member for spec in parsed for member in (spec.members if isinstance(spec, MixtureSpec) else (spec,))
    ]
    _check_singles(singles)
    return parsed


def _check_singles(parsed: list[TaskSpec], download: bool = True) -> None:
    """:func:`check_task_specs` of single specs; BIG-bench names only against the shipped index unless
    ``download`` (then their task files are read, once for all)."""
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
    if names and download:
        bigbench.load_tasks(names)
    elif names:
        bigbench.check_names(names)


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
