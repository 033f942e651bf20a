"""benchmarks/harness.py: the launching, collecting, table and plot pieces every experiment shares."""

import json
import math
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness  # benchmarks/ is not a package: imported from its folder


def test_mean_std_drops_unusable_values_and_gives_sample_std():
    mean, std = harness.mean_std([1.0, 2.0, 3.0, None, math.nan, math.inf])
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx(1.0)  # sample (n - 1) standard deviation of 1, 2, 3
    assert harness.mean_std([5]) == (5.0, 0.0)
    assert harness.mean_std([None, math.nan]) is None
    assert harness.mean_std([True]) is None  # a flag is not a number


def test_fmt_and_mean_std_format():
    assert harness.fmt(0.12345, ".1f", scale=100) == "12.3"
    assert harness.fmt(None) == harness.DASH
    assert harness.fmt(math.nan) == harness.DASH
    assert harness.fmt_mean_std((0.5, 0.25), ".1f", scale=100) == "50.0 ± 25.0"
    assert harness.fmt_mean_std(None) == harness.DASH


def test_markdown_table_shape_and_row_check():
    table = harness.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        harness.markdown_table(["a", "b"], [[1, 2, 3]])


def test_json_round_trip_is_atomic_and_half_files_read_as_none(tmp_path):
    target = tmp_path / "deep" / "m.json"
    target.parent.mkdir()
    harness.write_json(target, {"x": 1.5, "path": Path("/a")})
    assert json.loads(target.read_text()) == {"x": 1.5, "path": "/a"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.json"]  # no temporary left behind
    target.write_text('{"x": 1')  # a run still writing it
    assert harness.read_json(target) is None
    assert harness.read_json(tmp_path / "missing.json") is None


def test_finished_wants_a_final_entry(tmp_path):
    harness.write_json(tmp_path / "metrics.json", {"final": None, "train": [1]})
    assert harness.finished(tmp_path) is None
    harness.write_json(tmp_path / "metrics.json", {"final": {"acc": 0.5}})
    assert harness.finished(tmp_path) == {"final": {"acc": 0.5}}


def test_fresh_output_dir_refuses_results(tmp_path):
    out = harness.fresh_output_dir(tmp_path / "new", "exp")
    assert out.is_dir()
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        harness.fresh_output_dir(out, "exp")
    assert (out / "results.json").read_text() == "{}"  # nothing already saved is lost


def test_command_line_is_pasteable(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(harness.BENCHMARKS / "experiments" / "lfr.py"), "--out", "a b"])
    assert harness.command_line() == "python3 benchmarks/experiments/lfr.py --out 'a b'"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_jobs_runs_all_logs_and_honours_needs(tmp_path):
    made = tmp_path / "made"
    jobs = [
        harness.Job("second", _python(f"import pathlib; print(pathlib.Path({str(made)!r}).read_text())"),
                    tmp_path / "second.log", needs=(made,)),
        harness.Job("first", _python(f"import pathlib, os; pathlib.Path({str(made)!r}).write_text("
                                     "os.environ['OMP_NUM_THREADS'])"), tmp_path / "first.log", threads=3),
        harness.Job("fails", _python("raise SystemExit(4)"), tmp_path / "fails.log"),
    ]  # fmt: skip
    finished = []
    codes = harness.run_jobs(jobs, parallel=2, poll=0.05, on_finish=lambda j, c: finished.append(j.name),
                             echo=lambda _: None)  # fmt: skip
    assert codes == {"first": 0, "second": 0, "fails": 4}
    assert (tmp_path / "second.log").read_text().strip() == "3"  # waited for "first", saw its threads
    assert finished.index("first") < finished.index("second")


def test_run_jobs_gives_up_on_inputs_that_never_come(tmp_path):
    job = harness.Job("orphan", _python("pass"), tmp_path / "o.log", needs=(tmp_path / "never",))
    assert harness.run_jobs([job], parallel=1, poll=0.05, echo=lambda _: None) == {}


def test_run_jobs_deadline_kills_and_does_not_start(tmp_path):
    jobs = [
        harness.Job(f"sleep{i}", _python("import time; time.sleep(30)"), tmp_path / f"{i}.log")
        for i in range(3)
    ]
    began = time.monotonic()
    codes = harness.run_jobs(jobs, parallel=1, deadline=0.5, poll=0.05, echo=lambda _: None)
    assert time.monotonic() - began < 10
    assert codes == {"sleep0": None}  # killed; the other two never started


def _square(x):
    if x == 3:
        raise RuntimeError("out of memory")
    return x * x


def test_run_calls_isolates_failures_and_queues_more_in_process():
    results = {}

    def on_done(arguments, result, error):
        results[arguments[0]] = result
        return [(10,)] if arguments == (1,) else []  # a widened grid: runs next

    outcome = harness.run_calls(_square, [(1,), (2,), (3,)], parallel=1, name=lambda a: str(a[0]),
                                on_done=on_done, echo=lambda _: None)  # fmt: skip
    assert list(outcome) == ["1", "10", "2", "3"]
    assert outcome["1"] is None and isinstance(outcome["3"], RuntimeError)
    assert results == {1: 1, 10: 100, 2: 4, 3: None}


def test_run_calls_deadline_stops_new_starts():
    outcome = harness.run_calls(time.sleep, [(0.3,), (0.3,)], parallel=1, deadline=0.1, echo=lambda _: None)
    assert len(outcome) == 1


def test_run_calls_rejects_zero_parallel():
    with pytest.raises(ValueError, match="parallel must be at least 1"):
        harness.run_calls(_square, [(1,)], parallel=0)
