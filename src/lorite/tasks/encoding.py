"""Prompt encoding: task examples as prompts, prompts and answers as token ids — prompt tokens (not trained
on) + answer tokens (+ end token) — the padded batches the training loop and the evaluator consume, and
the log-probabilities of the labelled tokens both score with.

How a prompt is written depends on the task's ``prompt_format`` (:mod:`lorite.tasks.task`):

* ``"bigbench"``: with a tokenizer that has a chat template a prompt is one user turn (task prefix, input,
  choices) followed by the assistant's generation prompt; otherwise BIG-bench's plain format: prefix,
  input prefix, input, choices, output prefix;
* ``"plain"``: the example's input exactly as given, the answer right after it (TRL's standard
  prompt/completion: nothing is added between them);
* ``"chat"``: the example's conversation through the tokenizer's chat template. Training encodes the whole
  conversation with labels on every assistant turn from ``loss_from`` on (:func:`encode_chat`); the spans
  are found by rendering each prefix of the conversation (up to the turn's generation prompt, and up to the
  turn's end) and cutting the full rendering there, so they hold exactly what the template writes for the
  assistant — its content and its end-of-turn marker — whatever the template. A multiple-choice chat
  example trains on its correct choice as one more assistant turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LoriteError
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


def require_chat_template(tokenizer, task: str) -> None:
    """A :class:`LoriteError` unless ``tokenizer`` has a chat template (a chat task needs one)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LoriteError(
            f"task {task!r} is a chat task: the model's tokenizer needs a chat template (it has none); "
            "give prompt/completion rows for a model without one"
        )


def render_chat(
    tokenizer, messages: tuple[tuple[str, str], ...], generation_prompt: bool, task: str = ""
) -> str:
    """``messages`` (``(role, content)`` pairs) through the tokenizer's chat template, as text; with
    ``generation_prompt`` followed by what opens an assistant turn."""
    require_chat_template(tokenizer, task)
    from jinja2 import TemplateError  # comes with transformers (its chat-template engine)

    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as error:
        raise LoriteError(
            f"task {task!r}: the model's chat template refuses a conversation: {error}"
        ) from error


def format_prompt(task: Task, example: Example, tokenizer: Any | None = None) -> str:
    """The prompt whose continuation is the answer (see the module docstring)."""
    if task.chat:
        return render_chat(tokenizer, example.context, True, task.name)
    if task.prompt_format == "plain":
        return example.input
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
    output prefix such as ``"A:"``, nothing after a chat template's assistant turn; as given for a
    ``plain`` or ``chat`` task)."""
    if task.prompt_format != "bigbench":
        return example.answer
    chat = getattr(tokenizer, "chat_template", None)
    return example.answer if chat or task.output_prefix.endswith((" ", "\n")) else " " + example.answer


def choice_text(task: Task, choice: str, tokenizer) -> str:
    """A choice as it is scored after :func:`format_prompt`: as given for a ``plain`` or ``chat`` task and
    after a chat template, else after a space (BIG-bench's multiple-choice scoring)."""
    if task.prompt_format != "bigbench" or getattr(tokenizer, "chat_template", None):
        return choice
    return " " + choice


def chat_segments(
    tokenizer, messages: tuple[tuple[str, str], ...], loss_from: int = 0, task: str = ""
) -> list[tuple[str, bool]]:
    """The conversation rendered by the chat template, cut into ``(text, trained)`` pieces: ``trained``
    for what the template writes for each assistant turn from message ``loss_from`` on (between the
    rendering of the messages before it with the generation prompt, and the rendering up to and with it).
    A template that renders a turn differently once later turns follow (one that drops earlier reasoning,
    say) has no such spans: a :class:`LoriteError`."""
    full = render_chat(tokenizer, messages, False, task)
    cuts: list[tuple[int, int]] = []
    for index, (role, _) in enumerate(messages):
        if role != "assistant" or index < loss_from:
            continue
        start = render_chat(tokenizer, messages[:index], True, task)
        end = render_chat(tokenizer, messages[: index + 1], False, task)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise LoriteError(
                f"task {task!r}: the model's chat template renders message {index} (an assistant turn) "
                "differently once later turns follow; its tokens cannot be found for the loss"
            )
        cuts.append((len(start), len(end)))
    pieces, position = [], 0
    for start, end in cuts:
        pieces += [(full[position:start], False), (full[start:end], True)]
        position = end
    pieces.append((full[position:], False))
    return [(text, trained) for text, trained in pieces if text]


def encode_chat(
    tokenizer, messages: tuple[tuple[str, str], ...], loss_from: int, max_length: int, task: str = ""
) -> Encoded:
    """Tokens of the rendered conversation, labels on the assistant turns from ``loss_from`` on
    (:func:`chat_segments`; each piece tokenized on its own, as :func:`encode` tokenizes prompt and
    answer). Too long: the conversation loses tokens from its start."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, messages, loss_from, task):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Encoded(ids[-max_length:], labels[-max_length:])


def encode_example(task: Task, example: Example, tokenizer, max_length: int) -> Encoded:
    """The training encoding of one example: prompt without loss, answer with loss (see the module
    docstring)."""
    if task.chat:
        if example.is_multiple_choice:  # the correct choice as the assistant's answer
            messages = (*example.messages, ("assistant", example.answer))
            return encode_chat(tokenizer, messages, len(example.messages), max_length, task.name)
        return encode_chat(tokenizer, example.messages, example.loss_from, max_length, task.name)
    prompt = format_prompt(task, example, tokenizer)
    return encode(tokenizer, prompt, answer_text(task, example, tokenizer), max_length)


def encode_examples(task: Task, examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    return [encode_example(task, ex, tokenizer, max_length) for ex in examples]


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


# labelled positions per head call when no gradient is needed: an evaluation batch of 128 long answers
# has ~16k of them, whose fp32 logits and log-softmax over a 49k vocabulary would take 6 GB at once
EVAL_HEAD_CHUNK = 2048


def target_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens: ``(log_probs (T,), row_index (T,))`` for the T positions
    whose label is not IGNORE, computing the head only there (the vocabulary is 49k wide) — and, without
    autograd, ``EVAL_HEAD_CHUNK`` positions at a time (the same values, a bounded memory peak)."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    states, labels = hidden[:, :-1][keep], targets[keep][:, None]
    step = EVAL_HEAD_CHUNK if not torch.is_grad_enabled() else max(1, states.shape[0])
    log_probs = torch.cat(
        [
            torch.log_softmax(head(states[at : at + step]).float(), dim=-1).gather(1, labels[at : at + step])
            for at in range(0, states.shape[0], step)
        ]
        or [states.new_zeros((0, 1), dtype=torch.float32)]
    ).squeeze(1)
    return log_probs, rows


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch."""
    log_probs, _ = target_log_probs(model, batch)
    return -log_probs.mean()
