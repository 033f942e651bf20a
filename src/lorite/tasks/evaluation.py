"""Evaluation: multiple choice by per-choice log-likelihood (``accuracy``, and ``acc_norm`` with the
log-likelihood per character of the choice, as lm-eval-harness), generation by normalised exact match and
ROUGE-L of greedy answers and by the perplexity of the reference answers, language modelling by
perplexity. A generation task whose answers come from a small label set (:func:`is_classification`:
Yes/No, a category name) can be scored by exact match instead of ROUGE-L, as Super-NaturalInstructions
scores its classification tasks (``classification_score="exact_match"``). Batched, under ``torch.no_grad``, in eval mode, in a fixed order: the same model and examples
always give the same numbers."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable

import torch

from .encoding import (
    IGNORE,
    Encoded,
    choice_text,
    collate,
    encode,
    encode_examples,
    format_prompt,
    target_log_probs,
)
from .task import Example, Task


def _progress(items, description: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm  # optional dependency (lorite[all])

    return tqdm(items, desc=description, leave=False)


# ------------------------------------------------------------------------------------------- metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(ref) for ref in references))


_ROUGE = None


def rouge_l(prediction: str, references: Iterable[str]) -> float:
    """Best ROUGE-L F-measure of ``prediction`` against the references (Google's ``rouge-score``)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer  # optional dependency (lorite[all])

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return max(_ROUGE.score(ref, prediction)["rougeL"].fmeasure for ref in references)


CLASSIFICATION_MAX_LABELS = 20
"""At most this many distinct (normalised) reference answers make a generation task a classification."""
CLASSIFICATION_SCORES = ("rouge_l", "exact_match")
"""What ``score`` is for a classification task (:func:`evaluate_task`); generation is always ROUGE-L."""


def is_classification(task: Task, max_labels: int = CLASSIFICATION_MAX_LABELS) -> bool:
    """Whether ``task`` is a generation task whose answers form a label set: its examples' first
    references take at most ``max_labels`` distinct normalised values, each used by at least five examples
    on average (so a small task of free-form answers is not taken for one). Read off all the task's
    examples, so every split of a task is scored alike."""
    if task.kind != "generation":
        return False
    answers = [normalize_answer(ex.targets[0]) for ex in task.examples if ex.targets]
    labels = len(set(answers))
    return 0 < labels <= max_labels and len(answers) >= 5 * labels


def predicted_choices(scores: list[list[float]]) -> list[int]:
    """The highest-scoring choice of each example (ties go to the first)."""
    return [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]


def accuracy_from_scores(scores: list[list[float]], correct: list[tuple[int, ...]]) -> float:
    """Fraction of examples whose highest-scoring choice is a correct one (ties go to the first)."""
    hits = [choice in c for choice, c in zip(predicted_choices(scores), correct)]
    return sum(hits) / len(hits)


def length_normalized(scores: list[list[float]], examples: list[Example]) -> list[list[float]]:
    """Each choice's log-likelihood over the number of characters of the choice (lm-eval-harness's
    ``acc_norm``: long choices are not penalised for their length)."""
    return [
        [score / max(1, len(choice)) for score, choice in zip(row, ex.choices)]
        for row, ex in zip(scores, examples)
    ]


def answer_shares(answers: list[str], top: int = 5) -> dict[str, float]:
    """The ``top`` most frequent answers (normalised) and the fraction of examples giving each: shows a model
    that collapsed onto one answer (multirc's "No.") or leans on an answer prior (strategyqa's Yes/No)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {answer: count / len(answers) for answer, count in counts.most_common(top)}


# ------------------------------------------------------------------------------------------- scoring
def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def choice_log_likelihoods(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    batch_size: int = 16,
    max_length: int = 512,
    progress=False,
) -> list[list[float]]:
    """``sum log p(choice | prompt)`` for every choice of every example (BIG-bench's unnormalised
    multiple-choice score); the choice text is scored without an end token."""
    model.eval()
    device = _device(model)
    items: list[tuple[int, Encoded]] = []
    for index, ex in enumerate(examples):
        prompt = format_prompt(task, ex, tokenizer)
        for choice in ex.choices:
            answer = choice_text(task, choice, tokenizer)
            items.append((index, encode(tokenizer, prompt, answer, max_length, end=False)))
    # longest first: batches of similar length, and a memory peak found at once
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1].input_ids))
    totals = [0.0] * len(items)
    for chunk in _progress(list(_batches(order, batch_size)), f"scoring {task.name}", progress):
        batch = {
            k: v.to(device) for k, v in collate([items[i][1] for i in chunk], tokenizer.pad_token_id).items()
        }
        with _autocast(device):
            log_probs, rows = target_log_probs(model, batch)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(
            0, rows, log_probs.double()
        )
        for position, value in zip(chunk, sums.tolist()):
            totals[position] = value
    scores: list[list[float]] = [[] for _ in examples]
    for (index, _), value in zip(items, totals):
        scores[index].append(value)
    return scores


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    batch_size: int = 16,
    max_new_tokens: int = 48,
    max_length: int = 512,
    progress=False,
) -> list[str]:
    """Greedy answers, batched with left padding, stopping at the end token."""
    items = [(task, ex, max_new_tokens) for ex in examples]
    return _generate(model, tokenizer, items, batch_size, max_length, f"generating {task.name}", progress)


def _generate(
    model, tokenizer, items: list[tuple[Task, Example, int]], batch_size, max_length, what, progress
):
    """Greedy answers to ``(task, example, max_new_tokens)`` items of any tasks, batched by budget and then
    prompt length. A batch generates up to its largest budget and each answer is cut to its own: greedy
    tokens do not depend on how many more are generated after them, so an answer is the one its budget
    alone gives (up to the batch's padding, as in any batched evaluation)."""
    model.eval()
    device = _device(model)
    prompts = [
        tokenizer(format_prompt(task, ex, tokenizer), add_special_tokens=False)["input_ids"][-(max_length - budget) :]
        for task, ex, budget in items
    ]  # fmt: skip
    budgets = [budget for _, _, budget in items]
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], -len(prompts[i])))
    answers = [""] * len(prompts)
    for chunk in _progress(list(_batches(order, batch_size)), what, progress):
        length = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, length - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, length - len(prompts[i]) :] = 1
        with _autocast(device):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max(budgets[i] for i in chunk), do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(
                out[row, length : length + budgets[i]], skip_special_tokens=True
            ).strip()
    return answers


