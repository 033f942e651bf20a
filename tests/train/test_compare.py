"""lorite compare: the grid, the choice on validation, test only at the chosen rate, the report."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from helpers import tiny_model_dir, write_task
from lorite.errors import LoriteError
from lorite.train.compare import AUTO_GRIDS, compare, compare_progress, lr_text, parse_lrs, progress_markdown
from lorite.train.finetune import FinetuneConfig


def test_parse_lrs_forms_and_errors():
    assert parse_lrs("auto", ["adamw", "lora_rite"]) == {
        "adamw": AUTO_GRIDS["adamw"],
        "lora_rite": AUTO_GRIDS["lora_rite"],
    }
    assert parse_lrs("1e-3,3e-3", ["adamw"]) == {"adamw": [1e-3, 3e-3]}
    assert parse_lrs("adamw=1e-4:3e-4,lamb=1e-2", ["adamw", "lamb"]) == {
        "adamw": [1e-4, 3e-4],
        "lamb": [1e-2],
    }
    with pytest.raises(LoriteError, match="does not parse"):
        parse_lrs("fast", ["adamw"])
    with pytest.raises(LoriteError, match="positive"):
        parse_lrs("-1e-3", ["adamw"])
    with pytest.raises(LoriteError, match="no learning rates for lamb"):
        parse_lrs("adamw=1e-3", ["adamw", "lamb"])
    assert all(len(grid) >= 5 for grid in AUTO_GRIDS.values())


def test_compare_picks_on_validation_and_reports_test_at_the_pick_only(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    task = write_task(tmp_path / "task" / "task.json")
    base = FinetuneConfig(
        task="", model=str(model), rank=4, steps=4, batch_size=4, n_validation=16, n_test=16,
        max_length=64, target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    variant = {"label": "lora_rite/no-escape", "optimizer": "lora_rite", "args": {"escape_mass": False}}
    optimizers = ["adamw", variant]
    grids = {"adamw": [1e-3, 1e-2], "lora_rite/no-escape": [1e-2, 1e-1]}
    out = tmp_path / "cmp"
    results = compare([f"file:{task}"], optimizers, grids, 2, base, out, progress=False)
    entry = results["tasks"][f"file:{task}"]
    assert set(entry["optimizers"]) == {"adamw", "lora_rite/no-escape"}
    for label, info in entry["optimizers"].items():
        grid = {float(lr): score for lr, score in info["grid"].items()}
        assert info["best_lr"] == max(grid, key=lambda lr: (grid[lr], -lr)), "chosen on validation"
        folder = out / f"file:{task}".replace("/", "__") / label.replace("/", "__")
        tests = [
            json.loads((folder / f"lr{info['best_lr']:g}_seed{seed}" / "metrics.json").read_text())["test"][
                "score"
            ]
            for seed in (0, 1)
        ]
        assert info["test_score"][0] == pytest.approx(sum(tests) / 2), "the test score is the chosen lr's"
        assert len(info["loss_curves"]) == 2
    task_folder = out / f"file:{task}".replace("/", "__")
    saved = json.loads((task_folder / "lora_rite__no-escape" / "lr0.01_seed0" / "metrics.json").read_text())
    assert saved["config"]["optimizer_kwargs"] == {"escape_mass": False}
    assert entry["zero_shot"]["test"]["n"] == 16
    report = (out / "report.md").read_text()
    assert "adamw" in report and "lora_rite/no-escape" in report and "±" in report
    assert (out / "test_scores.png").stat().st_size > 0
    with pytest.raises(LoriteError, match="already holds a comparison"):
        compare([f"file:{task}"], ["adamw"], {"adamw": [1e-3]}, 1, base, out, progress=False)


def test_optimizer_entries_are_validated():
    from lorite.train.compare import parse_optimizers

    with pytest.raises(LoriteError, match="unknown optimizer 'sgdx'"):
        parse_optimizers(["sgdx"])
    with pytest.raises(LoriteError, match="unique"):
        parse_optimizers(["adamw", {"label": "adamw", "optimizer": "lamb"}])
    with pytest.raises(LoriteError, match="unknown keys"):
        parse_optimizers([{"optimizer": "lamb", "lr": 1}])


@pytest.mark.slow
def test_parallel_comparison_equals_serial_one(tmp_path):
    """jobs=2 (worker processes, tasks finished one after another) chooses and reports what jobs=1 does."""
    model = tiny_model_dir(tmp_path / "model")
    tasks = [f"file:{write_task(tmp_path / name / 'task.json', seed=i)}" for i, name in enumerate("ab")]
    base = FinetuneConfig(
        task="", model=str(model), rank=4, steps=3, batch_size=4, n_validation=16, n_test=16,
        max_length=64, target_modules=["q_proj", "v_proj"], device="cpu",
    )  # fmt: skip
    grids = {"adamw": [1e-3, 3e-2]}
    serial = compare(tasks, ["adamw"], grids, 2, base, tmp_path / "serial", progress=False, zero_shot=False)
    parallel = compare(
        tasks, ["adamw"], grids, 2, base, tmp_path / "parallel", jobs=2, progress=False, zero_shot=False
    )
    for task in tasks:
        one, two = (
            serial["tasks"][task]["optimizers"]["adamw"],
            parallel["tasks"][task]["optimizers"]["adamw"],
        )
        assert one["best_lr"] == two["best_lr"]
        assert one["test_score"] == pytest.approx(two["test_score"], abs=1e-6)
        assert len(two["loss_curves"]) == 2


def _tiny_comparison(tmp_path, **settings) -> tuple[str, FinetuneConfig]:
    """A task the tiny random model can be fine-tuned on, and the base config of a CPU comparison."""
    model = tiny_model_dir(tmp_path / "model")
    task = f"file:{write_task(tmp_path / 'task' / 'task.json')}"
    base = FinetuneConfig(
        task="", model=str(model), rank=4, batch_size=4, max_length=64, target_modules=["q_proj", "v_proj"],
        device="cpu", **settings,
    )  # fmt: skip
    return task, base


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_is_retried_once_then_reported_not_fatal(tmp_path, capsys, jobs):
    """Runs sharing a GPU can run out of memory together: a failed run is run again once; one
    that fails again is reported as failed (NaN test score, listed), and the rest of the table stands.
    jobs=1 too: a comparison in one process beside others on the GPU fails the same way (it crashed)."""
    task, base = _tiny_comparison(tmp_path, steps=2, n_validation=8, n_test=8)
    broken = {"label": "broken", "optimizer": "adamw", "args": {"no_such_argument": 1}}
    grids = {"adamw": [1e-3], "broken": [1e-3]}
    out = tmp_path / "cmp"
    results = compare([task], ["adamw", broken], grids, 1, base, out, jobs=jobs, zero_shot=False)
    printed = capsys.readouterr().out
    assert printed.count("FAILED file:") == 2, "tried twice, then given up"
    entry = results["tasks"][task]["optimizers"]
    assert math.isnan(entry["broken"]["test_score"][0]) and entry["broken"]["failed_runs"] == ["0.001/seed0"]
    assert entry["adamw"]["failed_runs"] == [] and 0 <= entry["adamw"]["test_score"][0] <= 1
    assert not (out / task.replace("/", "__") / "broken" / "lr0.001_seed0" / "metrics.json").exists()
    assert (out / "report.md").exists()


def test_a_failed_run_is_retried_alone_after_the_runs_in_flight(tmp_path, capsys):
    """Runs that ran out of GPU memory together failed together again when put straight back (7
    cosmosqa runs on an H100): the retry waits until the runs in flight are done and runs alone."""
    task, base = _tiny_comparison(tmp_path, steps=2, n_validation=8, n_test=8)
    broken = {"label": "broken", "optimizer": "adamw", "args": {"no_such_argument": 1}}
    grids = {"broken": [1e-3], "adamw": [1e-3, 3e-3]}
    compare([task], [broken, "adamw"], grids, 1, base, tmp_path / "cmp", jobs=2, zero_shot=False)
    printed = capsys.readouterr().out.splitlines()
    pattern = re.compile(r"^(FAILED|done) .*/(broken|adamw)/(lr[0-9.e-]+_seed0)")
    events = [" ".join(m.groups()) for line in printed if (m := pattern.match(line))]
    # the order depends on which worker finishes first (a loaded machine lets adamw finish before broken
    # fails); what must hold: broken fails twice, the retry's failure is reported at once, every run ends
    failures = [i for i, event in enumerate(events) if event == "FAILED broken lr0.001_seed0"]
    assert len(failures) == 2, events
    assert events[failures[1] + 1] == "done broken lr0.001_seed0", events
    assert {e for e in events if e.startswith("done adamw")} == {
        "done adamw lr0.001_seed0",
        "done adamw lr0.003_seed0",
    }, events
    assert len(events) == 5, events


def test_mean_std_ignores_runs_without_a_score():
    from lorite.train.compare import _mean_std

    assert _mean_std([0.25, None, float("nan"), 0.75]) == (0.5, pytest.approx(0.3535534))
    mean, std = _mean_std([None, float("nan")])
    assert math.isnan(mean) and math.isnan(std)


def test_neighbour_lr_walks_the_half_decade_ladder():
    from lorite.train.compare import neighbour_lr

    assert [neighbour_lr(lr, upward=True) for lr in (1e-4, 3e-4, 1e-3, 3e-2)] == [3e-4, 1e-3, 3e-3, 1e-1]
    assert [neighbour_lr(lr, upward=False) for lr in (1e-4, 3e-4, 1e-3, 3e-2)] == [3e-5, 1e-4, 3e-4, 1e-2]
    assert neighbour_lr(5e-4, upward=True) == 2e-3  # off the ladder: ×√10, one digit
    with pytest.raises(LoriteError, match="positive"):
        neighbour_lr(0.0, upward=True)


def _check_widened(info: dict, planned: list[float], widen: int) -> None:
    """The grid grew past an edge only while its best sat there, by ladder steps, at most ``widen`` a side."""
    from lorite.train.compare import neighbour_lr

    grid = sorted(float(lr) for lr in info["grid"])
    assert set(planned) <= set(grid)
    above = [lr for lr in grid if lr > max(planned)]
    below = [lr for lr in grid if lr < min(planned)]
    assert len(above) <= widen and len(below) <= widen
    ladder_up = [max(planned)]
    for _ in above:
        ladder_up.append(neighbour_lr(ladder_up[-1], upward=True))
    assert above == pytest.approx(ladder_up[1:])
    ladder_down = [min(planned)]
    for _ in below:
        ladder_down.append(neighbour_lr(ladder_down[-1], upward=False))
    assert sorted(below) == pytest.approx(sorted(ladder_down[1:]))
    best = info["best_lr"]
    scores = {float(lr): score for lr, score in info["grid"].items()}
    tied = sum(score == scores[best] for score in scores.values()) > 1
    if best == grid[-1]:
        assert len(above) == widen, "the best is at the top edge only when the widening budget is spent"
    if best == grid[0] and not tied:
        assert len(below) == widen, (
            "a strict best is at the bottom edge only when the widening budget is spent"
        )
    assert info["best_lr_at_grid_edge"] == (best in (grid[0], grid[-1]) and not tied)


def test_widening_stops_at_a_plateau_but_not_at_a_strict_edge_best():
    """A flat grid (the smaller rate wins ties, so its best is the lowest rate) does not widen: the optimum is
    inside it. A strict best at an edge widens; a grid where every rate diverged goes down."""
    from lorite.train.compare import RunSpec, _Schedule, parse_optimizers

    spec = parse_optimizers(["adamw"])[0]
    grid = [1e-4, 1e-3, 1e-2]

    def schedule_with(scores):
        schedule = _Schedule(["t"], [spec], {"adamw": grid}, 3, 2, verbose=False)
        for lr, score in zip(grid, scores, strict=True):
            result = {"validation": {"score": score}, "diverged": score is None}
            schedule.results[RunSpec("t", spec, lr, 0)] = result
        return schedule

    assert schedule_with([0.9, 0.9, 0.5]).widening("t", spec) is None, "plateau: no widening"
    assert schedule_with([0.9, 0.8, 0.5]).widening("t", spec).lr == pytest.approx(3e-5)
    assert schedule_with([0.5, 0.8, 0.9]).widening("t", spec).lr == pytest.approx(3e-2)
    assert schedule_with([0.5, 0.9, 0.9]).widening("t", spec) is None, "the tie goes to the inner 1e-3"
    assert schedule_with([None, None, None]).widening("t", spec).lr == pytest.approx(3e-5), "all diverged"


@pytest.mark.slow
def test_widening_grows_a_grid_whose_best_sits_at_an_edge_and_jobs_do_not_change_it(tmp_path):
    task, base = _tiny_comparison(tmp_path, steps=3, n_validation=16, n_test=16)
    planned = [1e-3, 10.0]  # the tiny model scores 2/16 at 1e-3 and 4/16 at 10: a strict best at the top
    serial = compare(
        [task],
        ["adamw"],
        {"adamw": planned},
        2,
        base,
        tmp_path / "s",
        progress=False,
        zero_shot=False,
        widen=2,
    )
    info = serial["tasks"][task]["optimizers"]["adamw"]
    _check_widened(info, planned, widen=2)
    assert len(info["grid"]) > len(planned), "the grid widened"
    seeds = sorted((tmp_path / "s" / task.replace("/", "__") / "adamw").glob(f"lr{info['best_lr']:g}_seed*"))
    assert len(seeds) == 2, "seeds run at the widened grid's best"
    parallel = compare(
        [task], ["adamw"], {"adamw": planned}, 2, base, tmp_path / "p", jobs=2, progress=False,
        zero_shot=False, widen=2,
    )  # fmt: skip
    other = parallel["tasks"][task]["optimizers"]["adamw"]
    assert other["grid"].keys() == info["grid"].keys() and other["best_lr"] == info["best_lr"]
    report = compare_progress([task], ["adamw"], {"adamw": planned}, 2, tmp_path / "s", widen=2)
    progress = report["tasks"][task]["adamw"]
    assert report["left"] == report["waiting"] == 0 and report["other_runs"] == []
    assert [f"{lr:g}" for lr in progress["grid"]] == list(info["grid"]), "the same widened grid as compare's"
    assert progress["best_lr"] == info["best_lr"] and len(progress["tests"]) == 2
    final = [curve[-1] for curve in info["validation_curves"]]  # the last evaluation of each seed
    assert progress["validation_curve"][final[0]["step"]] == pytest.approx(sum(p["score"] for p in final) / 2)
    with pytest.raises(LoriteError, match="widen"):
        compare([task], ["adamw"], {"adamw": planned}, 1, base, tmp_path / "x", progress=False, widen=-1)


def _write_run(out, task, label, lr, seed, validation, test=None, diverged=False, curve=()):
    folder = out / task.replace("/", "__") / label / f"lr{lr:g}_seed{seed}"
    folder.mkdir(parents=True)
    history = {"validation": [{"step": step, "score": score} for step, score in curve]}
    metrics = {"validation": {"score": validation}, "diverged": diverged, "history": history}
    if test is not None:
        metrics["test"] = {"score": test}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_progress_reads_the_schedule_against_the_disk_and_trains_nothing(tmp_path):
    task, out = "social_iqa", tmp_path / "cmp"
    _write_run(out, task, "adamw", 1e-3, 0, 0.5, 0.40)
    _write_run(out, task, "adamw", 3e-3, 0, 0.6, 0.45)  # best at the top edge: 1e-2 comes next
    _write_run(out, task, "adamw", 1e-3, 1, 0.5, 0.41)  # a seed at a rate that is no longer the best
    _write_run(out, task, "lora_rite", 1e-2, 0, 0.7, 0.55, curve=[(2, 0.6), (4, 0.7)])  # best at the bottom …
    _write_run(out, task, "lora_rite", 3e-2, 0, None, diverged=True)
    _write_run(out, task, "lora_rite", 3e-3, 0, 0.3, 0.20)  # … edge: widened to 3e-3, so 1e-2 is inside
    grids = {"adamw": [1e-3, 3e-3], "lora_rite": [1e-2, 3e-2]}

    report = compare_progress([task], ["adamw", "lora_rite"], grids, 2, out, widen=1)

    adamw, rite = report["tasks"][task]["adamw"], report["tasks"][task]["lora_rite"]
    assert adamw["grid"] == {1e-3: 0.5, 3e-3: 0.6, 1e-2: None} and not adamw["grid_finished"]
    assert adamw["best_lr"] == 3e-3 and adamw["tests"] == {}
    assert rite["grid_finished"] and rite["best_lr"] == 1e-2 and rite["tests"] == {0: 0.55, 1: None}
    assert rite["validation_curve"] == {2: 0.6, 4: 0.7} and adamw["validation_curve"] == {}
    assert math.isnan(rite["grid"][3e-2])
    assert report["left"] == 2 and report["waiting"] == 1 and report["finished"] == 5
    assert report["other_runs"] == ["social_iqa/adamw/lr0.001_seed1"]
    text = progress_markdown(report)
    assert "| adamw | 1e-3: 50.0, 3e-3: 60.0, 1e-2: · | 3e-3 (so far) | after the grid | · |" in text
    assert "| lora_rite | 3e-3: 30.0, 1e-2: 70.0, 3e-2: diverged | 1e-2 | 55.0 · | 2: 60.0, 4: 70.0 |" in text
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    with pytest.raises(LoriteError, match="not a folder"):
        compare_progress([task], ["adamw"], grids, 2, tmp_path / "missing")


def test_finished_tasks_are_reported_as_compare_would_and_the_rest_listed(tmp_path):
    from lorite.train.compare import compare_finished_tasks

    out, grids = tmp_path / "cmp", {"adamw": [1e-3, 3e-3, 1e-2]}
    for lr, score in [(1e-3, 0.6), (3e-3, 0.6), (1e-2, 0.4)]:  # a plateau at the bottom: no widening
        _write_run(out, "a", "adamw", lr, 0, score, 0.30 if lr == 1e-3 else 0.9)
    _write_run(out, "a", "adamw", 1e-3, 1, 0.5, 0.40)
    _write_run(out, "b", "adamw", 1e-3, 0, 0.5, 0.40)  # task b: its grid is still open
    base = FinetuneConfig(task="a")
    with pytest.raises(LoriteError, match="no task of the comparison"):
        compare_finished_tasks(["b"], ["adamw"], grids, 2, out, base, widen=2)

    results = compare_finished_tasks(["a", "b"], ["adamw"], grids, 2, out, base, widen=2)

    assert list(results["tasks"]) == ["a"] and results["unfinished_tasks"] == ["b"]
    info = results["tasks"]["a"]["optimizers"]["adamw"]
    assert info["best_lr"] == 1e-3 and not info["best_lr_at_grid_edge"], "a tie with 3e-3 is a plateau"
    assert info["test_score"][0] == pytest.approx(0.35) and info["test_score"][1] == pytest.approx(0.0707107)
    assert results["tasks"]["a"]["zero_shot"] is None


def test_lr_text_is_the_short_scientific_form():
    assert [lr_text(v) for v in (3e-4, 1e-2, 2.5e-3, 0.1, 3.0)] == ["3e-4", "1e-2", "2.5e-3", "1e-1", "3e0"]


def test_resuming_into_runs_made_with_other_settings_is_refused(tmp_path):
    """Runs are found by folder, so a changed config resumed into the same --out would mix runs that
    computed different things; only the settings a resumed run may change (RESUMABLE_CHANGES) may differ."""
    task, base = _tiny_comparison(tmp_path, steps=2, n_validation=8, n_test=8)
    out, grids = tmp_path / "cmp", {"adamw": [1e-3]}
    compare([task], ["adamw"], grids, 1, base, out, zero_shot=False, progress=False)
    (out / "results.json").unlink()  # as if interrupted after its run
    metrics = next(out.glob("*/adamw/lr0.001_seed0/metrics.json"))
    made = metrics.read_text()
    changed = replace(base, eval_batch_size=7)
    with pytest.raises(
        LoriteError, match=r"lr0.001_seed0 was run with other settings .*eval_batch_size 32 there, 7 here"
    ):
        compare([task], ["adamw"], grids, 1, changed, out, zero_shot=False, progress=False)
    assert metrics.read_text() == made and not (out / "results.json").exists()
    with pytest.raises(LoriteError, match="eval_batch_size 32 there, 7 here"):  # --progress says so too
        compare_progress([task], ["adamw"], grids, 1, out, base=changed)
    assert compare_progress([task], ["adamw"], grids, 1, out, base=base)["finished"] == 1
    resumable = replace(base, keep_last=3)
    results = compare([task], ["adamw"], grids, 1, resumable, out, zero_shot=False, progress=False)
    assert metrics.read_text() == made, "the finished run is read back, not run again"
    assert results["tasks"][task]["optimizers"]["adamw"]["best_lr"] == 1e-3


def test_finished_runs_are_checked_on_the_arguments_they_recorded(tmp_path):
    from lorite.train.compare import check_finished_runs, parse_optimizers

    spec = {"label": "lora_rite", "optimizer": "lora_rite", "args": {"rank_tolerance": 0.0}}
    base = {
        k: v
        for k, v in FinetuneConfig(task="a").__dict__.items()
        if k not in ("task", "optimizer", "lr", "seed")
    }

    def stored(optimizer_kwargs, **settings):
        folder = tmp_path / "a" / "lora_rite" / "lr0.01_seed0"
        folder.mkdir(parents=True, exist_ok=True)
        config = {**base, "task": "a", "optimizer": "lora_rite", "lr": 0.01, "seed": 0}
        config.update(optimizer_kwargs=optimizer_kwargs, **settings)
        config.pop("transfer_task")  # a run from before the setting existed: it ran with the default
        (folder / "metrics.json").write_text(json.dumps({"config": config}))

    stored({})  # given no arguments: rank_tolerance was its default then (runs from before the guard)
    check_finished_runs(tmp_path, ["a"], parse_optimizers([spec]), base)
    stored({"rank_tolerance": 1e-3})
    with pytest.raises(LoriteError, match=r"optimizer_kwargs \{'rank_tolerance': 0.001\} there"):
        check_finished_runs(tmp_path, ["a"], parse_optimizers([spec]), base)
    stored({}, steps=7)
    with pytest.raises(LoriteError, match="steps 7 there, 200 here"):
        check_finished_runs(tmp_path, ["a"], parse_optimizers([spec]), base)
    with pytest.raises(LoriteError, match="transfer_task None there, 'b' here"):
        stored({})
        check_finished_runs(tmp_path, ["a"], parse_optimizers([spec]), {**base, "transfer_task": "b"})
    check_finished_runs(tmp_path, ["other"], parse_optimizers([spec]), base)  # not this comparison's task
