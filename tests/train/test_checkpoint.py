"""Checkpoints kept with ``keep_last``: ``RUN/checkpoint`` is the newest, the N - 1 before it are
``RUN/checkpoint-<step>``; each is complete and resumes exactly — in one process and under torchrun."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import run_lorite, tiny_model_dir, write_task
from lorite.errors import LoriteError
from lorite.train.checkpoint import kept_checkpoints, load_checkpoint, save_checkpoint
from lorite.train.finetune import FinetuneConfig, finetune


def folders(run_dir):
    """The checkpoint folders of ``run_dir`` (hidden temporaries included) with the step each holds."""
    return {
        p.name: json.loads((p / "train_state.json").read_text())["step"]
        for p in run_dir.iterdir()
        if p.name.startswith((".checkpoint", "checkpoint"))
    }


def train_and_save(run_dir, steps, keep_last, start=0, model=None):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in range(start, steps):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        save_checkpoint(run_dir, model, optimizer, scheduler, {"step": step + 1}, keep_last=keep_last)
    return model, optimizer, scheduler


@pytest.mark.parametrize(
    ("keep_last", "expected"),
    [
        (3, {"checkpoint": 5, "checkpoint-4": 4, "checkpoint-3": 3}),
        (2, {"checkpoint": 5, "checkpoint-4": 4}),
        (1, {"checkpoint": 5}),
    ],
)
def test_keep_last_keeps_the_newest_n_checkpoints(tmp_path, keep_last, expected):
    train_and_save(tmp_path, 5, keep_last)
    assert folders(tmp_path) == expected
    assert [p.name for p in kept_checkpoints(tmp_path)] == sorted(set(expected) - {"checkpoint"})


def test_every_kept_checkpoint_loads_its_own_step(tmp_path):
    model, _, _ = train_and_save(tmp_path, 3, keep_last=3)
    for folder, step in (("checkpoint-1", 1), ("checkpoint-2", 2), ("checkpoint", 3)):
        run = tmp_path / f"from-{folder}"
        shutil.copytree(tmp_path / folder, run / "checkpoint")
        fresh = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        assert load_checkpoint(run, fresh, optimizer, scheduler)["step"] == step
        assert optimizer.state_dict()["state"][0]["step"] == step
    assert torch.equal(fresh.weight, model.weight), "the newest checkpoint holds the final weights"


def test_a_step_written_again_replaces_its_kept_copy(tmp_path):
    """A run resumed from checkpoint-3 (copied back) writes steps 4 and 5 again: no duplicates."""
    train_and_save(tmp_path, 5, keep_last=3)
    shutil.rmtree(tmp_path / "checkpoint")
    (tmp_path / "checkpoint-3").rename(tmp_path / "checkpoint")
    train_and_save(tmp_path, 5, keep_last=3, start=3)
    assert folders(tmp_path) == {"checkpoint": 5, "checkpoint-4": 4, "checkpoint-3": 3}


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(LoriteError, match="--keep-last must be >= 1, got 0"):
        train_and_save(tmp_path, 1, keep_last=0)
    with pytest.raises(LoriteError, match="--keep-last must be >= 1, got 0"):
        FinetuneConfig(task="x", keep_last=0).validate()


# ------------------------------------------------------------------ through the fine-tuning loop
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def config(setup, **kw):
    model, task = setup
    base = dict(
        task=f"file:{task}", model=str(model), optimizer="lora_rite", lr=1e-2, rank=4, steps=5, batch_size=4,
        n_validation=8, n_test=8, eval_batch_size=8, max_length=64, target_modules=["q_proj", "v_proj"],
        checkpoint_every=1, dropout=0.1,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_keeps_three_and_resumes_exactly_from_a_kept_one(setup, tmp_path):
    straight = finetune(config(setup, keep_last=3), out=tmp_path / "run", progress=False)
    assert folders(tmp_path / "run") == {"checkpoint": 5, "checkpoint-4": 4, "checkpoint-3": 3}
    # resume from the oldest kept checkpoint (put back as RUN/checkpoint): the same run again
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "run" / "checkpoint-3", again / "checkpoint")
    resumed = finetune(config(setup, keep_last=3), out=again, resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["validation"] == straight["validation"]
    assert folders(again) == {"checkpoint": 5, "checkpoint-4": 4, "checkpoint-3": 3}


def test_finetune_keep_last_1_leaves_one_checkpoint_and_resumes_exactly(setup, tmp_path):
    straight = finetune(config(setup), out=tmp_path / "straight", progress=False)
    assert folders(tmp_path / "straight") == {"checkpoint": 5}
    partial = finetune(config(setup), out=tmp_path / "cut", progress=False, stop_after=3)
    assert partial["stopped_at"] == 3 and folders(tmp_path / "cut") == {"checkpoint": 3}
    resumed = finetune(config(setup), out=tmp_path / "cut", resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert folders(tmp_path / "cut") == {"checkpoint": 5}


@pytest.mark.slow
def test_distributed_checkpoints_keep_the_same_way(tmp_path):
    """2 ranks (DDP, gloo): rank 0 renames the replaced DCP checkpoint; each kept one holds its shards."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    out = tmp_path / "two"
    run_lorite(
        ["finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "lora_rite", "--lr", "1e-2",
         "--rank", "4", "--steps", "4", "--batch-size", "4", "--n-validation", "8", "--n-test", "8",
         "--max-length", "64", "--device", "cpu", "--target-modules", "q_proj,v_proj", "--out", str(out),
         "--parallel", "ddp", "--checkpoint-every", "1", "--keep-last", "2"],
        2,
    )  # fmt: skip
    assert folders(out) == {"checkpoint": 4, "checkpoint-3": 3}
    for name in ("checkpoint", "checkpoint-3"):
        assert (out / name / "dcp").is_dir()
        assert json.loads((out / name / "train_state.json").read_text())["world_size"] == 2


def test_a_killed_writes_temporaries_go_at_the_next_checkpoint(tmp_path):
    """SIGKILL during a checkpoint write leaves ``.checkpoint.tmp-…``; the next save removes it (the run
    lock makes the saving process the run's only writer)."""
    import torch

    from lorite.train.checkpoint import save_checkpoint

    stale = tmp_path / ".checkpoint.tmp-dead"
    (stale / "half").mkdir(parents=True)
    (tmp_path / ".checkpoint.old-123").mkdir()
    weight = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"step": 1, "history": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
