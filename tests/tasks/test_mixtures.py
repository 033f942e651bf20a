"""Task mixtures: the spec (``A+B``, BIG-bench globs, errors before anything loads), per-task caps and
temperature probabilities, the data order (seeded, resume-exact), per-task metrics and the macro mean of a
fine-tuning run, a comparison choosing its rate on the macro mean, and ``lorite evaluate --run --task``."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter
from dataclasses import replace

import pytest

from helpers import tiny_model_dir, write_task
from lorite.cli import main
from lorite.errors import LoriteError
from lorite.models import load_causal_lm
from lorite.tasks import (
    Example,
    MixtureData,
    MixtureSampler,
    MixtureSpec,
    Task,
    TaskSpec,
    bigbench,
    check_task_specs,
    is_mixture,
    load_task,
    load_task_data,
    mixture_probabilities,
    parse_spec,
    parse_task_spec,
    split_examples,
)
from lorite.tasks.evaluation import CLASSIFICATION_MAX_LABELS, is_classification
from lorite.tasks.mixture import capped_sizes, check_mixture_settings, macro_metrics
from lorite.train.compare import compare, load_config
from lorite.train.finetune import FinetuneConfig, finetune
from lorite.train.report import task_folder

WORDS = ["red", "blue", "green", "gold"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model and three tasks: multiple choice and generation task.json files, a jsonl of rows."""
    root = tmp_path_factory.mktemp("mixtures")
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        words = [rng.choice(WORDS) for _ in range(3)]
        rows.append({"prompt": f"first of {' '.join(words)}?\n", "completion": words[0]})
    jsonl = root / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": tiny_model_dir(root / "model"),
        "mc": f"file:{write_task(root / 'mc' / 'task.json', n=60)}",
        "gen": f"file:{write_task(root / 'gen' / 'task.json', kind='generation', n=50, seed=1)}",
        "rows": f"jsonl:{jsonl}",
    }


def ni(*numbers: str) -> list[str]:
    names = bigbench.task_names()
    return [next(n for n in names if n.startswith(f"natural_instructions/subtask{k}_")) for k in numbers]


# ------------------------------------------------------------------------------------------- the spec
def test_a_plus_b_is_a_mixture_of_any_sources_in_order():
    spec = parse_spec(" social_iqa + file:/data/a/task.json+jsonl:rows.jsonl+hf:ds#train ")
    assert spec == MixtureSpec(
        (
            TaskSpec("bigbench", "social_iqa"),
            TaskSpec("file", "/data/a/task.json"),
            TaskSpec("jsonl", "rows.jsonl"),
            TaskSpec("hf", "ds#train"),
        )
    )
    assert str(spec) == "social_iqa+file:/data/a/task.json+jsonl:rows.jsonl+hf:ds#train"
    assert parse_spec(str(spec)) == spec and not spec.is_corpus and is_mixture(spec)
    assert parse_spec("social_iqa") == TaskSpec("bigbench", "social_iqa") and not is_mixture("social_iqa")
    with pytest.raises(LoriteError, match="is a task mixture; one task is needed here"):
        parse_task_spec("social_iqa+strategyqa")


def test_globs_expand_over_the_shipped_index_without_groups():
    every = parse_spec("natural_instructions/*")
    names = [m.name for m in every.members]
    assert len(names) == 61 and names == sorted(names)
    assert names[0] == "natural_instructions/subtask001_quoref_question_generation"
    assert "natural_instructions" not in names, "a group of subtasks has no examples of its own"
    assert [m.name for m in parse_spec("natural_instructions/subtask00[1-3]_*").members] == ni(
        "001", "002", "003"
    )
    assert [m.name for m in parse_spec("natural*").members] == names  # the group itself left out
    glob_and_file = parse_spec("bigbench:natural_instructions/subtask06?_*+file:t.json")
    assert [str(m) for m in glob_and_file.members] == [*ni("060", "061"), "file:t.json"]
    assert parse_spec("natural_instructions/subtask050_*").members == (TaskSpec("bigbench", ni("050")[0]),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("social_iqa++strategyqa", "an empty member"),
        ("social_iqa+", "an empty member"),
        ("social_iqa+corpus:shakespeare", "'corpus:shakespeare' is a corpus; a mixture holds tasks"),
        (
            "natural_instructions/nothing_*",
            "task glob 'natural_instructions/nothing_\\*' matches no BIG-bench task",
        ),
        ("social_iqa+strategyqa+social_iqa", "names 'social_iqa' twice"),
        ("natural_instructions/*+" + ni("007")[0], "names 'natural_instructions/subtask007_.*' twice"),
        ("file:", "nothing after 'file:'"),
    ],
)
def test_bad_mixtures_are_refused_by_the_parser(text, message):
    with pytest.raises(LoriteError, match=message):
        parse_spec(text)


