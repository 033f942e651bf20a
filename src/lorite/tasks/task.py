"""The task model every source produces: a :class:`Task` of :class:`Example` s.

The fields follow BIG-bench's JSON task format (Srivastava et al., arXiv 2206.04615), which every task
source maps onto: a BIG-bench task by name, a ``task.json`` of your own, and the sources later added to
:mod:`lorite.tasks.spec`. Two kinds of task:

* **multiple choice** — every example has ``choices`` and the ``correct`` indices (the best-scored
  choices); the training target is the first correct choice, evaluation scores each choice by its
  log-likelihood;
* **generation** — examples have ``targets`` (one or several references); evaluation generates and
  compares by normalised exact match and ROUGE-L.

Corpora (``corpus:NAME``) are not tasks of examples: they load as documents and train as token blocks
(:mod:`lorite.tasks.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# BIG-bench's own defaults for JSON tasks (bigbench/api/json_task.py)
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "

KINDS = ("multiple_choice", "generation", "language_model")


@dataclass(frozen=True)
class Example:
    """One task example. Multiple choice: ``choices`` and the ``correct`` indices (highest score).
    Generation: ``targets``, the reference answers."""

    input: str
    choices: tuple[str, ...] = ()
    correct: tuple[int, ...] = ()
    targets: tuple[str, ...] = ()

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def answer(self) -> str:
        """The text the model is trained to produce."""
        return self.choices[self.correct[0]] if self.choices else self.targets[0]


@dataclass(frozen=True)
class Task:
    """A named set of examples with the prompt format they are shown in (see :mod:`lorite.tasks.encoding`)."""

    name: str
    kind: str  # "multiple_choice" | "generation"
    examples: tuple[Example, ...]
    description: str = ""
    task_prefix: str = ""
    input_prefix: str = DEFAULT_INPUT_PREFIX
    output_prefix: str = DEFAULT_OUTPUT_PREFIX
    choice_prefix: str = DEFAULT_CHOICE_PREFIX
    append_choices: bool = True
    metrics: tuple[str, ...] = field(default_factory=tuple)
