"""The run log (``RUN/log.jsonl``, and TensorBoard with ``--report-to tensorboard``): a line per optimizer
step and per evaluation, from fine-tuning, pre-training and every run of a comparison; a resumed run's log
equals the uninterrupted run's; the gradient norm is the one before clipping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_lorite, tiny_model_dir, write_task
from lorite.cli import main
from lorite.data.blocks import build_token_cache
from lorite.errors import LoriteError
from lorite.models import load_causal_lm
from lorite.runtime import lr_factor, seed_everything
from lorite.tasks.encoding import lm_loss
from lorite.train.compare import compare
from lorite.train.finetune import FinetuneConfig, batch_indices, data_for, finetune, make_batch
from lorite.train.methods import get_method
from lorite.train.pretrain import PretrainConfig, pretrain
from lorite.train.run_log import LOG_FILE, TENSORBOARD_DIR, RunLog, check_report_to, gradient_norm
from pretraining_data import char_tokenizer, synthetic_corpora

TIMINGS = ("elapsed_s", "tokens_per_s")


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]


def steps_of(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["event"] == "step"]


def untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in lines]


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """The (step, value) pairs of a TensorBoard scalar, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runlog")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


def config(setup, **kw) -> FinetuneConfig:
    model, task = setup
    base = dict(
        task=f"file:{task}", model=str(model), optimizer="lora_rite", lr=1e-2, rank=4, steps=4, batch_size=4,
        n_validation=16, n_test=16, eval_batch_size=16, max_length=64, target_modules=["q_proj", "v_proj"],
        device="cpu",
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def first_step_by_hand(cfg: FinetuneConfig) -> tuple[float, float, int, int]:
    """The loss, trainable-gradient norm, non-pad tokens and padded batch size of the first step, computed
    outside the loop (same seed, so the same LoRA initialisation and batch)."""
    seed_everything(cfg.seed)
    model, tokenizer = load_causal_lm(cfg.model)
    model = get_method(cfg.method).prepare(model, cfg)
    data = data_for(cfg, tokenizer)
    batch = make_batch(
        data, batch_indices(data.n_train, cfg.batch_size, cfg.seed, 0, 0, 1), tokenizer.pad_token_id
    )
    loss = lm_loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    return float(loss.detach()), norm, int(batch["attention_mask"].sum()), batch["input_ids"].numel()


# ---------------------------------------------------------------------------------------- fine-tuning
def test_finetune_writes_a_line_per_step_and_per_evaluation(setup, tmp_path):
    cfg = config(setup, eval_every=2, checkpoint_every=4, max_length=256)  # long enough to need padding
    out = tmp_path / "run"
    finetune(cfg, out=out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    lines = read_log(out)
    steps = steps_of(lines)
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert [line["loss"] for line in steps] == metrics["history"]["loss"]
    assert all(math.isfinite(line["loss"]) for line in steps)

    # lr: each param group's, as the schedule gives it for that step (the checkpoint holds the groups)
    groups = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["optimizer"][
        "param_groups"
    ]
    warmup = max(1, cfg.steps // 10)
    for line in steps:
        assert len(line["lr"]) == len(groups)
        factor = lr_factor(line["step"] - 1, cfg.steps, warmup, cfg.schedule)
        assert line["lr"] == pytest.approx([g["initial_lr"] * factor for g in groups], rel=1e-12)
    assert steps[0]["lr"] != steps[-1]["lr"], "the schedule moves"

    loss, norm, tokens, padded = first_step_by_hand(cfg)
    assert steps[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert steps[0]["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0
    assert all(line["grad_norm"] > 0 and math.isfinite(line["grad_norm"]) for line in steps)
    assert steps[0]["tokens"] == tokens and 0 < tokens < padded, "the non-pad tokens only"
    for line in steps:
        assert line["tokens_per_s"] > 0 and line["elapsed_s"] > 0
    assert [line["elapsed_s"] for line in steps] == sorted(line["elapsed_s"] for line in steps)

    evals = [(line["step"], line["split"]) for line in lines if line["event"] == "eval"]
    assert evals == [(2, "validation"), (4, "validation"), (4, "test")]
    validation = [line for line in lines if line["event"] == "eval" and line["split"] == "validation"]
    assert [line["score"] for line in validation] == [v["score"] for v in metrics["history"]["validation"]]
    test = next(line for line in lines if line.get("split") == "test")
    assert test["score"] == metrics["test"]["score"] and test["n"] == 16
    assert "answers" not in test  # numbers only


def test_grad_norm_is_the_one_before_clipping(setup, tmp_path):
    cfg = config(setup, steps=2, max_grad_norm=1e-6)
    finetune(cfg, out=tmp_path / "clipped", progress=False)
    finetune(config(setup, steps=2), out=tmp_path / "free", progress=False)
    clipped, free = steps_of(read_log(tmp_path / "clipped")), steps_of(read_log(tmp_path / "free"))
    _, norm, _, _ = first_step_by_hand(cfg)
    assert clipped[0]["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 1e3 * cfg.max_grad_norm
    assert clipped[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-6)
    assert clipped[1]["loss"] != free[1]["loss"], "the clipping itself took effect"


def test_resumed_finetune_log_equals_the_uninterrupted_one(setup, tmp_path):
    cfg = config(setup, steps=4, eval_every=1, checkpoint_every=2)
    finetune(cfg, out=tmp_path / "straight", progress=False)
    finetune(cfg, out=tmp_path / "resumed", progress=False, stop_after=3)
    interrupted = read_log(tmp_path / "resumed")
    assert [line["step"] for line in steps_of(interrupted)] == [1, 2, 3]  # step 3 is past the checkpoint
    finetune(cfg, out=tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert untimed(resumed) == untimed(straight)
    assert [line["step"] for line in steps_of(resumed)] == [1, 2, 3, 4]
    clock = [line["elapsed_s"] for line in steps_of(resumed)]
    assert clock == sorted(clock), "the resumed session's clock goes on from the checkpoint's line"


def test_every_run_of_a_comparison_has_its_log(setup, tmp_path):
    base = config(setup, task="", steps=2, n_validation=8, n_test=8)
    out = tmp_path / "cmp"
    _, task = setup
    compare(
        [f"file:{task}"], ["adamw"], {"adamw": [1e-3, 1e-2]}, 1, base, out, progress=False, zero_shot=False
    )
    logs = sorted(out.rglob(LOG_FILE))
    assert len(logs) == 2
    for log in logs:
        lines = read_log(log.parent)
        assert [line["step"] for line in steps_of(lines)] == [1, 2]
        lr = json.loads((log.parent / "metrics.json").read_text())["config"]["lr"]
        assert steps_of(lines)[0]["lr"][0] == pytest.approx(lr * lr_factor(0, 2, 1, "cosine"))


# ---------------------------------------------------------------------------------------- TensorBoard
def test_report_to_tensorboard_writes_the_same_scalars(setup, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    model, task = setup
    args = [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "adamw", "--lr", "1e-2",
        "--rank", "4", "--steps", "3", "--batch-size", "4", "--n-validation", "8", "--n-test", "8",
        "--max-length", "64", "--target-modules", "q_proj,v_proj", "--device", "cpu",
        "--report-to", "tensorboard", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["report_to"] == "tensorboard"
    assert list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    steps = steps_of(read_log(out))
    loss = scalars(out, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([line["loss"] for line in steps], rel=1e-6)
    assert [v for _, v in scalars(out, "train/grad_norm")] == pytest.approx(
        [line["grad_norm"] for line in steps], rel=1e-6
    )
    assert [v for _, v in scalars(out, "train/lr")] == pytest.approx([line["lr"][0] for line in steps])
    test = next(line for line in read_log(out) if line.get("split") == "test")
    assert scalars(out, "test/score") == [(3, pytest.approx(test["score"]))]


def test_a_resumed_tensorboard_log_hides_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLog(tmp_path, report_to="tensorboard") as log:
        for step in (1, 2, 3, 4):
            log.step(step, loss=float(step), lr=[0.1], grad_norm=1.0, tokens=10, seconds=0.5)
    with RunLog(tmp_path, resume_step=2, report_to="tensorboard") as log:
        for step in (3, 4):
            log.step(step, loss=10.0 * step, lr=[0.1], grad_norm=1.0, tokens=10, seconds=0.5)
    assert scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [line["loss"] for line in read_log(tmp_path)] == [1.0, 2.0, 30.0, 40.0]


def test_report_to_is_checked(setup, monkeypatch, tmp_path, capsys):
    with pytest.raises(LoriteError, match="--report-to must be one of none, tensorboard"):
        config(setup, report_to="wandb").validate()
    with pytest.raises(LoriteError, match="--report-to must be one of"):
        PretrainConfig(report_to="wandb", device="cpu").validate()
    model, task = setup
    out = tmp_path / "x"
    args = ["finetune", "--task", f"file:{task}", "--model", str(model), "--out", str(out)]
    assert main([*args, "--report-to", "wandb"]) == 2
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(LoriteError, match="needs the tensorboard package"):
        check_report_to("tensorboard")
    assert main([*args, "--report-to", "tensorboard"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- the RunLog itself
def test_run_log_lines_are_strict_json_and_resume_drops_the_unfinished_tail(tmp_path):
    with RunLog(tmp_path) as log:
        log.step(1, loss=2.0, lr=[1e-3, 2e-3], grad_norm=0.5, tokens=100, seconds=0.25)
        log.evaluation(
            1, "validation", {"score": 0.5, "n": 8, "answers": ["a"], "by_corpus": {"c": {"loss": 1.5}}}
        )
        log.step(2, loss=float("nan"), lr=[1e-3, 2e-3], grad_norm=float("inf"), tokens=100, seconds=0.25)
        log.step(3, loss=1.0, lr=[1e-3, 2e-3], grad_norm=0.5, tokens=100, seconds=0.25)
    lines = read_log(tmp_path)
    assert lines[0] == {
        "event": "step", "step": 1, "loss": 2.0, "lr": [1e-3, 2e-3], "grad_norm": 0.5, "tokens": 100,
        "tokens_per_s": 400.0, "elapsed_s": lines[0]["elapsed_s"],
    }  # fmt: skip
    assert lines[1] == {
        "event": "eval",
        "step": 1,
        "split": "validation",
        "score": 0.5,
        "n": 8,
        "by_corpus/c/loss": 1.5,
    }
    assert lines[2]["loss"] is None and lines[2]["grad_norm"] is None  # no NaN/Infinity in the file
    with (tmp_path / LOG_FILE).open("a") as handle:
        handle.write('{"event": "step", "step": 4, "lo')  # a write the process did not finish
    with RunLog(tmp_path, resume_step=2) as log:
        log.step(3, loss=0.5, lr=[1e-3, 2e-3], grad_norm=0.5, tokens=100, seconds=0.25)
    resumed = read_log(tmp_path)
    assert [(line["event"], line["step"]) for line in resumed] == [
        ("step", 1),
        ("eval", 1),
        ("step", 2),
        ("step", 3),
    ]
    assert resumed[-1]["loss"] == 0.5 and resumed[-1]["elapsed_s"] >= lines[0]["elapsed_s"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "rewritten atomically"
    with RunLog(tmp_path) as log:  # a new run replaces the log
        log.step(1, loss=9.0, lr=[1.0], grad_norm=1.0, tokens=1, seconds=1.0)
    assert [line["loss"] for line in read_log(tmp_path)] == [9.0]


def test_a_disabled_run_log_writes_nothing(tmp_path):
    for log in (RunLog(tmp_path, enabled=False), RunLog(None)):
        with log:
            assert not log.active
            log.step(1, loss=1.0, lr=[1.0], grad_norm=1.0, tokens=1, seconds=1.0)
            log.evaluation(1, "validation", {"score": 1.0})
    assert not list(tmp_path.iterdir())


def test_gradient_norm_clips_and_returns_the_norm_before():
    weights = [
        torch.nn.Parameter(torch.zeros(2)),
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(1)),
    ]
    weights[0].grad, weights[1].grad = (
        torch.tensor([3.0, 0.0]),
        torch.tensor([0.0, 4.0, 0.0]),
    )  # the third has none
    assert float(gradient_norm(weights)) == pytest.approx(5.0)
    assert float(gradient_norm(weights, max_norm=1.0)) == pytest.approx(5.0)
    assert float(gradient_norm(weights)) == pytest.approx(1.0, rel=1e-5), "clipped to max_norm"


# ---------------------------------------------------------------------------------------- pre-training
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=root
    )


def tiny(cache, **overrides) -> PretrainConfig:
    settings = dict(
        size="tiny", lr=3e-3, tokens=32 * 8 * 12, block_length=32, batch_size=8, corpora=["prose", "code"],
        data=str(cache), eval_every=6, eval_blocks=8, log_every=3, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_pretrain_writes_the_log_and_resumes_it(cache, tmp_path):
    metrics = pretrain(tiny(cache, checkpoint_every=4, grad_clip=1e-3), tmp_path / "full")
    lines = read_log(tmp_path / "full")
    steps = steps_of(lines)
    assert [line["step"] for line in steps] == list(range(1, 13))
    logged = {e["step"]: e["loss"] for e in metrics["train"]}
    assert {line["step"]: line["loss"] for line in steps if line["step"] in logged} == logged
    assert all(line["tokens"] == metrics["tokens_per_step"] == 32 * 8 for line in steps)
    warmup = round(0.1 * 12)
    for line in steps:
        factor = lr_factor(line["step"] - 1, 12, warmup, "cosine", 0.1)
        assert line["lr"] == pytest.approx([3e-3 * factor] * len(metrics["optimizer_groups"]))
    assert all(line["grad_norm"] > 1e-3 for line in steps), "the norm before clipping to 1e-3"
    evals = [line for line in lines if line["event"] == "eval"]
    assert [line["step"] for line in evals] == [0, 6, 12]
    assert [line["loss"] for line in evals] == [v["loss"] for v in metrics["validation"]]
    assert evals[-1]["by_corpus/prose/ppl"] == metrics["final"]["by_corpus"]["prose"]["ppl"]
    assert evals[-1]["tokens"] == 12 * 32 * 8

    pretrain(tiny(cache, checkpoint_every=4, grad_clip=1e-3), tmp_path / "split", stop_after=6)
    pretrain(tiny(cache, checkpoint_every=4, grad_clip=1e-3), tmp_path / "split", resume=True)
    assert untimed(read_log(tmp_path / "split")) == untimed(lines)


def test_pretrain_cli_report_to_may_change_on_resume(cache, tmp_path):
    pytest.importorskip("tensorboard")
    pretrain(tiny(cache, eval_every=0), tmp_path / "run", stop_after=5)
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert main(["pretrain", "--resume", str(tmp_path / "run"), "--report-to", "tensorboard"]) == 0
    assert [s for s, _ in scalars(tmp_path / "run", "train/loss")] == list(range(6, 13))
    assert [line["step"] for line in steps_of(read_log(tmp_path / "run"))] == list(range(1, 13))


# ---------------------------------------------------------------------------------------- several ranks
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_torchrun_log_equals_one_process(setup, tmp_path, engine):
    """2 ranks (gloo, CPU): rank 0 writes one log for both; the gradient norm is the global one (FSDP2:
    over the full tensors, not a shard), the tokens those of both ranks' halves of the batch."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model, task = setup
    args = [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "lora_rite",
        "--lr", "1e-2", "--rank", "4", "--steps", "3", "--batch-size", "6", "--n-validation", "12",
        "--n-test", "12", "--max-length", "64", "--device", "cpu", "--target-modules", "q_proj,v_proj",
    ]  # fmt: skip
    run_lorite([*args, "--out", str(tmp_path / "one")], 1)
    run_lorite([*args, "--out", str(tmp_path / "two"), "--parallel", engine], 2)
    one, two = steps_of(read_log(tmp_path / "one")), steps_of(read_log(tmp_path / "two"))
    assert [line["step"] for line in two] == [1, 2, 3]
    assert [line["tokens"] for line in two] == [line["tokens"] for line in one]
    assert [line["grad_norm"] for line in two] == pytest.approx([line["grad_norm"] for line in one], rel=1e-4)
    assert [line["loss"] for line in two] == pytest.approx([line["loss"] for line in one], rel=1e-4)
    assert [line["lr"] for line in two] == [line["lr"] for line in one]