def test_an_unknown_member_is_named_with_did_you_mean_before_any_download(monkeypatch, files):
    def no_download(names):
        raise AssertionError(f"the sdist was read for {names}")

    monkeypatch.setattr(bigbench, "_extract", no_download)
    with pytest.raises(LoriteError) as error:
        check_task_specs([f"{files['mc']}+social_iqa+strategyqaa"])
    text = str(error.value)
    assert "unknown BIG-bench task 'strategyqaa'; did you mean 'strategyqa'?" in text
    assert "(member 3 of 3 of the task mixture" in text
    with pytest.raises(LoriteError, match=r"task file '/nope/task\.json' does not exist \(member 2 of 2"):
        check_task_specs([f"{files['mc']}+file:/nope/task.json"])
    assert check_task_specs([f"{files['mc']}+{files['rows']}"]) == [
        MixtureSpec((parse_task_spec(files["mc"]), parse_task_spec(files["rows"])))
    ]


# ------------------------------------------------------------------------------ caps and temperature
def test_caps_and_temperature_probabilities_are_exact():
    assert capped_sizes([5000, 300, 1000], 1000) == [1000, 300, 1000]
    assert mixture_probabilities([100, 400]) == pytest.approx([0.2, 0.8], abs=1e-15)
    assert mixture_probabilities([100, 400], 2.0) == pytest.approx([1 / 3, 2 / 3], abs=1e-15)  # √n: 10, 20
    p = mixture_probabilities([1000, 8, 1], 3.0)  # n^(1/3): 10, 2, 1
    assert p == pytest.approx([10 / 13, 2 / 13, 1 / 13], abs=1e-15)
    assert mixture_probabilities([100, 400, 7], math.inf) == [1 / 3, 1 / 3, 1 / 3]
    assert mixture_probabilities([100, 400], 0.01) == pytest.approx([0.0, 1.0], abs=1e-15)  # no overflow
    for bad_cap, bad_t in ((0, 1.0), (1000, 0.0), (1000, -1.0), (1000, math.nan), (1.5, 1.0)):
        with pytest.raises(LoriteError, match=r"max-examples-per-task|mixture-temperature"):
            check_mixture_settings(bad_cap, bad_t)
    with pytest.raises(LoriteError, match="mixture-temperature"):
        FinetuneConfig(task="social_iqa+strategyqa", mixture_temperature=0.0).validate()


