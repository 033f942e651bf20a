"""Prompt encoding of rows: plain prompt/completion, chat conversations through the template (labels exactly
on the assistant turns), multiple choice, truncation and the template's failures (on the tiny model's
character-level tokenizer: one token per character, ``<eos>`` one token)."""

from __future__ import annotations

import pytest

from helpers import tiny_model_dir
from lorite.errors import LoriteError
from lorite.tasks.encoding import IGNORE, chat_segments, encode_example, encode_examples, format_prompt
from lorite.tasks.rows import parse_row, rows_to_task

CHAT = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "ab"},
]
FULL = "<system>s<eos><user>hi<eos><assistant>yo<eos><user>q<eos><assistant>ab<eos>"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("encoding") / "model")


@pytest.fixture
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)  # fresh: a test may change its template


def task_of(*rows):
    return rows_to_task(((f"line {i + 1}", row) for i, row in enumerate(rows)), "rows", "rows.jsonl")


def labelled(encoded):
    return [i for i, label in enumerate(encoded.labels) if label != IGNORE]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_plain_prompt_completion_is_prompt_then_completion_and_end_token(tokenizer):
    task = task_of({"prompt": "Q:", "completion": " a"})
    (encoded,) = encode_examples(task, list(task.examples), tokenizer, max_length=64)
    assert format_prompt(task, task.examples[0], tokenizer) == "Q:", "no chat template for plain rows"
    assert encoded.input_ids == [*ids(tokenizer, "Q: a"), tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE, IGNORE, *ids(tokenizer, " a"), tokenizer.eos_token_id]


def test_chat_labels_are_exactly_the_assistant_turns(tokenizer):
    task = task_of({"messages": CHAT})
    encoded = encode_example(task, task.examples[0], tokenizer, max_length=512)
    assert encoded.input_ids == ids(tokenizer, FULL) and len(encoded.input_ids) == 55
    # "<system>s<eos><user>hi<eos><assistant>" is 30 tokens, "yo<eos>" 3, "<user>q<eos><assistant>" 19
    assert labelled(encoded) == [30, 31, 32, 52, 53, 54]
    assert [encoded.input_ids[i] for i in labelled(encoded)] == [encoded.labels[i] for i in labelled(encoded)]
    assert tokenizer.decode([encoded.labels[i] for i in labelled(encoded)]) == "yo<eos>ab<eos>"
    assert chat_segments(tokenizer, task.examples[0].messages) == [
        ("<system>s<eos><user>hi<eos><assistant>", False),
        ("yo<eos>", True),
        ("<user>q<eos><assistant>", False),
        ("ab<eos>", True),
    ]


def test_conversational_prompt_completion_labels_only_the_completion(tokenizer):
    task = task_of({"prompt": CHAT[:4], "completion": CHAT[4:]})
    encoded = encode_example(task, task.examples[0], tokenizer, max_length=512)
    assert encoded.input_ids == ids(tokenizer, FULL) and labelled(encoded) == [52, 53, 54]


def test_chat_prompt_is_the_conversation_before_the_last_assistant_turn(tokenizer):
    task = task_of({"messages": CHAT})
    prompt = format_prompt(task, task.examples[0], tokenizer)
    assert prompt == "<system>s<eos><user>hi<eos><assistant>yo<eos><user>q<eos><assistant>"


def test_multiple_choice_rows_train_on_the_correct_choice(tokenizer):
    plain = task_of({"prompt": "2+2=", "choices": ["3", "4"], "answer": "4"})
    encoded = encode_example(plain, plain.examples[0], tokenizer, max_length=64)
    assert encoded.input_ids == [*ids(tokenizer, "2+2=4"), tokenizer.eos_token_id] and labelled(encoded) == [
        4,
        5,
    ]
    chat = task_of({"prompt": CHAT[1:2], "choices": ["a", "b"], "answer": 1})
    assert format_prompt(chat, chat.examples[0], tokenizer) == "<user>hi<eos><assistant>"
    encoded = encode_example(chat, chat.examples[0], tokenizer, max_length=64)
    assert encoded.input_ids == ids(tokenizer, "<user>hi<eos><assistant>b<eos>") and labelled(encoded) == [
        20,
        21,
    ]


def test_a_long_conversation_loses_its_start(tokenizer):
    task = task_of({"messages": CHAT})
    encoded = encode_example(task, task.examples[0], tokenizer, max_length=10)
    assert encoded.input_ids == ids(tokenizer, FULL)[-10:] and labelled(encoded) == [7, 8, 9]


def test_chat_needs_a_template_that_keeps_earlier_turns(tokenizer):
    task = task_of({"messages": CHAT})
    tokenizer.chat_template = (  # drops the content of every assistant turn but the last
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<assistant><eos>"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(
        LoriteError, match=r"renders message 2 \(an assistant turn\) differently once later turns"
    ):
        encode_example(task, task.examples[0], tokenizer, max_length=64)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        LoriteError, match="task 'rows': the model's chat template refuses a conversation: roles must"
    ):
        encode_example(task, task.examples[0], tokenizer, max_length=64)
    tokenizer.chat_template = None
    with pytest.raises(
        LoriteError, match="task 'rows' is a chat task: the model's tokenizer needs a chat template"
    ):
        format_prompt(task, task.examples[0], tokenizer)


def test_parse_row_names_the_row_in_errors():
    with pytest.raises(LoriteError, match=r"^data\.jsonl: line 7: missing field 'completion'$"):
        parse_row({"prompt": "x"}, "data.jsonl: line 7")


def test_target_log_probs_are_those_of_the_full_logits_in_chunks_without_autograd(monkeypatch):
    """The head runs only at labelled positions, and in EVAL_HEAD_CHUNK pieces under no_grad (the memory
    peak of large evaluation batches): the values are those of log_softmax over the full logits."""
    import torch

    from helpers import tiny_llama
    from lorite.tasks import encoding

    model = tiny_llama()
    torch.manual_seed(1)
    input_ids = torch.randint(0, 64, (3, 9))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE  # a prompt without loss
    labels[2, 6:] = IGNORE  # padding
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    logits = model(input_ids=input_ids).logits[:, :-1].double()
    keep = labels[:, 1:] != IGNORE
    expected = torch.log_softmax(logits, -1).gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0][keep]

    with_grad, rows = encoding.target_log_probs(model, batch)
    with_grad.sum().backward()  # one head call, differentiable (training's loss)
    assert model.lm_head.weight.grad is not None
    monkeypatch.setattr(encoding, "EVAL_HEAD_CHUNK", 5)
    with torch.no_grad():
        chunked, chunked_rows = encoding.target_log_probs(model, batch)
    assert keep.sum() == 5 + 8 + 5 == chunked.numel()  # 5 per chunk: 4 chunks, the last of 3
    torch.testing.assert_close(chunked.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_grad.detach().double(), expected, rtol=0, atol=1e-5)
    assert chunked_rows.tolist() == rows.tolist() == [0] * 5 + [1] * 8 + [2] * 5
    batch["labels"] = torch.full_like(labels, IGNORE)  # nothing labelled: empty, not an error
    with torch.no_grad():
        empty, empty_rows = encoding.target_log_probs(model, batch)
    assert empty.shape == (0,) and empty_rows.shape == (0,)
