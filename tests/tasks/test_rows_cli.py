"""``lorite finetune --task jsonl:FILE`` / ``hf:PATH`` end to end on the tiny model directory: prompt/completion,
chat and multiple-choice rows train, evaluate and write their metrics; a bad row is an error line, exit code 2."""

from __future__ import annotations

import json
import random

import pytest

from helpers import tiny_model_dir
from lorite.cli import main

WORDS = ["red", "blue", "green", "gold"]


def rows(kind: str, n: int = 40) -> list[dict]:
    """Rows whose answer is the first word of the question."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(3)]
        question = f"first of {' '.join(words)}?"
        if kind == "completion":
            out.append({"prompt": f"{question}\n", "completion": words[0]})
        elif kind == "chat":
            out.append({"messages": [{"role": "system", "content": "answer in one word"},
                                     {"role": "user", "content": question},
                                     {"role": "assistant", "content": words[0]}]})  # fmt: skip
        else:
            out.append({"prompt": f"{question}\n", "choices": WORDS, "answer": words[0]})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("rows_cli") / "model")


def finetune(capsys, model_dir, spec, out):
    argv = ["finetune", "--task", spec, "--model", str(model_dir), "--steps", "3", "--device", "cpu",
            "--out", str(out), "--rank", "4", "--batch-size", "4", "--n-validation", "4", "--n-test", "6",
            "--optimizer", "adamw", "--lr", "1e-3"]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads((out / "metrics.json").read_text())


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_finetune_on_generation_rows_writes_their_metrics(capsys, model_dir, tmp_path, kind):
    data = write_jsonl(tmp_path / f"{kind}.jsonl", rows(kind))
    metrics = finetune(capsys, model_dir, f"jsonl:{data}", tmp_path / "run")
    assert metrics["config"]["task"] == f"jsonl:{data}" and len(metrics["history"]["loss"]) == 3
    for split, n in (("validation", 4), ("test", 6)):
        scores = metrics[split]
        assert {"exact_match", "rouge_l", "perplexity", "score", "n", "samples"} <= set(scores)
        assert (
            scores["n"] == n and scores["score"] == scores["rouge_l"] and len(scores["samples"]) == min(5, n)
        )
        assert 0 <= scores["exact_match"] <= 1 and 0 <= scores["rouge_l"] <= 1 and scores["perplexity"] > 1


def test_finetune_on_multiple_choice_rows_reports_accuracy_and_acc_norm(capsys, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", rows("multiple_choice"))
    metrics = finetune(capsys, model_dir, f"jsonl:{data}", tmp_path / "run")
    for split, n in (("validation", 4), ("test", 6)):
        scores = metrics[split]
        assert scores["n"] == n and scores["score"] == scores["accuracy"]
        assert scores["accuracy"] * n == round(scores["accuracy"] * n) and scores["acc_norm"] * n == round(
            scores["acc_norm"] * n
        )
        assert set(scores["answer_shares"]) <= set(WORDS)


def test_finetune_on_a_saved_dataset(capsys, model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("chat"))}).save_to_disk(
            tmp_path / "ds"
        )
    finally:
        datasets.enable_progress_bars()
    metrics = finetune(capsys, model_dir, f"hf:{tmp_path / 'ds'}#train", tmp_path / "run")
    assert metrics["test"]["n"] == 6 and {"exact_match", "rouge_l", "perplexity"} <= set(metrics["test"])


def test_a_bad_row_is_one_line_and_exit_code_2(capsys, model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "choices": ["x"], "answer": 3}\n')
    code = main(
        ["finetune", "--task", f"jsonl:{data}", "--model", str(model_dir), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    # the first row passes the check before the model loads; the file is read in full after it
    assert code == 2 and err[-1].endswith(
        f"{data}: line 2: answer 3 is out of range for 1 choices (0 to 0)"
    ), err
    assert not (tmp_path / "r" / "metrics.json").exists()
