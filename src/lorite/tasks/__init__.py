"""The task layer: what a task spec names, how it is split, shown to the model and scored.

==========================  ===================================================================
module                      what it holds
==========================  ===================================================================
:mod:`~lorite.tasks.spec`        the one parser of task specs and the loader of what they name
:mod:`~lorite.tasks.task`        the task model (:class:`Task`, :class:`Example`)
:mod:`~lorite.tasks.bigbench`    BIG-bench tasks from the ``bigbench`` sdist (a task source)
:mod:`~lorite.tasks.rows`        rows of your own (JSON Lines, ``datasets``) in TRL's formats (a task source)
:mod:`~lorite.tasks.splits`      the one train / validation / test split (examples and documents)
:mod:`~lorite.tasks.encoding`    prompts, token ids, batches, log-probabilities of labelled tokens
:mod:`~lorite.tasks.evaluation`  metrics: accuracy, acc_norm, exact match, ROUGE-L, perplexity, answer shares
:mod:`~lorite.tasks.loading`     a task's data for training and evaluation; held-out and calibration data
:mod:`~lorite.tasks.mixture`     task mixtures: per-task caps, temperature sampling, the data order, macro means
==========================  ===================================================================

A new task source is a parser branch in :mod:`~lorite.tasks.spec` and a loader producing a :class:`Task`
(or documents); everything above this layer takes specs and never parses them itself.
"""

from .loading import (
    MixtureData,
    TaskData,
    calibration_batches,
    evaluate_split,
    heldout_blocks,
    load_task_data,
)
from .mixture import MixtureSampler, mixture_probabilities
from .spec import (
    MixtureSpec,
    TaskSpec,
    check_task_specs,
    is_mixture,
    load_documents,
    load_task,
    load_tasks,
    parse_spec,
    parse_task_spec,
    spec_members,
)
from .splits import DocumentSplits, Splits, split_documents, split_examples
from .task import Example, Task

__all__ = [
    "DocumentSplits",
    "Example",
    "MixtureData",
    "MixtureSampler",
    "MixtureSpec",
    "Splits",
    "Task",
    "TaskData",
    "TaskSpec",
    "calibration_batches",
    "check_task_specs",
    "evaluate_split",
    "heldout_blocks",
    "is_mixture",
    "load_documents",
    "load_task",
    "load_task_data",
    "load_tasks",
    "mixture_probabilities",
    "parse_spec",
    "parse_task_spec",
    "spec_members",
    "split_documents",
    "split_examples",
]
