"""The test helpers that decide outcomes: spawn_ranks accepts a signal-killed worker only after its work;
run_lorite repeats a launch only when its workers died by a signal."""

from __future__ import annotations

import os
import time

import pytest
import torch.multiprocessing as mp

from helpers import killed_by_signal, spawn_ranks


def _write_then_abort(rank, folder, world_size=2):
    open(os.path.join(folder, f"rank{rank}.txt"), "w").close()
    # Wait for every rank's file, as the gloo tests' ranks meet in a collective before shutdown: without
    # it the first abort makes spawn terminate a rank that has not written yet.
    deadline = time.monotonic() + 60
    while not all(os.path.exists(os.path.join(folder, f"rank{r}.txt")) for r in range(world_size)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    os.abort()  # SIGABRT after the work, as gloo's shutdown crash


def _abort_before_writing(rank, folder):
    with open(os.path.join(folder, "attempts.txt"), "a") as log:
        log.write("x")
    os.abort()


def _raise(rank, folder):
    raise ValueError("a wrong result")


def test_spawn_ranks_accepts_a_crash_after_the_work(tmp_path):
    spawn_ranks(_write_then_abort, (str(tmp_path),), 2, [tmp_path / f"rank{r}.txt" for r in range(2)])


def test_spawn_ranks_retries_once_then_fails_when_the_work_is_missing(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        spawn_ranks(_abort_before_writing, (str(tmp_path),), 1, [tmp_path / "rank0.txt"])
    assert (tmp_path / "attempts.txt").read_text() == "xx"


def test_spawn_ranks_never_retries_an_exception(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a wrong result"):
        spawn_ranks(_raise, (str(tmp_path),), 1, [tmp_path / "missing"])


def test_a_launch_is_repeated_only_when_its_workers_died_by_a_signal():
    gloo_abort = (  # torchrun's report of this session's CI flake (abridged)
        "failed (exitcode: -6) local_rank: 1 (pid: 17514)\n"
        "  exitcode  : -15 (pid: 17513)  (SIGTERM)\n  exitcode  : -6 (pid: 17514)  (SIGABRT)\n"
    )
    assert killed_by_signal(gloo_abort)
    own_error = "  exitcode  : 1 (pid: 17513)\n  exitcode  : -15 (pid: 17514)  (SIGTERM)\n"
    assert not killed_by_signal(own_error), "a worker's own error is never retried"
    assert not killed_by_signal("ValueError: bad input")
