"""The one split of every task into training, validation and test data.

Validation chooses learning rates and test reports; neither is ever trained on. Both splits are fixed by
``split_seed`` (the same for every run seed), so runs that differ in their seed or optimizer are scored on
the same examples.

* **Examples** (:func:`split_examples`): shuffled once with ``random.Random(seed)``; test takes the first
  ``n_test``, validation the next ``n_validation``, training the rest. Small tasks cap each of test and
  validation at 20% of the examples.
* **Documents** (:func:`split_documents`): whole documents are held out, ``max(2, N // 10)`` of the ``N``,
  chosen by ``random.Random(seed)``; the first half of the held-out documents (in corpus order) is
  validation, the second half test. Held-out prose for forgetting and quantization metrics is the union of
  the two (:attr:`DocumentSplits.heldout`): text that ``corpus:NAME`` fine-tuning never trains on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

from ..errors import LoriteError
from .task import Example, Task

Item = TypeVar("Item")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def split_examples(task: Task, seed: int = 0, n_validation: int = 200, n_test: int = 400) -> Splits:
    """Deterministic train/validation/test split of ``task`` by ``seed`` (see the module docstring)."""
    order = list(range(len(task.examples)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = min(n_test, n // 5)
    n_validation = min(n_validation, n // 5)
    if n - n_test - n_validation < 1:
        raise LoriteError(f"task {task.name!r} has only {n} examples; too few to split")
    pick = [task.examples[i] for i in order]
    return Splits(
        train=pick[n_test + n_validation :],
        validation=pick[n_test : n_test + n_validation],
        test=pick[:n_test],
    )


def heldout_count(n_documents: int) -> int:
    """How many of ``n_documents`` documents are held out: a tenth, and at least two (one per split)."""
    return max(2, n_documents // 10)


@dataclass(frozen=True)
class DocumentSplits:
    train: list
    validation: list
    test: list

    @property
    def heldout(self) -> list:
        """Every held-out document (validation then test, in corpus order)."""
        return self.validation + self.test


def split_documents(documents: list[Item], seed: int = 0) -> DocumentSplits:
    """Whole documents into train / validation / test (see the module docstring)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_heldout = heldout_count(len(documents))
    heldout = [documents[i] for i in sorted(order[:n_heldout])]
    train = [documents[i] for i in sorted(order[n_heldout:])]
    half = len(heldout) // 2
    return DocumentSplits(train, heldout[:half], heldout[half:])
