"""The fine-tuning loop: it learns, it resumes exactly, it guards its output dir, it writes atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model_dir, write_task
from lorite.errors import LoriteError
from lorite.train.finetune import FinetuneConfig, batch_indices, finetune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def config(setup, **kw):
    model, task = setup
    base = dict(
        task=f"file:{task}", model=str(model), optimizer="lora_rite", lr=1e-2, rank=4, steps=6, batch_size=4,
        n_validation=16, n_test=16, eval_batch_size=16, max_length=64, target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def test_training_lowers_the_loss_and_saves_everything(setup, tmp_path):
    out = tmp_path / "run"
    result = finetune(config(setup, steps=30, lr=3e-2, target_modules="all-linear"), out=out, progress=False)
    losses = result["history"]["loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, "the loss must fall by half a nat at least"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation"]["n"] == 16 and "accuracy" in saved["test"]
    steps_time = 30 * saved["seconds_per_step"]  # the median step, times the steps: about the training time
    assert 0 < saved["seconds_evaluating"] < saved["seconds_total"]
    assert saved["seconds_total"] > saved["seconds_evaluating"] + 0.5 * steps_time
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_resume_equals_uninterrupted_training(setup, tmp_path):
    cfg = config(setup, steps=6, checkpoint_every=3, dropout=0.1)
    straight = finetune(cfg, out=tmp_path / "straight", progress=False)
    partial = finetune(cfg, out=tmp_path / "resumed", progress=False, stop_after=3)
    assert partial["stopped_at"] == 3
    resumed = finetune(cfg, out=tmp_path / "resumed", resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["validation"] == straight["validation"]
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_holding_a_run_is_refused(setup, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(LoriteError, match="already holds a run"):
        finetune(config(setup), out=out, progress=False)
    assert (out / "metrics.json").read_text() == "{}", "what was saved is untouched"


def test_rank_larger_than_a_layer_is_refused(setup):
    with pytest.raises(LoriteError, match="--rank 64 is larger than layer"):
        finetune(config(setup, rank=64), progress=False)


def test_data_order_is_a_function_of_seed_and_step_only():
    first = [batch_indices(10, 4, seed=1, step=s, micro=0, grad_accum=1) for s in range(5)]
    again = [batch_indices(10, 4, seed=1, step=s, micro=0, grad_accum=1) for s in range(5)]
    assert first == again
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)), "each epoch visits every example once"
    assert first != [batch_indices(10, 4, seed=2, step=s, micro=0, grad_accum=1) for s in range(5)]
    # accumulation: micro-batches of one step are the consecutive slices of the same stream
    assert batch_indices(10, 2, 1, step=1, micro=0, grad_accum=2) == first[1][:2]


def test_language_model_corpus_task(setup, monkeypatch, tmp_path):
    """corpus: tasks train on packed blocks and report perplexity (with a stand-in corpus)."""
    from lorite.data import corpora

    documents = [
        corpora.Document(f"d{i}", "the quick brown fox jumps over the lazy dog. " * 20) for i in range(20)
    ]
    monkeypatch.setitem(corpora.CORPORA, "toy", lambda: documents)
    monkeypatch.setenv("LORITE_CACHE", str(tmp_path))
    result = finetune(config(setup, task="corpus:toy", steps=8, max_length=32, lr=3e-2), progress=False)
    assert (
        result["validation"]["perplexity"] > 1
        and result["test"]["perplexity"] < result["history"]["loss"][0] ** 50
    )
