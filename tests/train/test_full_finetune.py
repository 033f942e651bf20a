"""--method full: every weight trains, the whole model is saved and loads back; gradient checkpointing and
snapshots work for both methods; LoRA-pair optimizers are refused."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite.cli import main
from lorite.errors import LoriteError
from lorite.train.finetune import FinetuneConfig, data_for, evaluate, finetune


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def config(setup, **kw):
    model, task = setup
    base = dict(
        task=f"file:{task}", model=str(model), optimizer="adamw", lr=3e-3, method="full", steps=6,
        batch_size=4, n_validation=16, n_test=16, eval_batch_size=16, max_length=64,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def test_full_finetuning_trains_every_weight_and_saves_a_loadable_model(setup, tmp_path):
    from lorite.models import load_causal_lm

    out = tmp_path / "run"
    result = finetune(config(setup, steps=30), out=out, progress=False)
    base, tokenizer = load_causal_lm(setup[0])
    assert result["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    losses = result["history"]["loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, "the loss falls by half a nat at least"
    assert {p.name for p in (out / "model").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"

    tuned, tuned_tokenizer = load_causal_lm(out / "model")
    assert tuned_tokenizer.get_vocab() == tokenizer.get_vocab()
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert tuned_state.keys() == base_state.keys()
    assert all(tuned_state[k].dtype == torch.float32 for k in tuned_state), "saved in fp32, as trained"
    unchanged = [k for k in base_state if torch.equal(base_state[k], tuned_state[k])]
    assert unchanged == [], f"every weight trains, these did not: {unchanged}"
    # the saved model reproduces the run's own validation numbers
    cfg = config(setup, steps=30)
    again = evaluate(tuned, tuned_tokenizer, data_for(cfg, tuned_tokenizer), "validation", cfg, False)
    assert again == result["validation"]


def test_lora_pair_optimizers_are_refused_before_anything_is_written(setup, tmp_path):
    for name in ("lora_rite", "lora_plus", "scaled_adam", "shampoo", "lamb"):
        with pytest.raises(LoriteError, match="Use --optimizer adamw"):
            finetune(config(setup, optimizer=name), out=tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()
    with pytest.raises(LoriteError, match="unexpected keyword"):
        finetune(config(setup, optimizer_kwargs={"nonsense": 1}), progress=False)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_training(setup, method, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaMLP.forward  # inside the checkpointed decoder layer

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    kw = dict(method=method, steps=4, rank=4, target_modules="all-linear", skip_test=True)
    if method == "lora":
        kw.update(optimizer="lora_rite", lr=1e-2)
    plain = finetune(config(setup, **kw), progress=False)
    plain_calls, calls[:] = sum(calls), []
    checkpointed = finetune(config(setup, gradient_checkpointing=True, **kw), progress=False)
    assert sum(calls) == 2 * plain_calls, "each layer's forward is recomputed in the backward pass"
    assert plain_calls == 4 * 2, "4 steps × 2 layers with gradients"
    assert checkpointed["history"]["loss"] == pytest.approx(plain["history"]["loss"], rel=1e-5, abs=1e-6)
    assert checkpointed["config"]["gradient_checkpointing"] is True


@pytest.mark.parametrize(("method", "saved"), [("full", "model"), ("lora", "adapter")])
def test_save_every_writes_snapshots(setup, tmp_path, method, saved):
    kw = {"optimizer": "lora_rite", "lr": 1e-2, "rank": 4} if method == "lora" else {}
    out = tmp_path / method
    finetune(config(setup, method=method, steps=5, save_every=2, **kw), out=out, progress=False)
    snapshots = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snapshots == ["step_000002", "step_000004"]
    assert all((out / "snapshots" / s / saved).is_dir() for s in snapshots)
    assert (out / saved).is_dir(), "the final weights stay where they always were"
    assert json.loads((out / "metrics.json").read_text())["config"]["save_every"] == 2


def test_cli_full_method_and_bad_inputs(capsys, setup, tmp_path):
    model, task = setup
    args = ["finetune", "--task", f"file:{task}", "--model", str(model), "--steps", "2", "--batch-size", "2",
            "--n-validation", "8", "--n-test", "8", "--method", "full"]  # fmt: skip
    code = main(
        [*args, "--optimizer", "adamw", "--lr", "1e-3", "--save-every", "1", "--out", str(tmp_path / "ok")]
    )
    assert code == 0 and (tmp_path / "ok" / "model" / "model.safetensors").exists()
    assert (tmp_path / "ok" / "snapshots" / "step_000001" / "model").is_dir()
    capsys.readouterr()
    for extra, message in [
        (["--optimizer", "lora_rite"], "Use --optimizer adamw"),
        (["--optimizer", "adamw", "--save-every", "-1"], "--save-every must be >= 0"),
        (["--optimizer", "adamw", "--method", "fulll"], "--method 'fulll' is not supported"),
    ]:
        code = main([*args, *extra, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], (extra, err)
        assert not (tmp_path / "bad" / "metrics.json").exists()
