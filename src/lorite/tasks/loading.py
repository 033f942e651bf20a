"""A task's data as the training loop and the evaluator consume it, and the evaluation of one split.

* tasks of examples (BIG-bench, ``file:``, ``jsonl:``, ``hf:``): the examples split by
  :func:`lorite.tasks.splits.split_examples`; training examples are encoded (prompt tokens without loss,
  answer tokens — a chat example's assistant turns — with loss), validation and test stay examples, scored
  by :func:`lorite.tasks.evaluation.evaluate_task`.
* ``corpus:NAME``: the documents split by :func:`lorite.tasks.splits.split_documents`, each split packed
  into blocks of ``min(max_length, 512)`` tokens; validation and test are scored by perplexity.
* a mixture ``A+B+C`` (:class:`MixtureData`): every member's :class:`TaskData`, its training split capped
  at ``max_examples_per_task``; every member scored on its own examples (the example tasks' answers
  generated in shared batches, :func:`lorite.tasks.evaluation.evaluate_tasks`), ``score`` the macro mean
  (:mod:`lorite.tasks.mixture`).

The same spec, tokenizer and split settings always give the same data, so every optimizer, method and
seed of a comparison trains and is scored on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.blocks import pack_blocks, tokenize_documents
from .encoding import collate, encode_examples, require_chat_template
from .evaluation import evaluate_task, evaluate_tasks, perplexity
from .mixture import DEFAULT_MAX_EXAMPLES_PER_TASK, capped_sizes, macro_metrics
from .spec import MixtureSpec, TaskSpec, load_documents, load_task, load_tasks, parse_spec, parse_task_spec
from .splits import split_documents, split_examples
from .task import Task

CORPUS_BLOCK_LIMIT = 512  # tokens per block of a corpus task (the evaluation's memory stays bounded)


@dataclass
class TaskData:
    """The encoded training split and the evaluated splits of one task."""

    kind: str  # "multiple_choice" | "generation" | "language_model"
    train: Any  # list of Encoded examples, or token blocks (N, L)
    validation: Any  # examples, or token blocks
    test: Any
    task: Task | None = None  # the task of examples, for evaluation

    @property
    def n_train(self) -> int:
        return int(self.train.shape[0]) if self.kind == "language_model" else len(self.train)


@dataclass
class MixtureData:
    """The :class:`TaskData` of every member of a mixture (member spec → data, in the mixture's order;
    training splits capped). ``train`` is the members' encoded training examples laid end to end, member
    0 first (:class:`lorite.tasks.mixture.MixtureSampler` indexes into it)."""

    members: dict[str, TaskData]
    kind: str = "mixture"

    def __post_init__(self) -> None:
        self.train = [item for data in self.members.values() for item in data.train]

    @property
    def train_sizes(self) -> list[int]:
        return [data.n_train for data in self.members.values()]

    @property
    def n_train(self) -> int:
        return len(self.train)


def load_task_data(
    spec: str | TaskSpec | MixtureSpec,
    tokenizer,
    split_seed: int = 0,
    n_validation: int = 200,
    n_test: int = 400,
    max_length: int = 512,
    encode_train: bool = True,
    max_examples_per_task: int = DEFAULT_MAX_EXAMPLES_PER_TASK,
) -> TaskData | MixtureData:
    """Load and split the task ``spec`` names; encode its training split unless ``encode_train`` is false
    (evaluation only: the training list is then empty). A mixture gives :class:`MixtureData`, every
    member split with ``split_seed`` and trained on at most ``max_examples_per_task`` of its training
    examples (``max_examples_per_task`` applies to mixtures only)."""
    spec = parse_spec(spec)
    if isinstance(spec, MixtureSpec):
        tasks = load_tasks(list(spec.members))  # BIG-bench members in one pass over the sdist
        members = {}
        for name, task in tasks.items():
            if task.chat:
                require_chat_template(tokenizer, task.name)
            examples = split_examples(task, split_seed, n_validation, n_test)
            (cap,) = capped_sizes([len(examples.train)], max_examples_per_task)
            train = encode_examples(task, examples.train[:cap], tokenizer, max_length) if encode_train else []
            members[name] = TaskData(task.kind, train, examples.validation, examples.test, task)
        return MixtureData(members)
    if spec.is_corpus:
        splits = split_documents(load_documents(spec), seed=split_seed)
        block = min(max_length, CORPUS_BLOCK_LIMIT)

        def blocks(documents):
            return tokenize_documents(tokenizer, [d.text for d in documents], block)

        train = blocks(splits.train) if encode_train else torch.zeros((0, block), dtype=torch.long)
        return TaskData("language_model", train, blocks(splits.validation), blocks(splits.test))
    task = load_task(spec)
    if task.chat:  # before anything is trained: the evaluation needs the template too
        require_chat_template(tokenizer, task.name)
    examples = split_examples(task, split_seed, n_validation, n_test)
    train = encode_examples(task, examples.train, tokenizer, max_length) if encode_train else []
    return TaskData(task.kind, train, examples.validation, examples.test, task)


def evaluate_split(
    model,
    tokenizer,
    data: TaskData | MixtureData,
    split: str,
    batch_size: int = 32,
    progress: bool = False,
    classification_score: str = "rouge_l",
) -> dict:
    """Metrics of ``model`` on ``split`` ("validation" or "test") of ``data``; ``score`` is the number
    learning rates are chosen by (accuracy, ROUGE-L — or exact match for classification with
    ``classification_score="exact_match"`` —, or −perplexity; of a mixture the macro mean over its
    members, each member's metrics under ``per_task``)."""
    if isinstance(data, MixtureData):
        # the example tasks' members evaluated together (shared generation batches), corpora on their own
        examples = {
            name: (member.task, getattr(member, split))
            for name, member in data.members.items()
            if member.kind != "language_model"
        }
        together = evaluate_tasks(model, tokenizer, examples, batch_size, progress, classification_score)
        return macro_metrics(
            {
                name: together[name]
                if name in together
                else evaluate_split(
                    model, tokenizer, member, split, batch_size, progress, classification_score
                )
                for name, member in data.members.items()
            }
        )
    examples = getattr(data, split)
    if data.kind == "language_model":
        value = perplexity(model, examples, batch_size=max(1, batch_size // 4))
        return {"perplexity": value, "score": -value, "n_tokens": int(examples.numel())}
    return evaluate_task(
        model, tokenizer, data.task, examples, batch_size, progress=progress,
        classification_score=classification_score,
    )  # fmt: skip


def heldout_blocks(tokenizer, corpus: str = "shakespeare", block_length: int = 512, n_blocks: int = 16):
    """The first ``n_blocks`` blocks of the held-out documents of ``corpus`` (those ``corpus:NAME``
    fine-tuning with split seed 0 never trains on), packed with the end-of-text token between documents;
    documents are tokenized only as far as needed."""
    heldout = split_documents(load_documents(f"corpus:{corpus}"), seed=0).heldout
    ids: list[list[int]] = []
    for document in heldout:
        if sum(len(t) + 1 for t in ids) >= n_blocks * block_length:
            break
        ids.append(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    return pack_blocks(ids, block_length, tokenizer.eos_token_id)[:n_blocks]


def calibration_batches(
    spec: str | TaskSpec, tokenizer, n: int, max_length: int = 256, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` single-example batches of training data (never a validation or test example), e.g. for a
    Fisher estimate: blocks of ``max_length`` tokens from the training documents of ``corpus:NAME``, or
    prompt + answer of the training split of a task (loss on the answer)."""
    spec = parse_task_spec(spec)
    generator = torch.Generator().manual_seed(seed)
    if spec.is_corpus:
        train = split_documents(load_documents(spec), seed=0).train
        # a few blocks from a random place in every training document (tokenizing whole corpora is slow)
        per_document = -(-n // len(train))
        window = per_document * max_length * 8  # characters: ≥ 8 per token would be unusual
        blocks = []
        for document in train:
            start = int(torch.randint(max(1, len(document.text) - window), (1,), generator=generator))
            ids = tokenizer(document.text[start : start + window], add_special_tokens=False)["input_ids"]
            blocks.append(pack_blocks([ids], max_length, None)[:per_document])
        stacked = torch.cat(blocks)
        pick = torch.randperm(stacked.shape[0], generator=generator)[:n]
        return [
            {"input_ids": b[None], "attention_mask": torch.ones_like(b[None]), "labels": b[None].clone()}
            for b in stacked[pick]
        ]
    task = load_task(spec)
    encoded = encode_examples(task, split_examples(task, 0).train, tokenizer, max_length)
    pick = torch.randperm(len(encoded), generator=generator)[:n].tolist()
    return [collate([encoded[i]], tokenizer.pad_token_id) for i in pick]
