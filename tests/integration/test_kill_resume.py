"""SIGKILL at random points of ``lorite finetune``, ``lorite pretrain`` and ``lorite compare --jobs 2`` (tiny
model, CPU, a checkpoint every step), then resume — ``--resume RUN``, or for ``compare`` the same command
again — until the run is done: the final ``metrics.json`` (timings aside), the log and the saved weights
equal an uninterrupted run's, bit for bit.

The kill points come from watching the run directory, not from hooks in lorite: after a (seeded) random
number of logged steps and a random delay (mid-step), the moment a checkpoint's temporary directory
appears (mid-write), and a few milliseconds after the step that an evaluation follows (mid-evaluation).

Each ``lorite`` process is ``lorite.cli.main(argv)`` in a child of a forkserver that imported lorite,
torch and transformers once (a fresh interpreter would spend ~6 s importing them per kill); the child is
a session of its own, and a kill is ``killpg(SIGKILL)`` of it — ``compare``'s worker processes included,
as a job scheduler's kill would be.

The temporary directory of a checkpoint write cut short by SIGKILL (``RUN/.checkpoint.tmp-…``) is removed
by the next checkpoint write (tests/train/test_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model_dir, write_task
from lorite.data.blocks import build_token_cache
from pretraining_data import char_tokenizer, synthetic_corpora

pytestmark = pytest.mark.slow

TIMINGS = (
    "seconds_per_step",
    "seconds_evaluating",
    "seconds_total",
    "tokens_per_second",
    "peak_memory_bytes",
)
LOG_TIMINGS = ("tokens_per_s", "elapsed_s")
DEADLINE = 180.0  # seconds a session may take before the test gives up on it


# ------------------------------------------------------------------ lorite processes
def _lorite(argv: list[str], output: str) -> None:
    """The child: a session of its own (so that its workers die with it), output to a file, one thread."""
    os.setsid()
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["OMP_NUM_THREADS"] = "1"  # compare's spawned workers too: the same arithmetic everywhere
    torch.set_num_threads(1)
    from lorite.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lorite.cli", "transformers", "peft", "safetensors.torch", "tqdm.auto"])
    return context


class Session:
    """One ``lorite`` command in a forkserver child."""

    def __init__(self, context, argv: list[str], output: Path):
        self.output = output
        self.process = context.Process(target=_lorite, args=(argv, str(output)))
        self.process.start()
        self.began = time.monotonic()

    def running(self) -> bool:
        if time.monotonic() - self.began > DEADLINE:
            self.kill()
            raise AssertionError(f"the session took over {DEADLINE:.0f} s:\n{self.tail()}")
        return self.process.is_alive()

    def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):  # (it ended by itself)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.join()
        return self.process.exitcode

    def wait(self) -> int:
        while self.running():
            time.sleep(0.01)
        self.process.join()
        return self.process.exitcode

    def tail(self) -> str:
        return self.output.read_text()[-3000:] if self.output.exists() else ""


def run_to_completion(context, argv, output) -> None:
    session = Session(context, argv, output)
    code = session.wait()
    assert code == 0, f"exit code {code}:\n{session.tail()}"


def kill_when(context, argv, output, ready, delay: float, may_finish: bool = False) -> str:
    """Start ``argv``; once ``ready()`` holds, wait ``delay`` seconds and SIGKILL the session. Returns what
    ``ready`` saw (for the failure message). The session must still have been running — or, with
    ``may_finish`` (a kill aimed at the last milliseconds of a run), may have just finished."""
    session = Session(context, argv, output)
    seen = None
    while session.running():
        seen = ready()
        if seen:
            break
    else:
        raise AssertionError(
            f"the session ended (exit {session.process.exitcode}) before the kill:\n{session.tail()}"
        )
    if delay:
        time.sleep(delay)
    code = session.kill()
    if may_finish and code == 0:
        return f"{seen} (finished before the kill)"
    assert code == -signal.SIGKILL, (
        f"the session ended by itself (exit {code}) before the kill:\n{session.tail()}"
    )
    return str(seen)


# ------------------------------------------------------------------ watching a run directory
def log_entries(run: Path) -> list[dict]:
    try:
        text = (run / "log.jsonl").read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            entries.append(json.loads(line))
    return entries


def logged_steps(run: Path) -> int:
    return max((e["step"] for e in log_entries(run) if e.get("event") == "step"), default=0)


def checkpoint_temporaries(run: Path) -> set[str]:
    """The hidden working directories of checkpoint writes (``.checkpoint.tmp-…``, ``.checkpoint.old-…``)."""
    try:
        return {name for name in os.listdir(run) if name.startswith(".checkpoint")}
    except FileNotFoundError:
        return set()


def after_steps(run: Path, steps: int):
    return lambda: logged_steps(run) >= steps and f"step {logged_steps(run)}"


def new_checkpoint_write(run: Path):
    """True the first time a checkpoint temporary appears that was not there when this was made, once the
    run has a checkpoint (a run killed before its first one has nothing to resume: see the pretrain test)."""
    before = checkpoint_temporaries(run)
    return lambda: (run / "checkpoint").is_dir() and sorted(checkpoint_temporaries(run) - before)


# ------------------------------------------------------------------ comparing runs
def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def metrics(run: Path) -> dict:
    return without_timings(json.loads((run / "metrics.json").read_text()))


def log_without_timings(run: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in LOG_TIMINGS} for e in log_entries(run)]


def assert_same_tensors(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{first.name}: {key} differs"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def finetune_args(tiny, out_option: str, out: Path) -> list[str]:
    model, task = tiny
    return [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "lora_rite", "--lr", "1e-2",
        "--rank", "4", "--steps", "10", "--batch-size", "4", "--n-validation", "16", "--n-test", "16",
        "--eval-batch-size", "8", "--max-length", "64", "--target-modules", "q_proj,v_proj", "--dropout", "0.1",
        "--device", "cpu", "--eval-every", "4", "--checkpoint-every", "1", "--keep-last", "2",
        out_option, str(out),
    ]  # fmt: skip


def resume_or_restart(fresh: list[str], run: Path) -> list[str]:
    """``--resume RUN`` once a checkpoint exists (or, killed between the two renames that replace it, the one
    it replaced, which the resume puts back); before the first one, the command again."""
    has_checkpoint = (run / "checkpoint" / "train_state.json").exists() or any(run.glob(".checkpoint.old-*"))
    return [fresh[0], "--resume", str(run)] if has_checkpoint else fresh


# ------------------------------------------------------------------ the tests
def test_finetune_killed_anywhere_resumes_to_the_uninterrupted_run(forkserver, tiny, tmp_path):
    rng = random.Random(2601)
    straight, run = tmp_path / "straight", tmp_path / "killed"
    run_to_completion(forkserver, finetune_args(tiny, "--out", straight), tmp_path / "straight.out")

    fresh = finetune_args(tiny, "--out", run)
    output = tmp_path / "killed.out"
    seen = [
        # mid-step: after 2-4 logged steps and up to 10 ms
        kill_when(forkserver, fresh, output, after_steps(run, rng.randint(2, 4)), rng.uniform(0, 0.01)),
        # mid-checkpoint-write: the moment the resumed session's first (or second) write begins
        kill_when(forkserver, resume_or_restart(fresh, run), output, new_checkpoint_write(run), 0.0),
        # mid-evaluation: shortly after step 8 (validation) or step 10 (validation, test, saving)
        kill_when(
            forkserver,
            resume_or_restart(fresh, run),
            output,
            after_steps(run, rng.choice([8, 10])),
            rng.uniform(0.002, 0.02),
            may_finish=True,
        ),
    ]
    run_to_completion(forkserver, resume_or_restart(fresh, run), output)

    assert metrics(run) == metrics(straight), f"kills at {seen}"
    assert_same_tensors(
        run / "adapter" / "adapter_model.safetensors", straight / "adapter" / "adapter_model.safetensors"
    )
    assert log_without_timings(run) == log_without_timings(straight), f"kills at {seen}"


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-tokens")
    return build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=root
    )


def test_pretrain_killed_anywhere_resumes_to_the_uninterrupted_run(forkserver, token_cache, tmp_path):
    rng = random.Random(2602)

    def args(out: Path) -> list[str]:
        return [
            "pretrain", "--size", "tiny", "--data", str(token_cache), "--corpora", "prose,code", "--device", "cpu",
            "--block-length", "32", "--batch-size", "8", "--tokens", str(12 * 8 * 32), "--eval-every", "4",
            "--checkpoint-every", "1", "--out", str(out),
        ]  # fmt: skip

    straight, run = tmp_path / "straight", tmp_path / "killed"
    run_to_completion(forkserver, args(straight), tmp_path / "straight.out")
    output = tmp_path / "killed.out"
    seen = [
        kill_when(forkserver, args(run), output, new_checkpoint_write(run), 0.0),
        kill_when(
            forkserver,
            resume_or_restart(args(run), run),
            output,
            after_steps(run, rng.randint(5, 7)),
            rng.uniform(0, 0.01),
        ),
        kill_when(
            forkserver,
            resume_or_restart(args(run), run),
            output,
            after_steps(run, rng.choice([8, 12])),
            rng.uniform(0.002, 0.02),
            may_finish=True,
        ),
    ]
    run_to_completion(forkserver, resume_or_restart(args(run), run), output)

    mine, theirs = metrics(run), metrics(straight)
    assert mine == theirs, f"kills at {seen}"
    assert_same_tensors(run / "model" / "model.safetensors", straight / "model" / "model.safetensors")
    assert log_without_timings(run) == log_without_timings(straight), f"kills at {seen}"


def test_compare_with_two_jobs_killed_and_rerun_gives_the_uninterrupted_comparison(
    forkserver, tiny, tmp_path
):
    rng = random.Random(2603)
    model, task = tiny

    def args(out: Path, jobs: int) -> list[str]:
        return [
            "compare", "--tasks", f"file:{task}", "--optimizers", "adamw,lora_rite",
            "--lrs", "adamw=1e-3:1e-2,lora_rite=1e-2", "--seeds", "1", "--jobs", str(jobs), "--model", str(model),
            "--rank", "4", "--steps", "6", "--batch-size", "4", "--n-validation", "16", "--n-test", "16",
            "--eval-batch-size", "8", "--max-length", "64", "--target-modules", "q_proj,v_proj", "--device", "cpu",
            "--out", str(out),
        ]  # fmt: skip

    straight, out = tmp_path / "straight", tmp_path / "killed"
    run_to_completion(forkserver, args(straight, 1), tmp_path / "straight.out")  # one process, no kill

    def run_folders(root: Path) -> list[Path]:
        return sorted(p.parent for p in root.glob("*/*/*/log.jsonl"))

    def one_more_finished(root: Path):
        before = len(list(root.glob("*/*/*/metrics.json")))
        return lambda: len(list(root.glob("*/*/*/metrics.json"))) > before and "a run finished"

    # one kill (each session spawns two fresh worker interpreters: seconds each): once the first run is
    # finished, while the others train — the rerun reads the finished one back and redoes the others
    output = tmp_path / "killed.out"
    seen = [kill_when(forkserver, args(out, 2), output, one_more_finished(out), rng.uniform(0, 0.05))]
    run_to_completion(forkserver, args(out, 2), output)

    assert without_timings(json.loads((out / "results.json").read_text())) == without_timings(
        json.loads((straight / "results.json").read_text())
    ), f"kills at {seen}"
    folders = [p.relative_to(straight) for p in run_folders(straight)]
    assert folders and folders == [p.relative_to(out) for p in run_folders(out)]
    for folder in folders:
        assert metrics(out / folder) == metrics(straight / folder), f"{folder} (kills at {seen})"
        assert_same_tensors(
            out / folder / "adapter" / "adapter_model.safetensors",
            straight / folder / "adapter" / "adapter_model.safetensors",
        )