# ------------------------------------------------------------------------------------ the data order
def test_data_order_is_seeded_per_step_and_resumes_exactly():
    sizes, probabilities = [3, 5, 40], mixture_probabilities([3, 5, 40], 2.0)
    straight = MixtureSampler(sizes, probabilities, seed=7, batch_size=4, grad_accum=2)
    everything = [straight.indices(step, micro) for step in range(30) for micro in range(2)]
    resumed = MixtureSampler(sizes, probabilities, seed=7, batch_size=4, grad_accum=2)
    assert [resumed.indices(step, micro) for step in range(17, 30) for micro in range(2)] == everything[34:]
    assert straight.indices(3, 1) == everything[7], "an earlier step again: the same indices"
    other = MixtureSampler(sizes, probabilities, seed=8, batch_size=4, grad_accum=2)
    assert [other.indices(s, m) for s in range(30) for m in range(2)] != everything
    drawn = [i for batch in everything for i in batch]
    assert all(0 <= i < 48 for i in drawn)
    # each member's draws walk through epochs: every example once before any example twice
    for member, (start, n) in enumerate(((0, 3), (3, 5), (8, 40))):
        own = [i for i in drawn if start <= i < start + n]
        for epoch in range(len(own) // n):
            assert sorted(own[epoch * n : (epoch + 1) * n]) == list(range(start, start + n)), member
    assert len(drawn) == 240
    many = MixtureSampler(sizes, probabilities, seed=0, batch_size=64)
    counts = Counter(0 if i < 3 else 1 if i < 8 else 2 for s in range(100) for i in many.indices(s))
    assert [counts[k] / 6400 for k in range(3)] == pytest.approx(probabilities, abs=0.02)


def test_macro_metrics_average_the_members():
    per_task = {
        "a": {"accuracy": 0.5, "acc_norm": 0.25, "score": 0.5, "n": 10},
        "b": {"rouge_l": 0.2, "exact_match": 0.1, "perplexity": 3.0, "score": 0.2, "n": 30, "samples": ["x"]},
    }
    assert macro_metrics(per_task) == {
        "score": 0.35, "n": 40, "n_tasks": 2, "n_scored_by_exact_match": 0, "per_task": per_task,
    }  # fmt: skip
    per_task["b"]["score_metric"] = "exact_match"
    assert macro_metrics(per_task)["n_scored_by_exact_match"] == 1
    both = {"a": {"score": 0.5, "rouge_l": 0.4, "n": 1}, "b": {"score": 0.1, "rouge_l": 0.2, "n": 2}}
    assert macro_metrics(both)["rouge_l"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------- data and runs
def test_mixture_data_splits_each_member_by_the_one_rule_and_caps_training(files):
    _, tokenizer = load_causal_lm(str(files["model"]))
    spec = f"{files['mc']}+{files['gen']}+{files['rows']}"
    data = load_task_data(spec, tokenizer, split_seed=1, n_validation=5, n_test=6, max_length=64,
                          max_examples_per_task=30)  # fmt: skip
    assert isinstance(data, MixtureData) and list(data.members) == [files["mc"], files["gen"], files["rows"]]
    for name, member in data.members.items():
        expected = split_examples(load_task(name), 1, 5, 6)
        assert member.validation == expected.validation and member.test == expected.test
    # training splits: 60 - 11 = 49 → 30, 50 - 11 = 39 → 30, 40 - 11 = 29 (under the cap)
    assert data.train_sizes == [30, 30, 29] and data.n_train == 89 == len(data.train)
    single = load_task_data(files["mc"], tokenizer, split_seed=1, n_validation=5, n_test=6, max_length=64)
    assert [e.input_ids for e in data.train[:30]] == [e.input_ids for e in single.train[:30]]


def mixture_config(files, **kw):
    base = dict(
        task=f"{files['mc']}+{files['gen']}+{files['rows']}", model=str(files["model"]), optimizer="adamw",
        lr=1e-2, rank=4, steps=4, batch_size=4, n_validation=4, n_test=4, eval_batch_size=16, max_length=64,
        target_modules=["q_proj", "v_proj"], max_examples_per_task=20, mixture_temperature=2.0, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_on_a_mixture_reports_every_task_and_the_macro_mean_and_resumes_exactly(files, tmp_path):
    cfg = mixture_config(files, checkpoint_every=2)
    straight = finetune(cfg, out=tmp_path / "straight", progress=False)
    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    for split in ("validation", "test"):
        metrics = saved[split]
        assert list(metrics["per_task"]) == [files["mc"], files["gen"], files["rows"]]
        scores = [m["score"] for m in metrics["per_task"].values()]
        assert metrics["score"] == pytest.approx(statistics.fmean(scores))
        assert metrics["n"] == 12 and metrics["n_tasks"] == 3
        assert (
            "accuracy" in metrics["per_task"][files["mc"]] and "rouge_l" in metrics["per_task"][files["gen"]]
        )
    assert saved["config"]["max_examples_per_task"] == 20 and saved["config"]["mixture_temperature"] == 2.0
    curve = saved["history"]["validation"]
    assert [point["step"] for point in curve] == [4] and "per_task" not in curve[0]
    assert curve[-1]["score"] == saved["validation"]["score"]
    cfg = replace(cfg, skip_test=True)  # the same training; fewer evaluations
    finetune(cfg, out=tmp_path / "resumed", progress=False, stop_after=2)
    resumed = finetune(cfg, out=tmp_path / "resumed", resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["validation"]["score"] == straight["validation"]["score"]


def test_compare_on_a_mixture_picks_the_rate_on_the_macro_validation_mean(files, tmp_path):
    base = mixture_config(files, task="", steps=3, n_validation=4, n_test=4)
    mixture = f"{files['mc']}+{files['rows']}"
    results = compare(
        [mixture], ["adamw"], {"adamw": [1e-3, 3e-1]}, 1, base, tmp_path / "cmp", progress=False
    )
    info = results["tasks"][mixture]["optimizers"]["adamw"]
    folder = tmp_path / "cmp" / task_folder(mixture) / "adamw"
    macro = {}
    for lr in (1e-3, 3e-1):
        validation = json.loads((folder / f"lr{lr:g}_seed0" / "metrics.json").read_text())["validation"]
        macro[lr] = statistics.fmean(m["score"] for m in validation["per_task"].values())
        assert info["grid"][f"{lr:g}"] == pytest.approx(macro[lr])
    assert info["best_lr"] == max(macro, key=lambda lr: (macro[lr], -lr))
    assert set(info["test_per_task"]) == {files["mc"], files["rows"]}
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Per-task test scores of the mixtures" in report and f"| {files['rows']} |" in report
    assert "| **macro mean** |" in report
    zero = results["tasks"][mixture]["zero_shot"]["test"]
    assert zero["score"] == pytest.approx(statistics.fmean(m["score"] for m in zero["per_task"].values()))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_finetunes_a_mixture_and_evaluates_its_adapter_on_another_task(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--task", f"{files['mc']}+{files['rows']}", "--model", str(files["model"]),
            "--steps", "2", "--device", "cpu", "--out", str(out), "--rank", "4", "--batch-size", "4",
            "--n-validation", "4", "--n-test", "4", "--optimizer", "adamw", "--lr", "1e-3",
            "--max-examples-per-task", "8", "--mixture-temperature", "inf"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["test"]["per_task"]) == {files["mc"], files["rows"]}
    assert (
        saved["config"]["mixture_temperature"] == math.inf and saved["config"]["max_examples_per_task"] == 8
    )
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--task", files["gen"], "--device", "cpu"]) == 0
    transfer = json.loads(capsys.readouterr().out)
    assert transfer["task"] == files["gen"] and transfer["adapter"] == str(out / "adapter")
    assert transfer["test"]["n"] == 4 and "rouge_l" in transfer["test"], "the run's n_test, the other task"
    assert main(["evaluate", "--run", str(out), "--task", "strategyqaa+social_iqa"]) == 2
    assert "did you mean 'strategyqa'" in capsys.readouterr().err
    bad = ["finetune", "--task", "natural_instructions/none_*", "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and "matches no BIG-bench task" in capsys.readouterr().err


def test_the_sni_config_holds_out_every_fifth_subtask_by_name():
    from pathlib import Path

    config = load_config(Path(__file__).parents[2] / "benchmarks" / "configs" / "sni_mixture.json")
    every = [m.name for m in parse_spec("natural_instructions/*").members]
    (trained,), (heldout,) = config["tasks"], config["heldout_tasks"]
    assert [m.name for m in parse_spec(heldout).members] == every[4::5]
    assert [m.name for m in parse_spec(trained).members] == [n for i, n in enumerate(every) if i % 5 != 4]
    assert config["seeds"] == 3 and config["training"]["rank"] == 16 and config["training"]["eval_every"]
    assert len(config["optimizers"]) == 7


def test_a_held_out_task_that_is_also_trained_on_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"tasks": ["social_iqa+strategyqa"], "optimizers": ["adamw"],
                                "heldout_tasks": ["strategyqa"]}))  # fmt: skip
    with pytest.raises(LoriteError, match="held-out task 'strategyqa' is also trained on"):
        load_config(path)


# ---------------------------------------------------------------- classification scores and transfer
def _task(answers: list[str], kind: str = "generation") -> Task:
    if kind == "multiple_choice":
        examples = tuple(
            Example(input=f"q{i}", choices=("a", "b"), correct=(0,)) for i in range(len(answers))
        )
    else:
        examples = tuple(Example(input=f"q{i}", targets=(a,)) for i, a in enumerate(answers))
    return Task(name="t", kind=kind, examples=examples)


def test_a_generation_task_with_a_small_label_set_is_a_classification():
    assert is_classification(_task(["Yes", "no.", "YES", "No"] * 5))  # normalised: 2 labels, 20 examples
    assert not is_classification(_task([f"answer {i}" for i in range(200)]))  # free-form answers
    assert not is_classification(_task(["yes", "no", "maybe", "never"] * 4))  # 16 < 5 per label
    assert not is_classification(_task(["x"] * 30, kind="multiple_choice"))
    labels = [f"category {chr(97 + i)}" for i in range(CLASSIFICATION_MAX_LABELS + 1)]
    assert not is_classification(_task(labels * 10))
    assert is_classification(_task(labels[:-1] * 10))


def test_thirteen_natural_instructions_subtasks_are_classifications():
    """The SNI config's exact-match subtasks (docs/results.md) — read off the real BIG-bench files."""
    names = [n for n in bigbench.task_names() if n.startswith("natural_instructions/")]
    tasks = bigbench.load_tasks(names)
    found = sorted(n.split("/")[1][7:10] for n, task in tasks.items() if is_classification(task))
    assert found == [
        "018",
        "019",
        "020",
        "021",
        "022",
        "027",
        "043",
        "046",
        "047",
        "050",
        "052",
        "056",
        "057",
    ]


def test_compare_scores_every_run_on_the_held_out_tasks_and_classifications_by_exact_match(files, tmp_path):
    base = mixture_config(
        files, task="", steps=3, n_validation=4, n_test=6, transfer_task=files["gen"],
        classification_score="exact_match", eval_every=2,
    )  # fmt: skip
    mixture = f"{files['mc']}+{files['rows']}"
    results = compare([mixture], ["adamw"], {"adamw": [1e-3]}, 2, base, tmp_path / "cmp", progress=False)
    folder = tmp_path / "cmp" / task_folder(mixture) / "adamw"
    runs = [json.loads((folder / f"lr0.001_seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    for run in runs:
        rows = run["test"]["per_task"][files["rows"]]  # four one-word answers: a classification
        assert rows["score_metric"] == "exact_match" and rows["score"] == rows["exact_match"]
        assert (
            run["test"]["per_task"][files["mc"]]["score"] == run["test"]["per_task"][files["mc"]]["accuracy"]
        )
        transfer = run["transfer"]  # one task (no per_task): four one-word answers, scored by exact match
        assert transfer["n"] == 6 and transfer["score_metric"] == "exact_match"
        assert transfer["score"] == transfer["exact_match"]
    info = results["tasks"][mixture]["optimizers"]["adamw"]
    assert info["transfer_score"][0] == pytest.approx(statistics.fmean(r["transfer"]["score"] for r in runs))
    assert set(info["transfer_per_task"]) == {files["gen"]}
    zero = results["tasks"][mixture]["zero_shot"]["transfer"]
    assert zero["n"] == 6 and zero["score"] == zero["exact_match"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Zero-shot transfer to held-out tasks" in report and f"| {files['gen']} |" in report
    assert "exact match for classification tasks" in report
    plot = f"validation_{task_folder(mixture)}.png"  # the curves at the best lr: steps 2 and 3
    assert (tmp_path / "cmp" / plot).is_file() and f"({plot})" in report
    assert [p["step"] for p in info["validation_curves"][0]] == [2, 3]


def test_a_transfer_task_that_is_also_trained_on_is_refused(files):
    with pytest.raises(LoriteError, match=r"--transfer-task .* is also trained on"):
        finetune(mixture_config(files, transfer_task=files["rows"]), progress=False)
    with pytest.raises(LoriteError, match="--classification-score must be one of rouge_l, exact_match"):
        finetune(mixture_config(files, classification_score="f1"), progress=False)
