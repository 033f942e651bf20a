"""``lorite finetune --method lq_lora`` (the training glue of :mod:`lorite.train.methods.lq_lora`) and the
``lorite quantize`` job (:mod:`lorite.train.quantize`) on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers import tiny_model_dir, write_task
from lorite.adapters.lq_lora import load_lq_lora, quantized_layers
from lorite.cli import main
from lorite.data import corpora
from lorite.errors import LoriteError
from lorite.optim import find_lora_pairs
from lorite.train.finetune import FinetuneConfig, finetune

GRID = "nf2-b32-s8x256-fp32,nf3-b64-s8x256-fp32,nf3-b16-s4x256-fp32,nf4-b64-s8x256-fp32"  # small: fast tests


DOCUMENTS = [
    (f"play_{i}", " ".join(["to be or not to be that is the question"] * (20 + i))) for i in range(12)
]


@pytest.fixture
def fake_corpus(monkeypatch):
    monkeypatch.setattr(corpora, "load_corpus", lambda name: [corpora.Document(t, x) for t, x in DOCUMENTS])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("lq") / "model", hidden=64)


def test_cli_quantize_writes_model_and_report(tiny_dir, tmp_path, fake_corpus, capsys):
    out = tmp_path / "q"
    args = [
        "quantize",
        "--model",
        str(tiny_dir),
        "--budget",
        "3",
        "--rank",
        "4",
        "--max-iter",
        "3",
        "--grid",
        GRID,
    ]
    args += ["--eval-blocks", "2", "--block-length", "32", "--no-cache", "--fisher", "--n-calib", "3"]
    assert main([*args, "--calib-length", "32", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bits_per_param"] <= 3.0 and report["fisher"]
    assert report["perplexity"]["tokens"] == 64 and report["perplexity"]["quantized"] > 1
    assert "| bits/param of Q" in (out / "report.md").read_text()
    model, _ = load_lq_lora(out)
    assert len(quantized_layers(model)) == 14
    assert "bits/param" in capsys.readouterr().out
    # an occupied --out is refused, nothing is touched
    assert main([*args, "--out", str(out)]) == 2
    assert json.loads((out / "report.json").read_text()) == report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "2.1"], "below the smallest"),
        (["--budget", "-1"], "budget"),
        (["--rank", "0"], "rank"),
        (["--rank", "100"], "larger than the narrowest"),
        (["--init", "random"], "init"),
        (["--grid", "nf9-b1"], "bad quantization format"),
        (["--fisher", "--calib", "corpus:nope"], "unknown corpus"),
        (["--target-modules", "nothing_here"], "no nn.Linear"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, fake_corpus, capsys, extra, message):
    base = [
        "quantize",
        "--model",
        str(tiny_dir),
        "--no-cache",
        "--rank",
        "4",
        "--grid",
        GRID,
        "--max-iter",
        "2",
    ]
    code = main([*base, *extra, "--out", str(tmp_path / "x")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "x").exists()


def test_finetune_method_lq_lora_trains_saves_and_reloads(tiny_dir, tmp_path):
    task = write_task(tmp_path / "task" / "task.json")
    config = FinetuneConfig(
        task=f"file:{task}", model=str(tiny_dir), optimizer="lora_rite", lr=1e-2, rank=4, steps=3,
        batch_size=4, n_validation=8, n_test=8, eval_batch_size=8, max_length=48, method="lq_lora",
        method_args={"budget": 2.5, "max_iter": 3, "fisher": True, "n_calib": 2, "grid": GRID}, device="cpu",
    )  # fmt: skip
    result = finetune(config, out=tmp_path / "run", progress=False)
    assert len(result["history"]["loss"]) == 3 and "accuracy" in result["test"]
    model, _ = load_lq_lora(tmp_path / "run" / "lq_lora")
    assert len(find_lora_pairs(model).pairs) == 0  # loaded for inference: frozen
    trainable, _ = load_lq_lora(tmp_path / "run" / "lq_lora", is_trainable=True)
    assert len(find_lora_pairs(trainable).pairs) == 14
    # start a second run from the saved model
    again = dataclasses.replace(config, method_args={"quantized": str(tmp_path / "run" / "lq_lora")})
    assert len(finetune(again, progress=False)["history"]["loss"]) == 3


def test_finetune_method_args_are_checked(tiny_dir):
    config = FinetuneConfig(
        task="corpus:shakespeare", model=str(tiny_dir), method="lq_lora", rank=4, method_args={"bits": 3}
    )
    with pytest.raises(LoriteError, match="unknown"):
        finetune(config, progress=False)
