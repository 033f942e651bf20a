"""Learning vs forgetting: the Pareto frontier, the source suite, and `lorite analyze forgetting` end to end on
a tiny model with tiny local tasks (commonsense stand-ins in a temporary BIG-bench cache, a toy prose corpus)."""

from __future__ import annotations

import json
import math

import pytest

from helpers import tiny_model_dir, write_task
from lorite.analysis.forgetting import (
    ForgettingConfig,
    ForgettingEvaluator,
    analyze_forgetting,
    discover_points,
    forgetting_score,
    pareto_frontier,
    write_forgetting_report,
)
from lorite.cli import main
from lorite.errors import LoriteError
from lorite.train.finetune import FinetuneConfig, finetune

PROSE = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. "


def test_pareto_frontier_on_hand_made_points():
    points = [
        (0.1, 0.9),
        (0.5, 0.5),
        (0.4, 0.4),
        (0.9, 0.1),
        (0.5, 0.5),
        (0.2, 0.9),
        (math.nan, 1.0),
        (0.9, 0.05),
    ]
    # (0.1, 0.9) loses to (0.2, 0.9); (0.4, 0.4) to (0.5, 0.5); (0.9, 0.05) to (0.9, 0.1); equal points both stay
    assert pareto_frontier(points) == [5, 1, 4, 3]
    assert pareto_frontier([]) == [] and pareto_frontier([(1.0, 1.0)]) == [0]
    assert forgetting_score({"a": 0.5, "b": 0.7}) == pytest.approx(0.6) and forgetting_score({}) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, a training task, two commonsense stand-ins, a prose corpus, and three runs:
    LoRA and full fine-tuning with snapshots, and an interrupted run that left only its checkpoint."""
    from lorite.data import corpora

    root = tmp_path_factory.mktemp("forgetting")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORITE_CACHE", str(root / "cache"))
        patch.setitem(
            corpora.CORPORA, "toyprose", lambda: [corpora.Document(f"ch{i}", PROSE * 6) for i in range(20)]
        )
        for seed, name in enumerate(["cs_one", "cs_two"]):
            write_task(root / "cache" / "bigbench" / "tasks" / f"{name}.json", n=30, seed=10 + seed)
        (root / "cache" / "bigbench" / "index.json").write_text('["cs_one", "cs_two"]')  # no sdist lookups
        model, task = tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")
        base = dict(
            task=f"file:{task}", model=str(model), optimizer="adamw", lr=3e-3, steps=4, batch_size=4,
            n_validation=16, n_test=16, eval_batch_size=16, max_length=64, rank=4, save_every=2,
        )  # fmt: skip
        finetune(FinetuneConfig(**base, method="lora"), out=root / "lora", progress=False)
        finetune(FinetuneConfig(**base, method="full"), out=root / "full", progress=False)
        interrupted = FinetuneConfig(**{**base, "method": "full", "save_every": 0, "checkpoint_every": 2})
        finetune(interrupted, out=root / "cut", progress=False, stop_after=2)
        yield root, patch


def suite_config(**kw):
    base = dict(
        prose="toyprose", prose_blocks=4, block_length=32, commonsense=["cs_one", "cs_two"], n_examples=12
    )
    base.update(kw)
    return ForgettingConfig(**base)


def test_points_of_runs_snapshots_and_checkpoints(world):
    root, _ = world
    config, points = discover_points(root / "lora")
    assert config["method"] == "lora" and [(p.step, p.kind) for p in points] == [
        (2, "adapter"),
        (4, "adapter"),
    ]
    _, points = discover_points(root / "full")
    assert [(p.step, p.kind) for p in points] == [(2, "model"), (4, "model")]
    _, points = discover_points(root / "cut")
    assert [(p.step, p.kind) for p in points] == [(2, "checkpoint")]
    config, points = discover_points(root / "full" / "snapshots" / "step_000002")
    assert config["method"] == "full" and [(p.step, p.kind) for p in points] == [(2, "model")]
    with pytest.raises(LoriteError, match="neither a run directory"):
        discover_points(root / "task")


def test_end_to_end_metrics_agree_with_the_runs(world, tmp_path):
    root, _ = world
    result = analyze_forgetting(
        [str(root / "lora"), str(root / "full"), str(root / "cut")], suite_config(), progress=False
    )
    (base,) = result["base"].values()
    assert base["step"] == 0 and set(base["source"]["commonsense"]) == {"cs_one", "cs_two"}
    assert base["source"]["forgetting_score"] == pytest.approx(statistics_mean(base["source"]["commonsense"]))
    assert base["source"]["prose_perplexity"] > 1
    for name in ("lora", "full"):
        points = result["runs"][str(root / name)]["points"]
        assert [p["step"] for p in points] == [2, 4]
        final = json.loads((root / name / "metrics.json").read_text())["validation"]
        assert points[-1]["target"]["accuracy"] == final["accuracy"], (
            "the saved weights give the run's numbers"
        )
        assert points[-1]["source"]["prose_perplexity"] != base["source"]["prose_perplexity"], (
            "weights changed"
        )
    # the interrupted run's checkpoint at step 2 is the full run's snapshot at step 2 (same seed, data, lr)
    cut = result["runs"][str(root / "cut")]["points"][0]
    full_2 = result["runs"][str(root / "full")]["points"][0]
    assert cut["source"]["prose_perplexity"] == pytest.approx(full_2["source"]["prose_perplexity"], rel=1e-5)
    assert cut["target"] == full_2["target"]
    # the base model evaluated directly gives the base point
    evaluator = ForgettingEvaluator(suite_config(), progress=False)
    again = evaluator.evaluate_base(result["runs"][str(root / "lora")]["config"])
    assert again["source"] == base["source"]

    paths = write_forgetting_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["runs"].keys() == result["runs"].keys()
    table = paths["markdown"].read_text()
    assert "| full adamw lr=0.003 | 4 |" in table and "| lora r=4 adamw lr=0.003 | 2 |" in table
    assert paths["plot"].stat().st_size > 10_000


def statistics_mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def test_training_task_cannot_be_a_source_task(world, tmp_path):
    root, _ = world
    task_file = json.loads((root / "lora" / "metrics.json").read_text())["config"]["task"]
    with pytest.raises(LoriteError, match="is the training task of a run"):
        analyze_forgetting([str(root / "lora")], suite_config(commonsense=[task_file]), progress=False)


def test_cli_forgetting_and_bad_inputs(capsys, world, tmp_path):
    root, _ = world
    common = ["--prose", "toyprose", "--prose-blocks", "2", "--block-length", "32", "--commonsense", "cs_one",
              "--n-examples", "8"]  # fmt: skip
    out = tmp_path / "out"
    code = main(
        ["analyze", "forgetting", "--runs", str(root / "lora"), "--no-target", *common, "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "forgetting.json").read_text())
    assert all("target" not in p for p in saved["runs"][str(root / "lora")]["points"])
    capsys.readouterr()
    for argv, message in [
        (["--runs", str(root / "lora"), *common, "--out", str(out)], "already holds forgetting.json"),
        (["--runs", "/no/run", *common], "is not a directory"),
        (["--runs", " , ", *common], "--runs is empty"),
        (["--runs", str(root / "lora"), *common, "--prose", "tolstoy"], "unknown corpus 'tolstoy'"),
        (["--runs", str(root / "lora"), *common, "--prose-split", "half"], "--prose-split must be one of"),
        (
            ["--runs", str(root / "lora"), *common, "--commonsense", "cs_nope"],
            "unknown BIG-bench task 'cs_nope'",
        ),
        (["--runs", str(root / "lora"), *common, "--n-examples", "0"], "must be >= 1"),
        ([*common], "the following arguments are required: --runs"),
    ]:
        code = main(["analyze", "forgetting", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], (argv, err)


def test_length_normalised_accuracy(monkeypatch):
    """Σ log p picks the short choice; Σ log p per byte the long one (lm-eval's acc_norm)."""
    from lorite.analysis import forgetting
    from lorite.tasks import evaluation as eval_module
    from lorite.tasks.task import Example, Task

    example = Example("pick", choices=("a", "bbbb"), correct=(1,))
    task = Task("toy", "multiple_choice", (example,))
    monkeypatch.setattr(eval_module, "choice_log_likelihoods", lambda *a, **k: [[-2.0, -4.0]])
    suite = forgetting.SourceSuite(None, {"toy": (task, [example])})
    result = forgetting.evaluate_source(None, None, suite)
    assert result["commonsense_accuracy"] == {"toy": 0.0} and result["commonsense_accuracy_norm"] == {
        "toy": 1.0
    }
    assert result["commonsense"] == {"toy": 1.0} and result["forgetting_score"] == 1.0
    assert "prose_perplexity" not in result
    plain = forgetting.evaluate_source(None, None, suite, normalize=False)
    assert plain["commonsense"] == {"toy": 0.0} and plain["forgetting_score"] == 0.0
