"""The task layer: the spec parser, the one split, the loader of a task's data, held-out and calibration
data (on fixture tasks and a stand-in corpus)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite.data import corpora
from lorite.data.blocks import tokenize_documents
from lorite.errors import LoriteError
from lorite.models import load_causal_lm
from lorite.tasks import (
    TaskSpec,
    calibration_batches,
    check_task_specs,
    evaluate_split,
    heldout_blocks,
    load_task,
    load_task_data,
    parse_task_spec,
    split_documents,
    split_examples,
)
from lorite.tasks.splits import heldout_count

DOCUMENTS = [
    (f"play_{i}", " ".join(["to be or not to be that is the question"] * (20 + i))) for i in range(12)
]


@pytest.fixture
def fake_corpus(monkeypatch):
    monkeypatch.setattr(corpora, "load_corpus", lambda name: [corpora.Document(t, x) for t, x in DOCUMENTS])
    monkeypatch.setitem(corpora.CORPORA, "plays", lambda: [corpora.Document(t, x) for t, x in DOCUMENTS])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tasks") / "model", hidden=64)


@pytest.mark.parametrize(
    ("text", "source", "name", "canonical"),
    [
        ("social_iqa", "bigbench", "social_iqa", "social_iqa"),
        ("bigbench:multiemo/products_sentence_en", "bigbench", "multiemo/products_sentence_en", None),
        ("  elementary_math_qa/question_only ", "bigbench", "elementary_math_qa/question_only", None),
        ("file:/data/task.json", "file", "/data/task.json", "file:/data/task.json"),
        ("corpus:shakespeare", "corpus", "shakespeare", "corpus:shakespeare"),
    ],
)
def test_spec_parser(text, source, name, canonical):
    spec = parse_task_spec(text)
    assert (spec.source, spec.name) == (source, name)
    assert str(spec) == (canonical or name)
    assert parse_task_spec(spec) is spec and spec.is_corpus == (source == "corpus")


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty task spec"), ("bigbench: ", "empty task spec"), ("file:", "nothing after 'file:'")],
)
def test_spec_parser_refuses_empty_specs(text, message):
    with pytest.raises(LoriteError, match=message):
        parse_task_spec(text)


def test_check_task_specs_names_the_bad_one(tmp_path, fake_corpus):
    task = write_task(tmp_path / "t" / "task.json")
    assert check_task_specs([f"file:{task}", "corpus:plays"]) == [
        TaskSpec("file", str(task)),
        TaskSpec("corpus", "plays"),
    ]
    with pytest.raises(LoriteError, match="unknown corpus 'tolstoy'"):
        check_task_specs(["corpus:tolstoy"])
    with pytest.raises(LoriteError, match=r"task file '/nope/task\.json' does not exist"):
        check_task_specs(["file:/nope/task.json"])
    with pytest.raises(LoriteError, match="is a corpus, not a task of examples"):
        load_task("corpus:plays")


def test_document_split_holds_out_a_tenth_in_two_halves():
    documents = list(range(25))
    splits = split_documents(documents, seed=3)
    assert heldout_count(25) == 2 and heldout_count(5) == 2 and heldout_count(40) == 4
    assert len(splits.validation) == 1 and len(splits.test) == 1 and len(splits.train) == 23
    assert sorted(splits.train + splits.heldout) == documents
    assert splits.heldout == sorted(splits.heldout)  # corpus order
    assert split_documents(documents, seed=3) == splits and split_documents(documents, seed=4) != splits


def test_file_task_data_uses_the_one_split(tmp_path, tiny_dir):
    _, tokenizer = load_causal_lm(str(tiny_dir))
    spec = f"file:{write_task(tmp_path / 'mc' / 'task.json', n=60)}"
    data = load_task_data(spec, tokenizer, split_seed=1, n_validation=8, n_test=10, max_length=48)
    expected = split_examples(load_task(spec), 1, 8, 10)
    assert data.kind == "multiple_choice" and data.validation == expected.validation
    assert data.test == expected.test and data.n_train == len(expected.train) == 60 - 18
    assert all(len(item.input_ids) <= 48 for item in data.train)
    bare = load_task_data(spec, tokenizer, split_seed=1, n_validation=8, n_test=10, encode_train=False)
    assert bare.train == [] and bare.test == data.test


def test_corpus_task_data_is_blocks_of_the_document_split(tiny_dir, fake_corpus):
    _, tokenizer = load_causal_lm(str(tiny_dir))
    data = load_task_data("corpus:plays", tokenizer, max_length=32)
    splits = split_documents(corpora.load_corpus("plays"), seed=0)
    assert data.kind == "language_model" and data.train.shape[1] == 32
    assert torch.equal(
        data.validation, tokenize_documents(tokenizer, [d.text for d in splits.validation], 32)
    )
    model, _ = load_causal_lm(str(tiny_dir))
    metrics = evaluate_split(model, tokenizer, data, "test", batch_size=8)
    assert metrics["perplexity"] > 1 and metrics["score"] == -metrics["perplexity"]
    assert metrics["n_tokens"] == data.test.numel()


def test_heldout_blocks_are_the_first_blocks_of_the_heldout_documents(tiny_dir, fake_corpus):
    _, tokenizer = load_causal_lm(str(tiny_dir))
    heldout = split_documents(corpora.load_corpus("shakespeare"), seed=0).heldout
    assert len(heldout) == 2  # max(2, 12 // 10)
    everything = tokenize_documents(tokenizer, [d.text for d in heldout], 32)
    assert torch.equal(heldout_blocks(tokenizer, "shakespeare", 32, 5), everything[:5])
    examples = calibration_batches("corpus:shakespeare", tokenizer, 6, 32)
    assert len(examples) == 6 and all(e["input_ids"].shape == (1, 32) for e in examples)
    assert (
        examples[0]["input_ids"].tolist()
        == calibration_batches("corpus:shakespeare", tokenizer, 6, 32)[0]["input_ids"].tolist()
    )
