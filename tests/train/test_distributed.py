"""`lorite finetune` under torchrun (gloo, CPU): DDP and FSDP2 give what one process gives for the same
global batch — the same loss curve, validation score and adapter weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model_dir, write_task


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finetune_args(model, task, out, optimizer):
    return [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", optimizer,
        "--lr", "1e-2", "--rank", "4", "--steps", "4", "--batch-size", "6", "--grad-accum", "2",
        "--n-validation", "12", "--n-test", "12", "--max-length", "64", "--device", "cpu",
        "--target-modules", "q_proj,v_proj", "--out", str(out),
    ]  # fmt: skip


def _run(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "lorite.cli", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", "-m", "lorite.cli", *args,
        ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "optimizer"), [("ddp", "lora_rite"), ("fsdp2", "lora_rite")])
def test_torchrun_equals_one_process(tmp_path, engine, optimizer):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    _run(_finetune_args(model, task, tmp_path / "one", optimizer), 1)
    _run([*_finetune_args(model, task, tmp_path / "two", optimizer), "--parallel", engine], 2)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], rel=1e-4)
    assert two["validation"]["score"] == pytest.approx(one["validation"]["score"], abs=1e-6)
    weights_one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5)


def test_parallel_engine_is_checked(tmp_path):
    from lorite.cli import main

    assert (
        main(["finetune", "--task", "social_iqa", "--parallel", "fsdp1", "--out", str(tmp_path / "x")]) == 2
    )