@torch.no_grad()
def answer_perplexity(
    model, tokenizer, task: Task, examples: list[Example], batch_size: int = 16, max_length: int = 512
) -> float:
    """``exp`` of the mean negative log-likelihood per answer token, the answer tokens being those training
    puts the loss on (:func:`lorite.tasks.encoding.encode_examples`: the first reference and its end
    token; every assistant turn of a chat example): the exponential of the validation loss."""
    ((total, count),) = _answer_nll(model, tokenizer, [(task, examples)], batch_size, max_length)
    return math.exp(total / count)


def _answer_nll(model, tokenizer, groups: list[tuple[Task, list[Example]]], batch_size, max_length):
    """``(summed NLL, answer tokens)`` of each ``(task, examples)`` group, its examples batched with those
    of the other groups."""
    model.eval()
    device = _device(model)
    encoded, owner = [], []
    for index, (task, examples) in enumerate(groups):
        rows = encode_examples(task, examples, tokenizer, max_length)
        encoded += rows
        owner += [index] * len(rows)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    totals, counts = [0.0] * len(groups), [0] * len(groups)
    for chunk in _batches(order, batch_size):
        batch = {
            k: v.to(device) for k, v in collate([encoded[i] for i in chunk], tokenizer.pad_token_id).items()
        }
        with _autocast(device):
            log_probs, rows = target_log_probs(model, batch)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(
            0, rows, -log_probs.double()
        )
        tokens = torch.bincount(rows, minlength=len(chunk))
        for i, value, n in zip(chunk, sums.tolist(), tokens.tolist()):
            totals[owner[i]] += value
            counts[owner[i]] += n
    return list(zip(totals, counts))


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    batch_size: int = 16,
    progress=False,
    classification_score: str = "rouge_l",
) -> dict:
    """Task metrics: ``accuracy`` and ``acc_norm`` for multiple choice; ``exact_match``, ``rouge_l`` and
    the references' ``perplexity`` for generation. ``score`` is the one used to pick learning rates:
    accuracy, or ROUGE-L — or, with ``classification_score="exact_match"``, exact match for a generation
    task that :func:`is_classification`; ``score_metric`` names it."""
    return evaluate_tasks(
        model, tokenizer, {task.name: (task, examples)}, batch_size, progress, classification_score
    )[task.name]


