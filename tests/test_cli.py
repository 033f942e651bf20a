"""The lorite command: bad input is one line on stderr and exit code 2 — never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def finetune_args(files, *extra):
    model, task = files
    return ["finetune", "--task", f"file:{task}", "--model", str(model), "--rank", "4", "--steps", "2",
            "--batch-size", "2", "--n-validation", "8", "--n-test", "8", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--tasks", "x", "--optimizers", "adamw", "--lrs", "fast"], "does not parse"),
        (["compare", "--tasks", "x", "--optimizers", "sgdx"], "unknown optimizer 'sgdx'"),
        (["finetune", "--task", "file:/nope/task.json"], "task file '/nope/task.json' does not exist"),
        (["finetune", "--task", "corpus:tolstoy"], "unknown corpus 'tolstoy'"),
        (["finetune", "--task", "x", "--lr", "abc"], "invalid float value: 'abc'"),
        (["finetune", "--resume", "/nope"], "no checkpoint there"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, argv)
    assert code == 2
    assert len(err) == 1 and message in err[0], err


def test_unknown_model_path_and_rank_too_large(capsys, files, tmp_path):
    code, err = run(capsys, finetune_args(files, "--model", "/no/model", "--out", str(tmp_path / "a")))
    assert code == 2 and len(err) == 1 and "model path '/no/model' does not exist" in err[0]
    code, err = run(capsys, finetune_args(files, "--rank", "64", "--out", str(tmp_path / "b")))
    assert code == 2 and "--rank 64 is larger than layer" in err[-1]
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_finetune_then_refuse_to_overwrite(capsys, files, tmp_path):
    out = tmp_path / "run"
    code, _ = run(capsys, finetune_args(files, "--out", str(out), "--optimizer", "adamw", "--lr", "1e-3"))
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "adamw" and "test" in metrics
    code, err = run(capsys, finetune_args(files, "--out", str(out)))
    assert code == 2 and len(err) == 1 and "already holds a run" in err[0]
    assert json.loads((out / "metrics.json").read_text()) == metrics, "the saved run is untouched"


def test_finetune_resume_from_the_command_line(capsys, files, tmp_path):
    out = tmp_path / "resumable"
    code, _ = run(capsys, finetune_args(files, "--out", str(out), "--checkpoint-every", "1"))
    assert code == 0 and (out / "checkpoint" / "train_state.json").exists()
    (out / "metrics.json").unlink()
    code, _ = run(capsys, ["finetune", "--resume", str(out)])
    assert code == 0 and (out / "metrics.json").exists()


def test_compare_progress_prints_the_partial_table_and_trains_nothing(capsys, files, tmp_path):
    _, task = files
    name, out = f"file:{task}", tmp_path / "cmp"
    folder = out / name.replace("/", "__") / "adamw" / "lr0.001_seed0"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"validation": {"score": 0.25}, "test": {"score": 0.2}}))
    argv = ["compare", "--tasks", name, "--optimizers", "adamw", "--lrs", "1e-3,3e-3", "--progress"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Runs finished: 1; known to be left: 1; seed runs after the grids still running: 0" in printed
    assert "| adamw | 1e-3: 25.0, 3e-3: · | 1e-3 (so far) | after the grid | · |" in printed
    assert sorted(p.name for p in out.iterdir()) == [name.replace("/", "__")], "nothing written"
    code, err = run(capsys, [*argv, "--out", str(tmp_path / "none")])
    assert code == 2 and len(err) == 1 and "is not a folder" in err[0], err
    code, err = run(capsys, [*argv, "--out", str(out), "--report", str(out)])
    assert code == 2 and len(err) == 1 and "give a folder of its own" in err[0], err
    code, err = run(capsys, [*argv[:-1], "--out", str(out), "--report", str(tmp_path / "r")])
    assert code == 2 and len(err) == 1 and "--report goes with --progress" in err[0], err


def test_compare_progress_report_writes_the_finished_tasks(capsys, files, tmp_path):
    _, task = files
    name, out, report = f"file:{task}", tmp_path / "cmp", tmp_path / "report"
    for lr, seed, score in [(1e-3, 0, 0.25), (3e-3, 0, 0.5), (3e-3, 1, 0.5)]:
        folder = out / name.replace("/", "__") / "adamw" / f"lr{lr:g}_seed{seed}"
        folder.mkdir(parents=True)
        metrics = {
            "validation": {"score": score},
            "test": {"score": 0.2 + seed / 10},
            "seconds_per_step": 0.5,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
    argv = ["compare", "--tasks", name, "--optimizers", "adamw", "--lrs", "1e-3,3e-3", "--seeds", "2"]
    assert main([*argv, "--widen", "0", "--out", str(out), "--progress", "--report", str(report)]) == 0
    assert "report of the finished tasks" in capsys.readouterr().out
    results = json.loads((report / "results.json").read_text())
    assert results["tasks"][name]["optimizers"]["adamw"]["test_score"][0] == pytest.approx(0.25)
    assert "25.0 ± 7.1" in (report / "report.md").read_text()
    assert not (out / "results.json").exists(), "the comparison itself stays resumable"


def test_evaluate_gives_a_runs_own_numbers_again_and_the_base_model_zero_shot(capsys, files, tmp_path):
    model, task = files
    out = tmp_path / "run"
    argv = finetune_args(files, "--out", str(out), "--optimizer", "adamw", "--lr", "3e-2", "--steps", "4")
    assert main([*argv, "--device", "cpu"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()

    assert main(["evaluate", "--run", str(out), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    for split in ("validation", "test"):
        assert again[split]["score"] == pytest.approx(saved[split]["score"], abs=1e-9), split
        assert again[split]["n"] == saved[split]["n"] == 8
    assert again["adapter"] == str(out / "adapter")
    assert json.loads(capsys.readouterr().out) == again, "printed as written"

    base = [
        "evaluate",
        "--task",
        f"file:{task}",
        "--model",
        str(model),
        "--n-validation",
        "8",
        "--n-test",
        "8",
    ]
    assert main([*base, "--device", "cpu"]) == 0
    zero_shot = json.loads(capsys.readouterr().out)
    assert zero_shot["adapter"] is None and zero_shot["test"]["n"] == 8
    assert 0 <= zero_shot["test"]["score"] <= 1

    for extra, message in [
        (["--run", str(out), "--out", str(tmp_path / "again.json")], "already exists"),
        (["--run", str(tmp_path)], "no metrics.json there"),
        (["--run", str(out), "--config", "x.json"], "leave out --config"),
        (["--run", str(out), "--task", "x"], "unknown BIG-bench task 'x'"),  # another task: names checked
        ([], "--task is required"),
    ]:
        code, err = run(capsys, ["evaluate", *extra])
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)


# ------------------------------------------------------------------ manners: version, help, --lr, --config
def test_version_and_help_show_defaults_and_choices(capsys, monkeypatch):
    from lorite import __version__
    from lorite.optim import available

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorite {__version__}"
    monkeypatch.setenv("COLUMNS", "250")  # one help entry per line: no wrapping inside "(default: 16)"
    assert main(["finetune", "--help"]) == 0
    text = capsys.readouterr().out
    rank = next(line for line in text.splitlines() if line.strip().startswith("--rank"))
    assert "(default: 16)" in rank
    optimizer = next(line for line in text.splitlines() if line.strip().startswith("--optimizer"))
    assert ", ".join(available()) in optimizer and "(default: lora_rite)" in optimizer
    assert "--schedule {cosine,linear,constant}" in text and "--parallel {none,ddp,fsdp2}" in text
    assert "(default: 1)" in next(
        line for line in text.splitlines() if line.strip().startswith("--keep-last")
    )
    for command in ("compare", "pretrain", "evaluate", "demo", "grow", "quantize", "federate"):
        assert main([command, "--help"]) == 0
    assert "(default: adamw)" in capsys.readouterr().out
    code, err = run(capsys, ["finetune", "--task", "x", "--optimizer", "sgdx"])
    assert code == 2 and len(err) == 1 and "invalid choice: 'sgdx'" in err[0], err


def test_without_lr_the_optimizers_own_default_is_used_and_recorded(capsys, files, tmp_path):
    from lorite.optim import default_lr

    out = tmp_path / "run"
    assert main(finetune_args(files, "--out", str(out), "--optimizer", "adamw", "--steps", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["lr"] == default_lr("adamw") == 1e-4
    assert json.loads(capsys.readouterr().out.split("\nadapter")[0])["lr"] == 1e-4, "and printed"


def test_finetune_config_file_with_command_line_overrides(capsys, files, tmp_path):
    model, task = files
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "task": f"file:{task}", "model": str(model), "optimizer": "adamw", "lr": 3e-3, "rank": 2, "seed": 3,
        "steps": 1, "batch_size": 2, "n_validation": 8, "n_test": 8, "dropout": 0.05, "bf16": False,
    }))  # fmt: skip
    out = tmp_path / "run"
    # the file gives the run; --rank 4 and --seed 0 (its default, given explicitly) override it
    code, err = run(
        capsys, ["finetune", "--config", str(config), "--out", str(out), "--rank", "4", "--seed", "0"]
    )
    assert code == 0, err
    saved = json.loads((out / "metrics.json").read_text())["config"]
    assert (saved["optimizer"], saved["lr"], saved["steps"], saved["dropout"]) == ("adamw", 3e-3, 1, 0.05)
    assert (saved["rank"], saved["seed"], saved["bf16"]) == (4, 0, False)
    assert saved["task"] == f"file:{task}" and saved["max_length"] == 512, "neither gives it: the default"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"task": "x", "rnk": 2, "lrate": 1}, "unknown keys ['lrate', 'rnk']"),
        ({"task": "x", "rank": "8"}, "rank='8' is not of type <class 'int'>"),
        ([1, 2], "must hold a JSON object of FinetuneConfig fields"),
        ({"rank": 4}, "--task is required"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_code_2(capsys, tmp_path, content, message):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(content))
    code, err = run(capsys, ["finetune", "--config", str(config), "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and message in err[0], err
    code, err = run(capsys, ["finetune", "--config", str(tmp_path / "none.json")])
    assert code == 2 and len(err) == 1 and "does not exist" in err[0], err


# ------------------------------------------------------------------ exit codes of run-time failures
def test_a_diverged_run_writes_its_metrics_and_exits_1(capsys, files, tmp_path):
    out = tmp_path / "run"
    argv = finetune_args(files, "--out", str(out), "--optimizer", "adamw", "--lr", "1e30", "--steps", "3")
    code, err = run(capsys, argv)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] is True and metrics["history"]["diverged_at"] in (2, 3)
    errors = [line for line in err if "error" in line]  # (the progress bar writes to stderr too)
    assert code == 1 and errors == err[-1:], err
    assert (
        f"the run diverged at step {metrics['history']['diverged_at']}" in err[-1] and "lr 1e+30" in err[-1]
    )


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 1 GiB"),
            "out of memory",
        ),
        (RuntimeError("NCCL error\n  in all_reduce"), "lorite finetune: error: NCCL error in all_reduce"),
        (
            OSError(28, "No space left on device", "run/checkpoint/training_state.pt"),
            "No space left on device (run/checkpoint/training_state.pt); what was saved before is intact",
        ),
    ],
    ids=["out-of-memory", "runtime-error", "disk-full"],
)
def test_run_time_failures_are_one_line_and_exit_code_1(capsys, files, tmp_path, monkeypatch, error, message):
    from lorite.commands import finetune as command

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(command, "finetune", fail)
    code, err = run(capsys, finetune_args(files, "--out", str(tmp_path / "run")))
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert "Traceback" not in capsys.readouterr().err


def test_a_comparison_without_a_usable_run_exits_1_after_its_report(capsys, files, tmp_path):
    model, task = files
    out = tmp_path / "cmp"
    argv = ["compare", "--tasks", f"file:{task}", "--optimizers", "adamw", "--lrs", "1e30", "--model", str(model),
            "--steps", "3", "--batch-size", "2", "--n-validation", "8", "--n-test", "8", "--no-zero-shot",
            "--out", str(out)]  # fmt: skip
    code, err = run(capsys, argv)
    assert code == 1 and f"lorite compare: error: no usable run for adamw on file:{task}" in err[-1], err
    assert (out / "report.md").exists() and (out / "results.json").exists()
