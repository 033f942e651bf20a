"""`lorite finetune` on 2 GPUs with NCCL (torchrun; DDP and FSDP2) equals one GPU for the same global batch,
and a run stopped at a checkpoint resumes on 2 GPUs to the same end. The gloo/CPU versions of these tests
run in CI (tests/train/test_distributed.py); these need a machine with two or more GPUs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_lorite, tiny_model_dir, write_task

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two or more GPUs"
)


def _args(model, task, out):
    return [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "lora_rite",
        "--lr", "1e-2", "--rank", "4", "--steps", "4", "--batch-size", "6", "--grad-accum", "2",
        "--n-validation", "12", "--n-test", "12", "--max-length", "64", "--device", "cuda",
        "--no-bf16",  # fp32, so that 1 and 2 GPUs differ only by NCCL's reduction order
        "--target-modules", "q_proj,v_proj", "--out", str(out),
    ]  # fmt: skip


def _run(args, gpus):
    run_lorite(args, gpus, env={"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))})


def _same(one_dir, two_dir):
    one = json.loads((one_dir / "metrics.json").read_text())
    two = json.loads((two_dir / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], rel=1e-4)
    assert two["validation"]["score"] == pytest.approx(one["validation"]["score"], abs=1e-6)
    a = load_file(one_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_gpus_equal_one(tmp_path, engine):
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    _run(_args(model, task, tmp_path / "one"), 1)
    _run([*_args(model, task, tmp_path / "two"), "--parallel", engine], 2)
    _same(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_gpus_resume(tmp_path, engine):
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    _run(_args(model, task, tmp_path / "one"), 1)
    two = tmp_path / "two"
    _run([*_args(model, task, two), "--parallel", engine, "--checkpoint-every", "2", "--stop-after", "2"], 2)
    assert json.loads((two / "checkpoint" / "train_state.json").read_text())["step"] == 2
    _run(["finetune", "--resume", str(two)], 2)
    _same(tmp_path / "one", two)
