"""Prompt encoding: task examples as prompts, prompts and answers as token ids — prompt tokens (not trained
on) + answer tokens (+ end token) — the padded batches the training loop and the evaluator consume, and
the log-probabilities of the labelled tokens both score with.

With a tokenizer that has a chat template a prompt is one user turn (task prefix, input, choices) followed
by the assistant's generation prompt; otherwise BIG-bench's plain format: prefix, input prefix, input,
choices, output prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .task import Example, Task

IGNORE = -100  # label of positions that carry no loss


# --------------------------------------------------------------------------------------------- prompts
def user_text(task: Task, example: Example) -> str:
    """The task prefix, the input and (when the task appends them) the choices."""
    text = example.input
    if example.is_multiple_choice and task.append_choices:
        text += "".join(task.choice_prefix + choice for choice in example.choices)
    prefix = task.task_prefix.strip()
    return f"{prefix}\n\n{text.strip()}" if prefix else text.strip()


def format_prompt(task: Task, example: Example, tokenizer: Any | None = None) -> str:
    """The prompt whose continuation is the answer (see the module docstring)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text(task, example)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = example.input
    if example.is_multiple_choice and task.append_choices:
        text += "".join(task.choice_prefix + choice for choice in example.choices)
    return f"{task.task_prefix}{task.input_prefix}{text}{task.output_prefix}"


# --------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt


def encode(tokenizer, prompt: str, answer: str, max_length: int, end: bool = True) -> Encoded:
    """Tokens of ``prompt + answer`` (plus the tokenizer's EOS when ``end``), labels only on the answer.

    Too long: the prompt loses tokens from its start (the answer and the end of the prompt matter most).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if end and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_length - 1]
    room = max_length - len(answer_ids)
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def answer_text(task: Task, example: Example, tokenizer) -> str:
    """The answer as the model should write it after :func:`format_prompt` (a space after a plain-text
    output prefix such as ``"A:"``, nothing after a chat template's assistant turn)."""
    chat = getattr(tokenizer, "chat_template", None)
    return example.answer if chat or task.output_prefix.endswith((" ", "\n")) else " " + example.answer


def encode_examples(task: Task, examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    return [
        encode(tokenizer, format_prompt(task, ex, tokenizer), answer_text(task, ex, tokenizer), max_length)
        for ex in examples
    ]


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    length = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def decoder_and_head(model):
    """The transformer body and the output projection of a (peft-wrapped) causal LM, so that losses and
    scores apply the vocabulary-sized head only at the positions that need it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__} has no get_decoder()/get_output_embeddings()")
    return decoder, head


def target_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens: ``(log_probs (T,), row_index (T,))`` for the T positions
    whose label is not IGNORE, computing the head only there (the vocabulary is 49k wide)."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    logits = head(hidden[:, :-1][keep]).float()
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[keep][:, None]).squeeze(1)
    return log_probs, rows


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch."""
    log_probs, _ = target_log_probs(model, batch)
    return -log_probs.mean()
