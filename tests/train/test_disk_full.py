"""A disk that fills up while a checkpoint is written: the writer (safetensors' ``save_file`` or
``torch.save``) has put half of its file down when ``OSError(ENOSPC)`` comes. The error reaches the caller;
the previous checkpoint is intact and resumes to exactly the uninterrupted run; no temporary directory is
left in the run directory."""

from __future__ import annotations

import errno
import io
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from helpers import tiny_model_dir, write_task
from lorite.errors import LoriteError
from lorite.train.finetune import FinetuneConfig, finetune

FAIL_AT = 3  # the third checkpoint write fails: checkpoints 1 and 2 are complete


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model: one intra-op thread is faster, and steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def config(setup, **kw) -> FinetuneConfig:
    model, task = setup
    base = dict(
        task=f"file:{task}", model=str(model), optimizer="lora_rite", lr=1e-2, rank=4, steps=5, batch_size=4,
        n_validation=8, n_test=8, eval_batch_size=8, max_length=64, target_modules=["q_proj", "v_proj"],
        checkpoint_every=1, dropout=0.1,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The uninterrupted run (checkpoints every step, as the failing ones)."""
    out = tmp_path_factory.mktemp("disk-full-straight") / "run"
    return {**finetune(config(setup), out=out, progress=False), "out": out}


def in_a_checkpoint_write(target) -> bool:
    """Whether ``target`` (a path or a file object) lies in a checkpoint's temporary directory."""
    name = os.fspath(target) if isinstance(target, str | os.PathLike) else str(getattr(target, "name", ""))
    return any(part.startswith(".checkpoint") for part in name.split(os.sep))


def write_half_then_fail(data: bytes, target) -> None:
    if isinstance(target, str | os.PathLike):
        with open(target, "wb") as handle:
            handle.write(data[: len(data) // 2])
    else:
        target.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


def fill_the_disk(monkeypatch, writer: str) -> list:
    """Make ``writer`` fail half-way through its ``FAIL_AT``-th file in a checkpoint write; returns the list
    of the checkpoint files it was asked to write."""
    calls = []
    if writer == "save_file":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            if not in_a_checkpoint_write(filename):
                return real_save_file(tensors, filename, metadata=metadata)
            calls.append(filename)
            if len(calls) < FAIL_AT:
                return real_save_file(tensors, filename, metadata=metadata)
            write_half_then_fail(safetensors.torch.save(tensors, metadata=metadata), filename)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if not in_a_checkpoint_write(f):
                return real_save(obj, f, *args, **kwargs)
            calls.append(f)
            if len(calls) < FAIL_AT:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            write_half_then_fail(buffer.getvalue(), f)

        monkeypatch.setattr(torch, "save", save)
    return calls


def caused_by_a_full_disk(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def step_of(folder) -> int:
    return json.loads((folder / "train_state.json").read_text())["step"]


@pytest.mark.parametrize(("writer", "keep_last"), [("save_file", 1), ("torch.save", 2)])
def test_a_full_disk_mid_checkpoint_keeps_the_previous_one_whole(
    setup, straight, tmp_path, monkeypatch, writer, keep_last
):
    cfg = config(setup, keep_last=keep_last)

    run = tmp_path / "run"
    calls = fill_the_disk(monkeypatch, writer)
    with pytest.raises((OSError, LoriteError)) as raised:  # as it is, or as lorite's error of a failed write
        finetune(cfg, out=run, progress=False)
    assert caused_by_a_full_disk(raised.value), repr(raised.value)
    assert len(calls) == FAIL_AT, "the failure came from the third checkpoint"

    # the previous checkpoint is in place; nothing half-written is left
    assert step_of(run / "checkpoint") == FAIL_AT - 1
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ([f"checkpoint-{FAIL_AT - 2}"] if keep_last == 2 else [])
    hidden = sorted(
        p.name for p in run.iterdir() if p.name.startswith(".") and (p.is_dir() or ".tmp" in p.name)
    )
    assert hidden == [], f"temporaries left behind: {hidden}"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()

    # ... and it loads: resuming from it (space is back) gives the uninterrupted run, bit for bit
    monkeypatch.undo()
    resumed = finetune(cfg, out=run, resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["validation"] == straight["validation"] and resumed["test"] == straight["test"]
    a = load_file(str(straight["out"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if keep_last == 2:  # the kept older checkpoint is whole too
        assert step_of(run / f"checkpoint-{cfg.steps - 1}") == cfg.steps - 1
