"""The pre-training harness on a tiny LLaMA, CPU, synthetic corpora (char tokenizer): learning, exact
resume, refusal to overwrite, per-corpus evaluation, the schedule, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorite.cli import main
from lorite.data.blocks import build_token_cache
from lorite.errors import LoriteError
from lorite.models.llama import LLAMA_SIZES, build_llama, llama_config, parameter_count
from lorite.train.pretrain import PretrainConfig, pretrain
from pretraining_data import char_tokenizer, synthetic_corpora


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=root
    )


def tiny(cache, **overrides) -> PretrainConfig:
    settings = dict(
        size="tiny", lr=3e-3, tokens=32 * 8 * 12, block_length=32, batch_size=8, corpora=["prose", "code"],
        data=str(cache), eval_every=6, eval_blocks=8, log_every=3, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_llama_sizes_match_the_papers_configs():
    assert {k: (v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]) for k, v in LLAMA_SIZES.items()} == {
        "tiny": (32, 88, 2), "20m": (256, 688, 4), "60m": (512, 1376, 8), "130m": (768, 2048, 12),
        "350m": (1024, 2736, 24),
    }  # fmt: skip
    config = llama_config("60m")
    assert config.vocab_size == 49152 and config.num_attention_heads == config.num_key_value_heads == 8
    assert not config.tie_word_embeddings
    assert parameter_count("60m", 32000) == 58_073_600  # "60M" as GaLore counts it (T5 vocabulary)
    small, big = llama_config("20m"), llama_config("60m")  # LiGO: width ×2 and depth ×2, same head dim
    assert big.hidden_size == 2 * small.hidden_size and big.num_hidden_layers == 2 * small.num_hidden_layers
    assert big.hidden_size // big.num_attention_heads == small.hidden_size // small.num_attention_heads
    model = build_llama("tiny", vocab_size=50, seed=1)
    assert model.num_parameters() == parameter_count("tiny", 50)
    assert torch.equal(model.lm_head.weight, build_llama("tiny", vocab_size=50, seed=1).lm_head.weight)
    with pytest.raises(ValueError, match="unknown model size"):
        llama_config("7b")


def test_pretraining_learns_and_writes_its_run(cache, tmp_path):
    metrics = pretrain(tiny(cache), tmp_path / "run")
    curve = [v["ppl"] for v in metrics["validation"]]
    assert [v["step"] for v in metrics["validation"]] == [0, 6, 12]
    assert curve[0] > 60 and curve[-1] < 0.5 * curve[0]  # from ~uniform over 102 tokens to learned
    final = metrics["final"]
    assert set(final["by_corpus"]) == {"prose", "code"} and final["tokens"] == 12 * 8 * 32
    assert math.isclose(final["ppl"], math.exp(final["loss"]))
    moments = 2 * 4 * metrics["model_parameters"]  # AdamW: m and v in fp32, plus a step counter per tensor
    assert moments < metrics["optimizer_state_bytes"] < moments + 4 * 100
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"] == final
    assert (tmp_path / "run" / "model" / "config.json").exists()
    with pytest.raises(LoriteError, match="already holds a run"):
        pretrain(tiny(cache), tmp_path / "run")


def test_resumed_run_equals_the_uninterrupted_one(cache, tmp_path):
    full = pretrain(tiny(cache, checkpoint_every=4), tmp_path / "full")
    stopped = pretrain(tiny(cache, checkpoint_every=4), tmp_path / "split", stop_after=6)
    assert stopped["stopped_at"] == 6 and not (tmp_path / "split" / "model").exists()
    resumed = pretrain(tiny(cache, checkpoint_every=4), tmp_path / "split", resume=True)
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["validation"] == full["validation"] and resumed["train"] == full["train"]
    with pytest.raises(LoriteError, match="differ"):
        pretrain(tiny(cache, lr=1e-3), tmp_path / "split", resume=True)


def test_train_on_one_corpus_evaluate_on_both(cache, tmp_path):
    model = build_llama("tiny", vocab_size=102, seed=7)
    before = model.lm_head.weight.detach().clone()
    metrics = pretrain(tiny(cache, train_corpora=["prose"], eval_every=0), tmp_path / "run", model=model)
    assert not torch.equal(before, model.lm_head.weight)  # a passed model is trained in place
    final = metrics["final"]
    assert final["loss"] == pytest.approx(final["by_corpus"]["prose"]["loss"])  # the mix is prose only
    assert final["by_corpus"]["code"]["ppl"] > final["by_corpus"]["prose"]["ppl"]  # code never seen


def test_bad_settings_are_refused(cache, tmp_path):
    for overrides, message in [
        ({"size": "7b"}, "unknown model size"),
        ({"optimizer": "sgd9"}, "unknown optimizer"),
        ({"sampler": "curriculum"}, "unknown sampler"),
        ({"schedule": "step"}, "schedule"),
        ({"train_corpora": ["poetry"]}, "not among"),
        ({"tokens": 10}, "less than one optimizer step"),
        ({"block_length": 64}, "blocks of 32 tokens"),
        ({"optimizer_kwargs": {"nonsense": 1}}, "adamw"),
    ]:
        with pytest.raises(LoriteError, match=message):
            pretrain(tiny(cache, **overrides), tmp_path / "bad")


def test_cli_pretrain_runs_resumes_and_refuses(cache, tmp_path, capsys):
    out = tmp_path / "cli"
    common = [
        "pretrain",
        "--size",
        "tiny",
        "--data",
        str(cache),
        "--corpora",
        "prose,code",
        "--device",
        "cpu",
    ]
    common += ["--block-length", "32", "--batch-size", "8", "--eval-every", "0"]
    assert (
        main([*common, "--tokens", "2k", "--optimizer-args", '{"betas": [0.9, 0.95]}', "--out", str(out)])
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["total_steps"] == 7
    assert main([*common, "--tokens", "2k", "--out", str(out)]) == 2  # refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert main([*common, "--tokens", "lots", "--out", str(tmp_path / "x")]) == 2
    assert main([*common, "--tokens", "2k", "--optimizer-args", "[1]", "--out", str(tmp_path / "x")]) == 2
    assert main([*common, "--tokens", "2k", "--corpora", "prose,poetry", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lorite pretrain: error:") for line in err)
    assert not (tmp_path / "x").exists()

    pretrain(tiny(cache, eval_every=0), tmp_path / "stopped", stop_after=5)
    assert main(["pretrain", "--resume", str(tmp_path / "stopped")]) == 0
    assert json.loads((tmp_path / "stopped" / "metrics.json").read_text())["final"]["step"] == 12


def test_time_limit_stops_with_a_checkpoint_and_final_numbers(cache, tmp_path):
    metrics = pretrain(tiny(cache, time_limit=0.0, eval_every=0), tmp_path / "run")
    assert metrics["stopped"] == {"reason": "time_limit", "step": 1, "tokens": 8 * 32}
    assert metrics["final"]["step"] == 1 and math.isfinite(metrics["final"]["ppl"])
    resumed = pretrain(tiny(cache, eval_every=0), tmp_path / "run", resume=True)  # the limit may change
    assert resumed["final"]["step"] == 12 and "stopped" not in resumed
