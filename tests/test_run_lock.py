"""One lorite process per run directory: ``RUN/.lorite.lock`` (lorite.runtime.run_lock), taken by
``finetune``, ``pretrain`` and ``compare``; a second process on the same ``--out`` refuses at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import tiny_model_dir, write_task
from lorite.cli import main
from lorite.errors import LoriteError
from lorite.runtime import LOCK_FILE, acquire_run_lock, release_run_lock, run_lock


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


@pytest.fixture
def live_pid():
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(out, pid, host=None, started=1_700_000_000.0):
    out.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": started}
    (out / LOCK_FILE).write_text(json.dumps(holder))


def finetune_args(files, out, *extra):
    model, task = files
    return ["finetune", "--task", f"file:{task}", "--model", str(model), "--rank", "4", "--steps", "2",
            "--batch-size", "2", "--n-validation", "8", "--n-test", "8", "--out", str(out), *extra]  # fmt: skip


def test_a_lock_held_by_a_live_process_refuses_with_one_line_and_writes_nothing(
    capsys, files, tmp_path, live_pid
):
    out = tmp_path / "run"
    write_lock(out, live_pid)
    lock_before = (out / LOCK_FILE).read_text()
    assert main(finetune_args(files, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{out} is in use by another lorite process (pid {live_pid}, started " in err[0]
    assert "wait for it or choose another --out" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "nothing written"
    assert (out / LOCK_FILE).read_text() == lock_before, "the holder's lock is untouched"


@pytest.mark.parametrize("command", ["compare", "pretrain"])
def test_compare_and_pretrain_refuse_a_held_out_too(capsys, files, tmp_path, live_pid, command):
    out = tmp_path / command
    write_lock(out, live_pid)
    argv = {
        "compare": ["compare", "--tasks", f"file:{files[1]}", "--optimizers", "adamw", "--lrs", "1e-3"],
        "pretrain": ["pretrain", "--tokens", "1000"],
    }[command]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} is in use by another lorite process (pid {live_pid}," in err[0], err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_stale_lock_is_taken_over_with_a_note(capsys, tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid)
    with run_lock(out) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert abs(holder["started"] - time.time()) < 60
    assert not (out / LOCK_FILE).exists()
    err = capsys.readouterr().err
    assert f"taking over the stale lock {out / LOCK_FILE} (pid {pid} is gone)" in err


def test_a_stale_lock_does_not_stop_a_finetune(capsys, files, tmp_path):
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    assert main(finetune_args(files, out)) == 0
    assert (out / "metrics.json").exists()
    assert not (out / LOCK_FILE).exists(), "released after a normal end"
    assert "taking over the stale lock" in capsys.readouterr().err


def test_a_lock_of_another_host_refuses(tmp_path):
    out = tmp_path / "run"
    write_lock(out, dead_pid(), host="elsewhere.example")
    with pytest.raises(LoriteError, match=r"\(pid \d+ on elsewhere.example, started "):
        acquire_run_lock(out)


def test_an_unreadable_lock_refuses_while_new_and_is_stale_when_old(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # a holder between creating and writing it
    with pytest.raises(LoriteError, match=r"lock .* is unreadable"):
        acquire_run_lock(out)
    old = time.time() - 3600
    os.utime(out / LOCK_FILE, (old, old))
    path = acquire_run_lock(out)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release_run_lock(path)
    assert not path.exists() and out.is_dir()


def test_the_lock_is_released_after_an_exception_and_a_new_empty_dir_goes_too(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="boom"), run_lock(out) as path:
        assert path.exists()
        raise RuntimeError("boom")
    assert not out.exists(), "a directory made only for the lock is removed"
    kept = tmp_path / "kept"
    with run_lock(kept):
        (kept / "metrics.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.json"]


def test_a_second_lock_in_the_same_process_refuses_and_keeps_the_first(tmp_path):
    out = tmp_path / "run"
    with run_lock(out) as path:
        with pytest.raises(LoriteError, match=f"pid {os.getpid()},"):
            acquire_run_lock(out)
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_only_rank_0_locks(tmp_path, monkeypatch, live_pid):
    out = tmp_path / "run"
    write_lock(out, live_pid)
    monkeypatch.setenv("RANK", "1")
    with run_lock(out) as path:
        assert path is None
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == live_pid


def test_two_concurrent_finetunes_on_one_out_exactly_one_proceeds(files, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lorite.cli", *finetune_args(files, out, "--steps", "20")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = []
    for process in (first, second):
        _, err = process.communicate(timeout=300)
        results.append((process.returncode, err.strip().splitlines()))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused) == 1 and "is in use by another lorite process (pid " in refused[0], refused
    assert (out / "metrics.json").exists() and not (out / LOCK_FILE).exists()