def evaluate_tasks(
    model,
    tokenizer,
    tasks: dict[str, tuple[Task, list[Example]]],
    batch_size: int = 16,
    progress=False,
    classification_score: str = "rouge_l",
    share_batches: bool | None = None,
) -> dict[str, dict]:
    """:func:`evaluate_task` of every ``name: (task, examples)`` (``{}`` for one without examples).

    ``share_batches`` (default: on GPUs, off on CPU): the generation tasks' answers and answer perplexities
    are computed in batches shared across tasks. A mixture's members have a few examples each, and one
    ``generate`` call per member leaves a GPU idle (a 49-member validation took 113–145 s that way on an
    H200 shared by 14 runs). On CPU, where time grows with the batch, sharing only adds padding and
    longer budgets (8 NI members × 5 examples, 2 threads: 104 s shared, 81 s member by member; the same
    scores). Either way each task's metrics are those of evaluating it alone."""
    if classification_score not in CLASSIFICATION_SCORES:
        raise ValueError(
            f"classification_score must be one of {', '.join(CLASSIFICATION_SCORES)}, got {classification_score!r}"
        )
    metrics: dict[str, dict] = {name: {} for name in tasks}
    generation = {name: pair for name, pair in tasks.items() if pair[1] and pair[0].kind != "multiple_choice"}
    for name, (task, examples) in tasks.items():
        if examples and task.kind == "multiple_choice":
            scores = choice_log_likelihoods(model, tokenizer, task, examples, batch_size, progress=progress)
            correct = [ex.correct for ex in examples]
            accuracy = accuracy_from_scores(scores, correct)
            chosen = [ex.choices[i] for ex, i in zip(examples, predicted_choices(scores))]
            metrics[name] = {
                "accuracy": accuracy,
                "acc_norm": accuracy_from_scores(length_normalized(scores, examples), correct),
                "score": accuracy,
                "n": len(examples),
                "answer_shares": answer_shares(chosen),
            }
    if not generation:
        return metrics
    if share_batches is None:
        share_batches = _device(model).type != "cpu"
    parts = [generation] if share_batches else [{name: pair} for name, pair in generation.items()]
    answers, nll = {}, {}
    for part in parts:
        items = [
            (task, ex, _answer_budget(tokenizer, examples))
            for task, examples in part.values()
            for ex in examples
        ]
        what = f"generating {next(iter(part))}" + (f" and {len(part) - 1} more" if len(part) > 1 else "")
        given = iter(_generate(model, tokenizer, items, batch_size, 512, what, progress))
        for (name, (_, examples)), pair in zip(
            part.items(), _answer_nll(model, tokenizer, list(part.values()), batch_size, 512)
        ):
            answers[name], nll[name] = [next(given) for _ in examples], pair
    for name, (task, examples) in generation.items():
        given, (total, count) = answers[name], nll[name]
        em = sum(exact_match(a, ex.targets) for a, ex in zip(given, examples)) / len(examples)
        rouge = sum(rouge_l(a, ex.targets) for a, ex in zip(given, examples)) / len(examples)
        by = "exact_match" if classification_score == "exact_match" and is_classification(task) else "rouge_l"
        metrics[name] = {
            "exact_match": em, "rouge_l": rouge, "perplexity": math.exp(total / count),
            "score": em if by == "exact_match" else rouge, "score_metric": by, "n": len(examples),
            "samples": given[:5], "answer_shares": answer_shares(given),
        }  # fmt: skip
    return metrics


def _answer_budget(tokenizer, examples: list[Example]) -> int:
    """New tokens to generate for a task: room for its references, 1.25 × their 95th-percentile length in
    tokens, within [8, 128]."""
    lengths = sorted(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for ex in examples for t in ex.targets
    )
    return min(128, max(8, int(1.25 * lengths[int(0.95 * (len(lengths) - 1))]) + 2))


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all tokens of ``blocks`` (N, L)."""
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with _autocast(device):
            log_probs, _ = target_log_probs(model, batch)
        total += float(-log_probs.double().sum())
        count += log_probs.numel()
    return math.exp(total / count)


__all__ = [
    "IGNORE",
    "accuracy_from_scores",
    "answer_perplexity",
    "answer_shares",
    "choice_log_likelihoods",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "generate_answers",
    "is_classification",
    "length_normalized",
    "normalize_answer",
    "perplexity",
    "predicted_choices",
    "rouge_l",
]
