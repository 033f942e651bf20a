"""The runtime pieces every entry point shares: engines, device, schedule, output directories, seeding."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from lorite import runtime
from lorite.errors import LoriteError
from lorite.runtime import check_output_dir, lr_factor, lr_scheduler, require_new_output, resolve_engine


@pytest.mark.parametrize(
    ("env", "parallel", "expected"),
    [
        ({}, "none", "none"),
        ({"WORLD_SIZE": "2"}, "ddp", "ddp"),  # torchrun: --parallel as given
        ({"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"}, "none", "ddp"),
        ({"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "1"}, "none", "none"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}, "none", "fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}, "fsdp2", "fsdp2"),
    ],
)
def test_engine_follows_accelerate(monkeypatch, env, parallel, expected):
    for name in list(os.environ):
        if name.startswith(("ACCELERATE_", "FSDP_")) or name == "WORLD_SIZE":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_engine(parallel) == expected


def test_schedule_warms_up_then_decays_to_zero():
    assert [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, 2, "cosine") < 0.05
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant", 0.1) == 1.0


def test_scheduler_follows_the_factor_and_resumes():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=2.0)
    scheduler = lr_scheduler(optimizer, 10, 2, "linear")
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * lr_factor(s, 10, 2, "linear") for s in range(6)])
    again = lr_scheduler(torch.optim.SGD([weight], lr=2.0), 10, 2, "linear")
    again.load_state_dict(scheduler.state_dict())
    assert again.get_last_lr() == scheduler.get_last_lr()
    with pytest.raises(LoriteError, match="--schedule must be one of"):
        lr_scheduler(optimizer, 10, 2, "exponential")


def test_auto_device_honours_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.pick_device("auto") == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert runtime.pick_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("auto") == torch.device("cpu")
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LoriteError, match="is not a device"):
        runtime.pick_device("gpu-please")


def test_one_process_is_a_one_rank_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = runtime.setup("none", torch.device("cpu"))
    assert (world.rank, world.size, world.is_main, world.active) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoriteError, match="give --parallel ddp or --parallel fsdp2"):
        runtime.setup("none", torch.device("cpu"))
    assert runtime.mean_over_ranks(3.5, world) == 3.5 and runtime.all_ranks_agree(True, world)


def test_output_dir_holding_a_run_is_refused_unless_resumed(tmp_path):
    out = tmp_path / "run"
    check_output_dir(out, resume=False)  # new
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check_output_dir(out, resume=False)  # other files: fine
    for marker in ("metrics.json", "config.json"):
        (out / marker).write_text("{}")
        with pytest.raises(LoriteError, match="already holds a run"):
            check_output_dir(out, resume=False)
        (out / marker).unlink()
    (out / "adapter").mkdir()
    with pytest.raises(LoriteError, match="already holds a run"):
        check_output_dir(out, resume=False)
    with pytest.raises(LoriteError, match="no checkpoint there"):
        check_output_dir(out, resume=True)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "train_state.json").write_text("{}")
    check_output_dir(out, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoriteError, match="is a file"):
        check_output_dir(tmp_path / "file", resume=False)


def test_new_output_must_be_absent_or_empty(tmp_path):
    require_new_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    require_new_output(tmp_path / "empty")
    (tmp_path / "empty" / "x").write_text("x")
    with pytest.raises(LoriteError, match="already exists and holds files"):
        require_new_output(tmp_path / "empty", "--out")
    assert (tmp_path / "empty" / "x").read_text() == "x"  # nothing touched


def test_seeded_draws_depend_on_the_seed_only_and_leave_the_caller_stream():
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    with runtime.seeded(1):
        first = torch.rand(4)
    with runtime.seeded(1):
        second = torch.rand(4)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)


def test_rng_state_round_trips():
    runtime.seed_everything(7)
    state = runtime.rng_state()
    drawn = torch.rand(2), random.random()
    runtime.set_rng_state(state)
    assert torch.equal(torch.rand(2), drawn[0]) and random.random() == drawn[1]
