"""Federated data: digits partitions, and a BIG-bench task embedded with all-MiniLM-L6-v2 (real data)."""

from __future__ import annotations

import pytest
import torch

from lorite.errors import LoriteError
from lorite.federated.data import DataSpec, evaluate, initial_parameters, load_federated, partition_path


def test_digits_partition_is_cached_and_deterministic():
    spec = DataSpec(clients=5, alpha=0.2, seed=7, hidden=8)
    task = load_federated(spec)
    assert partition_path(spec).exists()
    again = load_federated(spec)
    assert [len(c) for c in task.clients] == [len(c) for c in again.clients]
    assert torch.equal(task.clients[3].inputs, again.clients[3].inputs)
    total = sum(task.client_sizes) + len(task.test)
    assert total == 1797 and len(task.test) == round(0.2 * 1797)
    assert task.num_features == 64 and task.num_classes == 10
    assert 0.0 <= evaluate(task, initial_parameters(task, 0))["accuracy"] <= 0.3  # an untrained model
    other = load_federated(DataSpec(clients=5, alpha=0.2, seed=8, hidden=8))
    assert not torch.equal(other.test.targets, task.test.targets)
    cnn = load_federated(DataSpec(clients=5, alpha=0.2, seed=7, model="cnn"))
    assert cnn.model.build()(cnn.test.inputs[:2]).shape == (2, 10)


def test_bad_data_specs():
    with pytest.raises(LoriteError, match="alpha"):
        DataSpec(alpha=0.0)
    with pytest.raises(LoriteError, match="cnn"):
        DataSpec(name="bigbench:emoji_movie", model="cnn")
    with pytest.raises(LoriteError, match="cannot give"):
        load_federated(DataSpec(clients=400, alpha=1.0, min_client_examples=5))


@pytest.mark.real_data
def test_bigbench_task_embedded_with_minilm(real_data):
    from lorite.federated.data import embed_texts

    vectors = torch.from_numpy(
        embed_texts(["The phone works great.", "This phone is excellent.", "It is raining in the mountains."])
    )
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # paraphrases are close, unrelated text is not

    spec = DataSpec(
        name="bigbench:multiemo/products_sentence_en", clients=4, alpha=1.0, max_examples=60, model="linear"
    )
    task = load_federated(spec)
    assert task.num_features == 384 and task.classes == ["ambivalent", "negative", "neutral", "positive"]
    assert sum(task.client_sizes) + len(task.test) == 60
    with pytest.raises(LoriteError, match="different choice sets"):  # each question has its own answers
        load_federated(DataSpec(name="social_iqa", clients=2, max_examples=20))


def test_a_damaged_partition_cache_is_rebuilt_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORITE_CACHE", str(tmp_path))
    spec = DataSpec(clients=3, alpha=0.5, seed=11, hidden=8)
    first = load_federated(spec)
    path = partition_path(spec)
    assert path.is_relative_to(tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # truncated: a torch zip archive that cannot be read
    again = load_federated(spec)
    assert "is damaged" in capsys.readouterr().err
    assert torch.equal(first.test.inputs, again.test.inputs) and len(first.clients) == len(again.clients) == 3
    assert load_federated(spec).test.inputs.shape == first.test.inputs.shape  # the rebuilt cache reads back
