"""`lorite finetune` under torchrun (gloo, CPU): DDP and FSDP2 give what one process gives for the same
global batch — the same loss curve, validation score and adapter weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_lorite, tiny_model_dir, write_task


def _finetune_args(model, task, out, optimizer):
    return [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", optimizer,
        "--lr", "1e-2", "--rank", "4", "--steps", "4", "--batch-size", "6", "--grad-accum", "2",
        "--n-validation", "12", "--n-test", "12", "--max-length", "64", "--device", "cpu",
        "--target-modules", "q_proj,v_proj", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "optimizer"), [("ddp", "lora_rite"), ("fsdp2", "lora_rite")])
def test_torchrun_equals_one_process(tmp_path, engine, optimizer):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    run_lorite(_finetune_args(model, task, tmp_path / "one", optimizer), 1)
    run_lorite([*_finetune_args(model, task, tmp_path / "two", optimizer), "--parallel", engine], 2)
    _assert_same_as_one_process(tmp_path / "one", tmp_path / "two")


def _assert_same_as_one_process(one_dir, two_dir):
    one = json.loads((one_dir / "metrics.json").read_text())
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], rel=1e-4)
    assert two["validation"]["score"] == pytest.approx(one["validation"]["score"], abs=1e-6)
    weights_one = load_file(one_dir / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5)
    return two


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_torchrun_preempted_and_resumed_equals_one_process(tmp_path, engine):
    """2 ranks, checkpoint at step 2, the session ends there; ``--resume`` on 2 ranks finishes the run with
    the same losses, validation score and adapter as one uninterrupted process. Snapshots are written."""
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    run_lorite(_finetune_args(model, task, tmp_path / "one", "lora_rite"), 1)
    two = tmp_path / "two"
    first = [*_finetune_args(model, task, two, "lora_rite"), "--parallel", engine]
    run_lorite([*first, "--checkpoint-every", "2", "--save-every", "2", "--stop-after", "2"], 2)
    saved = json.loads((two / "checkpoint" / "train_state.json").read_text())
    assert saved["step"] == 2 and saved["world_size"] == 2 and len(saved["history"]["loss"]) == 2
    assert not (two / "metrics.json").exists()
    run_lorite(["finetune", "--resume", str(two)], 2)
    _assert_same_as_one_process(tmp_path / "one", two)
    snapshot = load_file(two / "snapshots" / "step_000002" / "adapter" / "adapter_model.safetensors")
    final = load_file(two / "adapter" / "adapter_model.safetensors")
    assert snapshot.keys() == final.keys()
    assert any(not torch.equal(snapshot[k], final[k]) for k in final)  # steps 3-4 changed the adapter
    # a checkpoint of 2 ranks is not resumed by one process
    result = subprocess.run(
        [sys.executable, "-m", "lorite.cli", "finetune", "--resume", str(two)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2 and "same number of processes" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "engine"), [(["--multi_gpu"], "ddp"), (["--use_fsdp", "--fsdp_version=2"], "fsdp2")]
)
def test_accelerate_launch_equals_one_process(tmp_path, flags, engine):
    """``accelerate launch`` without ``--parallel``: the engine follows accelerate's flags."""
    pytest.importorskip("accelerate")
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    run_lorite(_finetune_args(model, task, tmp_path / "one", "lora_rite"), 1)
    run_lorite(_finetune_args(model, task, tmp_path / "two", "lora_rite"), 2, accelerate_flags=flags)
    two = _assert_same_as_one_process(tmp_path / "one", tmp_path / "two")
    assert two["config"]["parallel"] == engine


@pytest.mark.parametrize(
    ("env", "parallel", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "ddp", "DeepSpeed ZeRO is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "none", "FSDP version 1 is not supported"),
        ({"ACCELERATE_USE_FSDP": "true"}, "fsdp2", "FSDP version 1 is not supported"),  # accelerate's default
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "ddp", "contradicts --parallel ddp"),
    ],
)
def test_unsupported_accelerate_engines_are_refused(monkeypatch, tmp_path, capsys, env, parallel, message):
    from lorite.cli import main

    for name in list(os.environ):
        if name.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(name)
    for name, value in {**env, "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    args = ["finetune", "--task", "social_iqa", "--device", "cpu", "--out", str(out), "--parallel", parallel]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    if "not supported" in message:
        assert "FSDP2" in error[0] and "DDP" in error[0]  # the error names what is supported
    assert not out.exists()  # refused before anything was written


def test_parallel_engine_is_checked(tmp_path):
    from lorite.cli import main

    assert (
        main(["finetune", "--task", "social_iqa", "--parallel", "fsdp1", "--out", str(tmp_path / "x")]) == 2
    )
