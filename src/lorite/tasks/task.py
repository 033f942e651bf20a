"""The task model every source produces: a :class:`Task` of :class:`Example` s.

The fields follow BIG-bench's JSON task format (Srivastava et al., arXiv 2206.04615), which every task
source maps onto: a BIG-bench task by name, a ``task.json`` of your own, and the sources later added to
:mod:`lorite.tasks.spec`. Two kinds of task:

* **multiple choice** — every example has ``choices`` and the ``correct`` indices (the best-scored
  choices); the training target is the first correct choice, evaluation scores each choice by its
  log-likelihood;
* **generation** — examples have ``targets`` (one or several references); evaluation generates and
  compares by normalised exact match and ROUGE-L, and scores the references' perplexity.

How a prompt is written is the task's ``prompt_format`` (:mod:`lorite.tasks.encoding` renders it):

* ``"bigbench"`` — BIG-bench's prefixes around the input (or, when the tokenizer has a chat template, the
  input as one user turn);
* ``"plain"`` — the input is the prompt and the answer follows it, both exactly as given (TRL's "standard"
  prompt/completion rows: the text is ``prompt + completion``);
* ``"chat"`` — every example is a conversation (``messages``) rendered with the model's chat template;
  the training target is every assistant turn from ``loss_from`` on, the evaluated answer the last
  assistant turn (``targets``), generated from the conversation before it.

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
PROMPT_FORMATS = ("bigbench", "plain", "chat")
ROLES = ("system", "user", "assistant", "tool")  # the roles a chat message may have


@dataclass(frozen=True)
class Example:
    """One task example. Multiple choice: ``choices`` and the ``correct`` indices (highest score).
    Generation: ``targets``, the reference answers. A chat example also has its conversation,
    ``messages`` as ``(role, content)`` pairs: the whole conversation of a generation example (its last
    assistant turn is ``targets[0]``; assistant turns before message ``loss_from`` are prompt, never
    trained on), the prompt turns of a multiple-choice one."""

    input: str
    choices: tuple[str, ...] = ()
    correct: tuple[int, ...] = ()
    targets: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    loss_from: int = 0

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def answer(self) -> str:
        """The text the model is trained to produce."""
        return self.choices[self.correct[0]] if self.choices else self.targets[0]

    @property
    def context(self) -> tuple[tuple[str, str], ...]:
        """The messages a chat example's answer follows: all of them for multiple choice, those before
        the last assistant turn for generation."""
        if self.is_multiple_choice:
            return self.messages
        last = max(i for i, (role, _) in enumerate(self.messages) if role == "assistant")
        return self.messages[:last]


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
    prompt_format: str = "bigbench"  # one of PROMPT_FORMATS (see the module docstring)

    @property
    def chat(self) -> bool:
        """Whether the examples are conversations (they need a tokenizer with a chat template)."""
        return self.prompt_format == "chat"
