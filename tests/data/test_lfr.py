"""LFR sampler (arXiv 2409.06131): exact phase sets on blocks of known difficulty, token accounting, resume
equality, DDP sharding with gathered tables (gloo, 2 processes), the optional evaluation pass."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch

from helpers import free_port, spawn_ranks
from lorite.data.lfr import LFRConfig, LFRSampler, eval_pass_scorer, keep_size
from lorite.errors import LoriteError

N, BATCH = 40, 4


def difficulty(seed: int, n: int = N) -> torch.Tensor:
    """A known per-block loss whose order is unrelated to the block ids."""
    gen = torch.Generator().manual_seed(seed)
    return 1.0 + torch.randperm(n, generator=gen).double() / n


def run(sampler: LFRSampler, losses_by_phase: dict[str, torch.Tensor], steps: int | None = None):
    """Drive ``sampler`` like a training loop; per-step (phase name, indices)."""
    history = []
    for _ in range(sampler.total_steps if steps is None else steps):
        idx = sampler.next_indices()
        history.append((sampler.phase.name, idx))
        sampler.observe(idx, losses_by_phase[sampler.phase.name][idx])
    return history


def by_phase(history) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for name, idx in history:
        out.setdefault(name, Counter()).update(idx.tolist())
    return out


def hardest(scores: torch.Tensor, keep: int) -> set[int]:
    return set(torch.argsort(scores, descending=True)[:keep].tolist())


def test_defaults_and_token_accounting():
    config = LFRConfig()
    assert (config.learn_epochs, config.focus_drop, config.focus_epochs, config.review_epochs) == (
        1,
        0.5,
        1,
        1,
    )
    assert (config.final_drop, config.final_epochs, config.final_reps) == (0.7, 1, 5)
    # N·(1 + 0.5 + 1 + 5·0.3) = 4.0 corpus-epochs
    assert config.corpus_epochs(1000) == pytest.approx(4.0)
    assert config.planned_blocks(N) == 40 + 20 + 40 + 5 * 12
    assert config.planned_steps(N, BATCH) == 40
    assert config.planned_tokens(N, 16, BATCH) == 40 * BATCH * 16
    assert keep_size(100, 0.29) == 71 and keep_size(10, 0.7) == 3 and keep_size(7, 0.5) == 4


def test_phases_drop_easiest_and_revisit_all():
    learn_loss, review_loss = difficulty(1), difficulty(2)
    sampler = LFRSampler(N, BATCH, total_steps=40, seed=3)
    assert [(p["name"], p["start_step"], p["end_step"], p["keep_size"]) for p in sampler.plan()] == [
        ("learn", 0, 10, 40),
        ("focus", 10, 15, 20),
        ("review", 15, 25, 40),
        ("final_focus", 25, 40, 12),
    ]
    losses = {"learn": learn_loss, "focus": learn_loss, "review": review_loss, "final_focus": review_loss}
    counts = by_phase(run(sampler, losses))
    everything = set(range(N))
    assert counts["learn"] == Counter(dict.fromkeys(everything, 1))
    # Focus keeps exactly the 20 highest-loss (hardest) blocks of the Learn record, each once
    assert counts["focus"] == Counter(dict.fromkeys(hardest(learn_loss, 20), 1))
    assert counts["review"] == Counter(dict.fromkeys(everything, 1))
    # final Focus: ranked by the Review record only (rank_from="latest"); 12 = 40 − ⌊40·0.7⌋ blocks × 5 reps
    assert counts["final_focus"] == Counter(dict.fromkeys(hardest(review_loss, 12), 5))
    assert hardest(review_loss, 12) != hardest(learn_loss, 12)
    torch.testing.assert_close(sampler.scores(), review_loss.exp())
    records = sampler.records()
    assert list(records) == [0, 2]  # Learn and Review
    torch.testing.assert_close(records[0], learn_loss.exp().float())
    torch.testing.assert_close(records[2], review_loss.exp().float())


@pytest.mark.parametrize("n_blocks", [41, 23, 9])
def test_micro_batches_never_repeat_a_block(n_blocks):
    """Epoch boundaries fall inside micro-batches (41, 23, 9 blocks; global batch 4): still no repeats
    within a micro-batch (unless the keep-set is smaller than the batch: 9 blocks keep 3 in the final
    Focus), and every epoch visits each block of the phase's set once."""
    config = LFRConfig()
    steps = config.planned_steps(n_blocks, BATCH)
    sampler = LFRSampler(n_blocks, BATCH, steps, seed=11)
    loss = difficulty(1, n_blocks)
    stream: dict[int, list[int]] = {}
    for _ in range(steps):
        idx = sampler.next_indices()
        assert len(set(idx.tolist())) == min(BATCH, len(sampler.keep_set()))
        stream.setdefault(sampler.phase_index, []).extend(idx.tolist())
        sampler.observe(idx, loss[idx])
    for j, ids in stream.items():
        size = sampler.plan()[j]["keep_size"]
        for e in range(len(ids) // size):
            assert len(set(ids[e * size : (e + 1) * size])) == size, (j, e)


def test_rank_from_all_and_loss_score():
    learn_loss, review_loss = difficulty(1), difficulty(2)
    losses = {"learn": learn_loss, "focus": learn_loss, "review": review_loss, "final_focus": review_loss}
    for score, mean in (
        ("ppl", (learn_loss.exp() + review_loss.exp()) / 2),
        ("loss", (learn_loss + review_loss) / 2),
    ):
        sampler = LFRSampler(N, BATCH, 40, seed=0, rank_from="all", score=score)
        counts = by_phase(run(sampler, losses))
        assert set(counts["final_focus"]) == hardest(mean, 12)
        torch.testing.assert_close(sampler.scores(), mean)


def test_ties_broken_by_id_and_unrecorded_blocks_kept():
    flat = torch.ones(N, dtype=torch.float64)
    sampler = LFRSampler(N, BATCH, 40, seed=0)
    counts = by_phase(run(sampler, dict.fromkeys(["learn", "focus", "review", "final_focus"], flat)))
    assert set(counts["focus"]) == set(range(20, 40))  # equal scores: the lower ids are dropped

    # a compressed schedule: Learn gets 3 micro-batches, 12 of 40 blocks; the unrecorded 28 count as hardest
    short = LFRSampler(N, BATCH, total_steps=12, seed=0)
    assert short.plan()[0]["end_step"] == 3
    learned = set()
    for _ in range(3):
        idx = short.next_indices()
        learned |= set(idx.tolist())
        short.observe(idx, torch.zeros(len(idx)))
    short.next_indices()
    assert short.phase.name == "focus"
    # 28 unrecorded blocks score +∞; keeping 20 of them drops the lower ids first (ties by id)
    unrecorded = sorted(set(range(N)) - learned)
    assert len(learned) == 12
    assert short.keep_set().tolist() == unrecorded[-20:]


def test_refresh_each_rep_reranks_from_focus_records():
    sampler = LFRSampler(N, BATCH, 40, seed=0, refresh_each_rep=True)
    names = [p["name"] for p in sampler.plan()]
    assert names == ["learn", "focus", "review"] + ["final_focus"] * 5
    review_loss = difficulty(2)
    # during the final reps a kept block's loss drops to 0 once seen: the next rep must drop it
    live = review_loss.clone()
    first_keep = None
    for _ in range(40):
        idx = sampler.next_indices()
        if sampler.phase.name == "final_focus" and first_keep is None:
            first_keep = set(sampler.keep_set().tolist())
        sampler.observe(idx, live[idx])
        if sampler.phase.name == "final_focus":
            live[idx] = 0.0
    assert first_keep == hardest(review_loss, 12)
    assert set(sampler.keep_set().tolist()) != first_keep


def test_options_validated():
    with pytest.raises(ValueError, match="unknown LFR option"):
        LFRSampler(N, BATCH, 40, seed=0, focus_fraction=0.3)
    with pytest.raises(ValueError, match="final_drop"):
        LFRConfig(final_drop=1.0)
    with pytest.raises(ValueError, match="score"):
        LFRConfig(score="mean")
    with pytest.raises(ValueError, match="rank"):
        LFRSampler(N, BATCH, 40, seed=0, rank=2, world_size=2)
    sampler = LFRSampler(N, BATCH, 40, seed=0)
    with pytest.raises(ValueError, match="indices but"):
        sampler.observe(torch.tensor([0, 1]), torch.tensor([1.0]))


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other has NaN."""
    if x.dtype.is_floating_point:
        return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))
    return torch.equal(x, y)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert len(value) == len(b[key]) and all(same(x, y) for x, y in zip(value, b[key])), key
        elif isinstance(value, torch.Tensor):
            assert same(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("stop", [3, 10, 12, 17, 25, 33])  # mid-Learn, boundaries, mid-Focus/Review/final
def test_resume_reproduces_the_future(tmp_path, stop):
    losses = dict.fromkeys(["learn", "focus"], difficulty(1)) | dict.fromkeys(
        ["review", "final_focus"], difficulty(2)
    )
    full = LFRSampler(N, BATCH, 40, seed=7)
    expected = run(full, losses)

    first = LFRSampler(N, BATCH, 40, seed=7)
    run(first, losses, steps=stop)
    torch.save(first.state_dict(), tmp_path / "sampler.pt")
    resumed = LFRSampler(N, BATCH, 40, seed=7)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert resumed.step == stop
    rest = run(resumed, losses, steps=40 - stop)
    for (name_a, a), (name_b, b) in zip(expected[stop:], rest):
        assert name_a == name_b and torch.equal(a, b)
    assert_same_state(full.state_dict(), resumed.state_dict())

    with pytest.raises(ValueError, match="seed"):
        LFRSampler(N, BATCH, 40, seed=8).load_state_dict(first.state_dict())


def test_eval_pass_scores_all_blocks_at_recording_ends():
    learn_loss, review_loss = difficulty(1), difficulty(2)
    sampler = LFRSampler(N, BATCH, 40, seed=0, ppl_source="eval_pass")
    table = learn_loss
    for step in range(40):
        if step == 10:
            assert sampler.evaluation_due()
            with pytest.raises(RuntimeError, match="evaluation pass"):
                sampler.next_indices()
        if sampler.evaluation_due():
            sampler.run_evaluation_pass(lambda ids, table=table: table[ids])
            table = review_loss
        idx = sampler.next_indices()
        sampler.observe(idx, torch.zeros(len(idx)))  # ignored: scores come from the evaluation pass
        if step == 10:
            assert set(sampler.keep_set().tolist()) == hardest(learn_loss, 20)
    assert set(sampler.keep_set().tolist()) == hardest(review_loss, 12)


def test_attached_scorer_runs_the_passes_inside_next_indices():
    learn_loss, review_loss = difficulty(1), difficulty(2)
    calls = []

    def score(ids):
        calls.append(len(ids))
        return (learn_loss if sampler.phase.name == "learn" else review_loss)[ids]

    sampler = LFRSampler(N, BATCH, 40, seed=0, ppl_source="eval_pass")
    sampler.attach_scorer(score)
    counts = by_phase(
        run(sampler, dict.fromkeys(["learn", "focus", "review", "final_focus"], torch.zeros(N)))
    )
    assert sum(calls) == 2 * N  # all blocks, once after Learn and once after Review
    assert set(counts["focus"]) == hardest(learn_loss, 20)
    assert set(counts["final_focus"]) == hardest(review_loss, 12)


def test_eval_pass_refused_by_a_loop_that_never_asks():
    sampler = LFRSampler(N, BATCH, 40, seed=0, ppl_source="eval_pass")
    with pytest.raises(LoriteError, match="evaluation_due"):
        sampler.next_indices()  # at the first draw, not after the Learn phase


def test_eval_pass_scorer_matches_model_loss():
    from helpers import tiny_llama

    model = tiny_llama()
    blocks = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(0))
    losses = eval_pass_scorer(model, blocks)(torch.tensor([1, 3]))
    model.eval()
    with torch.no_grad():
        for i, b in enumerate([1, 3]):
            ref = model(input_ids=blocks[b : b + 1], labels=blocks[b : b + 1]).loss
            assert losses[i].item() == pytest.approx(ref.item(), rel=1e-5)
    assert model.training is False  # restored to the mode it had


# ---------------------------------------------------------------------- DDP (gloo, CPU)
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for source in ("train_forward", "eval_pass"):
            # N = 41: the evaluation pass's shards have unequal sizes (21 / 20 blocks)
            sampler = LFRSampler(
                41, BATCH // world, 40, seed=5, rank=rank, world_size=world, ppl_source=source
            )
            drawn, state = _drive(sampler)
            results[source] = dict(drawn=drawn, state=state)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _drive(sampler, steps=40):
    """40 steps of ``sampler`` on 41 blocks whose difficulty changes once the review starts (and after
    every evaluation pass); returns the drawn indices and the final state."""
    loss = difficulty(1, 41)
    drawn = []
    for _ in range(steps):
        if sampler.evaluation_due():
            sampler.run_evaluation_pass(lambda ids, loss=loss: loss[ids])
            loss = difficulty(2, 41)
        idx = sampler.next_indices()
        drawn.append(idx)
        if sampler.phase.name == "review":
            loss = difficulty(2, 41)
        sampler.observe(idx, loss[idx])
    return torch.stack(drawn), sampler.state_dict()


def _single_process(source):
    return _drive(LFRSampler(41, BATCH, 40, seed=5, ppl_source=source))


@pytest.mark.slow
def test_ddp_disjoint_shards_and_identical_tables(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    spawn_ranks(_ddp_worker, (2, free_port(), str(tmp_path)), 2, [tmp_path / f"rank{r}.pt" for r in range(2)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for source in ("train_forward", "eval_pass"):
        r0, r1 = ranks[0][source], ranks[1][source]
        for a, b in zip(r0["drawn"], r1["drawn"]):
            assert not set(a.tolist()) & set(b.tolist()), "ranks drew overlapping blocks in one micro-batch"
        # the two shards together are exactly the single-process global micro-batch, and the gathered
        # tables equal the single-process ones (so every rank ranks and keeps identically)
        drawn, state = _single_process(source)
        assert torch.equal(torch.cat([r0["drawn"], r1["drawn"]], dim=1), drawn)
        assert_same_state(r0["state"], r1["state"])
        assert_same_state(r0["state"], state)
        assert not math.isnan(r0["state"]["latest_score"].max().item())


# ---------------------------------------------------------------------- in the pre-training harness
@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    from lorite.data.blocks import build_token_cache
    from pretraining_data import char_tokenizer, synthetic_corpora

    root = tmp_path_factory.mktemp("tokens")
    return build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=root
    )


def _lfr_budget(cache) -> tuple[int, int]:
    """(train blocks of "prose", tokens of one full LFR schedule at batch 8 × 32 tokens)."""
    from lorite.data.blocks import TokenBlocks

    n = len(TokenBlocks(cache, "train", corpora=["prose"]))
    return n, LFRConfig().planned_tokens(n, 32, 8)


def _tiny_config(cache, **overrides):
    from lorite.train.pretrain import PretrainConfig

    _, tokens = _lfr_budget(cache)
    settings = dict(
        size="tiny", lr=3e-3, tokens=tokens, block_length=32, batch_size=8, corpora=["prose", "code"],
        train_corpora=["prose"], data=str(cache), eval_every=0, device="cpu", sampler="lfr",
    )  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_cli_pretrain_with_lfr(token_cache, tmp_path, capsys):
    from lorite.cli import main

    n, tokens = _lfr_budget(token_cache)
    args = ["pretrain", "--size", "tiny", "--data", str(token_cache), "--corpora", "prose,code"]
    args += ["--train-corpora", "prose", "--block-length", "32", "--batch-size", "8", "--device", "cpu"]
    args += ["--tokens", str(tokens), "--eval-every", "0", "--lr", "3e-3", "--sampler", "lfr"]
    assert main([*args, "--out", str(tmp_path / "run"), "--sampler-args", '{"final_reps": 3}']) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["sampler"] == "lfr" and metrics["train_blocks"] == n
    assert metrics["final"]["ppl"] < 30  # learned from ~uniform over 102 characters
    assert main([*args, "--out", str(tmp_path / "bad"), "--sampler-args", '{"drop": 0.5}']) == 2
    assert "unknown LFR option" in capsys.readouterr().err


def test_pretrain_lfr_resumes_exactly(token_cache, tmp_path):
    """Stop mid-Focus (checkpoint), resume: the same final model as the uninterrupted run; the checkpoint
    holds the sampler's Learn record and the ranked keep-set."""
    from lorite.train.pretrain import pretrain

    n, _ = _lfr_budget(token_cache)
    full = pretrain(_tiny_config(token_cache), tmp_path / "full")
    probe = LFRSampler(n, 8, full["total_steps"], seed=0)
    focus = next(p for p in probe.plan() if p["name"] == "focus")
    stop = (focus["start_step"] + focus["end_step"]) // 2
    pretrain(_tiny_config(token_cache), tmp_path / "split", stop_after=stop)
    saved = torch.load(tmp_path / "split" / "checkpoint" / "training_state.pt", weights_only=True)["extra"]
    state = saved["sampler"]
    assert state["kind"] == "lfr" and state["phase_name"] == "focus" and state["step"] == stop
    assert len(state["keep"]) == keep_size(n, 0.5)
    assert torch.isfinite(state["latest_score"]).all()  # every block was recorded in Learn
    # the kept half is the hardest half by the recorded training-forward perplexities
    order = torch.sort(state["latest_score"], stable=True).indices
    assert torch.equal(state["keep"], order[n - keep_size(n, 0.5) :].sort().values)
    resumed = pretrain(_tiny_config(token_cache), tmp_path / "split", resume=True)
    assert resumed["final"]["loss"] == full["final"]["loss"]
    assert [t["loss"] for t in resumed["train"]] == [t["loss"] for t in full["train"]]
