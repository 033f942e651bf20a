"""A comparison whose run left a metrics.json that does not parse: the run counts as not run — ``compare``
says so, moves the folder aside and runs it again; ``compare --progress`` lists it as left, moving nothing."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_model_dir, write_task
from lorite.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def _layout(files, out):
    _, task = files
    name = f"file:{task}"
    good = out / name.replace("/", "__") / "adamw" / "lr0.001_seed0"
    bad = out / name.replace("/", "__") / "adamw" / "lr0.003_seed0"
    for folder in (good, bad):
        folder.mkdir(parents=True)
    (good / "metrics.json").write_text(json.dumps({"validation": {"score": 0.25}, "test": {"score": 0.2}}))
    (bad / "metrics.json").write_text('{"validation": {"sco')  # cut short
    (bad / "log.jsonl").write_text("")
    return name, good, bad


def test_progress_counts_a_run_with_a_broken_metrics_json_as_left(files, tmp_path, capsys):
    out = tmp_path / "cmp"
    name, _, bad = _layout(files, out)
    capsys.readouterr()
    argv = ["compare", "--tasks", name, "--optimizers", "adamw", "--lrs", "1e-3,3e-3", "--progress"]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Runs finished: 1; known to be left: 1;" in captured.out
    assert "Other run folders" not in captured.out and "lr0.003_seed0" not in captured.out
    note = [line for line in captured.err.splitlines() if "note:" in line]
    assert len(note) == 1 and f"{bad / 'metrics.json'} does not parse (" in note[0]
    assert "counts as not run; the next lorite compare runs it again" in note[0]
    assert (bad / "metrics.json").read_text() == '{"validation": {"sco', "--progress moves nothing"


def test_compare_runs_a_run_with_a_broken_metrics_json_again(files, tmp_path, capsys):
    model, _ = files
    out = tmp_path / "cmp"
    name, good, bad = _layout(files, out)
    capsys.readouterr()
    argv = ["compare", "--tasks", name, "--optimizers", "adamw", "--lrs", "1e-3,3e-3", "--no-zero-shot",
            "--model", str(model), "--rank", "4", "--steps", "2", "--batch-size", "2", "--n-validation", "8",
            "--n-test", "8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"lorite compare: note: {bad / 'metrics.json'} does not parse (" in err
    assert "it is run again (its old folder is now " in err
    rerun = json.loads((bad / "metrics.json").read_text())
    assert rerun["config"]["lr"] == pytest.approx(3e-3) and "validation" in rerun
    assert json.loads((good / "metrics.json").read_text())["validation"] == {"score": 0.25}, "kept as it was"
    (aside,) = (out / ".damaged").glob("*/*/adamw/lr0.003_seed0")
    assert aside.joinpath("metrics.json").read_text() == '{"validation": {"sco'
    results = json.loads((out / "results.json").read_text())
    grid = results["tasks"][name]["optimizers"]["adamw"]["grid"]
    assert grid == {"0.001": 0.25, "0.003": rerun["validation"]["score"]}
    assert not (out / ".lorite.lock").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"tasks": ["x"], "optimiz', "is not a readable JSON file"),
        (b"\xff\xfe", "is not a readable JSON file"),
        (None, "is not a readable JSON file"),  # a directory
        (b"[1]", "must hold a JSON object"),
        (b"{}", "'tasks' must be a non-empty list"),
        (b'{"tasks": ["x"], "optimizers": "adamw"}', "'optimizers' must be a non-empty list"),
        (b'{"tasks": ["x"], "optimizers": ["adamw"], "seeds": "3"}', "'seeds' must be a whole number"),
        (b'{"tasks": ["x"], "optimizers": ["adamw"], "training": 3}', "'training' must be a JSON object"),
        (b'{"tasks": ["x"], "optimizers": ["adamw"], "colour": 3}', "unknown keys ['colour']"),
    ],
)
def test_a_broken_compare_config_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"lorite compare: error: --config '{path}'") and message in err[0]
    ), err
    assert not (tmp_path / "out").exists()
