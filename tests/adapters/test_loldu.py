"""LoLDU adapters (arXiv 2410.13618): exact at initialisation, r trainable numbers per matrix, a factored
forward equal to the dense formula, merge/unmerge/disable/unload, save/load, no m×m tensor, the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import tiny_llama, tiny_model_dir, write_task
from lorite.adapters.loldu import (
    LoLDUConfig,
    LoLDULinear,
    apply_loldu,
    ldu_factors,
    load_loldu,
    loldu_modules,
    loldu_parameters,
    loldu_summary,
    merge_loldu,
    save_loldu,
    set_loldu_enabled,
    unload_loldu,
    unmerge_loldu,
)
from lorite.cli import main

SHAPES = [(24, 16), (16, 24), (20, 20)]  # tall, wide, square (m × n)


def linear(m, n, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(n, m, dtype=dtype)


def ids(batch=2, seq=12, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ factors
@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_panel_factors_equal_the_full_pivoted_lu(m, n, rank):
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m * n))
    factors = ldu_factors(W, rank)
    P, L, U = torch.linalg.lu(W)  # dense P: fine for the reference, never in the adapter
    D = torch.diagonal(U)
    torch.testing.assert_close(factors.up, (P @ L)[:, :rank], rtol=0, atol=1e-13)
    torch.testing.assert_close(factors.diagonal, D[:rank], rtol=0, atol=1e-13)
    torch.testing.assert_close(factors.down, (U / D[:, None])[:rank], rtol=0, atol=1e-12)
    rows = P.argmax(dim=0)[:rank]  # P[:, i] is the unit vector of the i-th pivot's original row
    assert torch.equal(factors.pivot_rows, rows)


# ------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("selection", ["lu", "svd"])
def test_layer_output_unchanged_at_init(m, n, selection):
    layer = linear(m, n)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    before = layer(x).detach()
    adapted = LoLDULinear(layer, rank=4, selection=selection)
    torch.testing.assert_close(adapted(x), before, rtol=0, atol=1e-13)


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_factored_forward_equals_the_dense_formula_for_any_z(m, n):
    layer = linear(m, n)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    rank, alpha = 6, 2.0
    adapted = LoLDULinear(layer, rank, alpha=alpha)
    with torch.no_grad():
        adapted.z.copy_(torch.randn(rank, dtype=torch.float64))
    P, L, U = torch.linalg.lu(W)
    D = torch.diagonal(U)
    Lr, Ur, Dr = L[:, :rank], (U / D[:, None])[:rank], D[:rank]
    sigma = alpha / rank
    W_res = W - sigma * P @ Lr @ torch.diag(Dr) @ Ur
    W_eff = W_res + sigma * P @ Lr @ torch.diag(adapted.z.detach()) @ Ur
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(adapted.base.weight, W_res, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapted(x), x @ W_eff.T + b, rtol=0, atol=1e-11)


def test_merge_unmerge_disable_and_unload():
    layer = linear(24, 16)
    W0 = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    apply_loldu(model, LoLDUConfig(rank=4, alpha=3.0))
    adapted = model[0]
    with torch.no_grad():
        adapted.z.mul_(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
    x = torch.randn(5, 16, dtype=torch.float64)
    unmerged = model(x).detach()
    original = x @ W0.T + layer.bias.detach()
    assert (unmerged - original).abs().max() > 1e-3, "z changed, so the function changed"

    merge_loldu(model)
    assert adapted.merged
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12)
    set_loldu_enabled(model, False)  # disabled while merged: the original function
    torch.testing.assert_close(model(x), original, rtol=0, atol=1e-12)
    set_loldu_enabled(model, True)
    unmerge_loldu(model)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12)
    set_loldu_enabled(model, False)  # disabled: the original W's function, not W_res's
    torch.testing.assert_close(model(x), original, rtol=0, atol=1e-12)
    set_loldu_enabled(model, True)

    restored = unload_loldu(nn.Sequential(*[m for m in [model[0]]]), merge=False)
    assert type(restored[0]) is nn.Linear
    torch.testing.assert_close(restored[0].weight, W0, rtol=0, atol=1e-13)


def test_unload_with_merge_keeps_the_adapted_function():
    model = nn.Sequential(linear(16, 24))
    apply_loldu(model, LoLDUConfig(rank=3))
    with torch.no_grad():
        model[0].z.add_(0.5)
    x = torch.randn(4, 24, dtype=torch.float64)
    adapted = model(x).detach()
    unload_loldu(model, merge=True)
    assert not loldu_modules(model) and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ the model
def test_model_output_unchanged_and_only_diagonals_train():
    model = tiny_llama()
    tokens = ids()
    before = model(tokens).logits.detach()
    apply_loldu(model, LoLDUConfig(rank=4))
    # all-linear: q, k, v, o, gate, up, down in 2 layers — not lm_head
    assert len(loldu_modules(model)) == 14 and "lm_head" not in " ".join(loldu_modules(model))
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=2e-5)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".z") for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == 4 * 14 == loldu_summary(model)["trainable_parameters"]
    model(tokens, labels=tokens).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in trainable}, "only the diagonals receive gradients"
    assert all(not b.requires_grad for b in model.buffers())


def test_trainable_scale_adds_one_parameter_per_matrix_and_targets_by_name():
    model = tiny_llama()
    apply_loldu(model, LoLDUConfig(rank=3, target_modules=["q_proj", "v_proj"], train_scale=True))
    assert sorted({n.split(".")[-1] for n in loldu_modules(model)}) == ["q_proj", "v_proj"]
    assert sum(p.numel() for p in loldu_parameters(model)) == 4 * (3 + 1)
    assert loldu_summary(model)["matrices"] == 4


def test_random_init_warns_and_changes_the_function():
    model = tiny_llama()
    tokens = ids()
    before = model(tokens).logits.detach()
    with pytest.warns(UserWarning, match="changes the model at initialisation"):
        apply_loldu(model, LoLDUConfig(rank=4, init_method="s_uniform"))
    assert (model(tokens).logits - before).abs().max() > 1e-3


def test_bf16_base_keeps_fp32_diagonals():
    model = tiny_llama(dtype=torch.bfloat16)
    apply_loldu(model, LoLDUConfig(rank=4))
    layer = next(iter(loldu_modules(model).values()))
    assert layer.z.dtype == torch.float32 and layer.up.dtype == torch.bfloat16
    assert torch.isfinite(model(ids()).logits).all()


# ------------------------------------------------------------------------------------------ save / load
def test_save_then_load_into_a_fresh_base_model(tmp_path):
    model = tiny_llama(seed=3)
    apply_loldu(model, LoLDUConfig(rank=4, target_modules=["q_proj", "down_proj"], train_scale=True))
    with torch.no_grad():
        for p in loldu_parameters(model):
            p.mul_(1.5)
    tokens = ids()
    expected = model(tokens).logits.detach()
    save_loldu(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "loldu_config.json").read_text())
    assert config["rank"] == 4 and config["train_scale"] and len(config["modules"]) == 4

    fresh = load_loldu(tiny_llama(seed=3), tmp_path / "adapter")
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in loldu_parameters(fresh)) == 4 * 5

    with pytest.raises(ValueError, match="pivots differ"):
        load_loldu(tiny_llama(seed=4), tmp_path / "adapter")  # another base model
    with pytest.raises(FileNotFoundError, match="no LoLDU adapter"):
        load_loldu(tiny_llama(seed=3), tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ memory
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_dense_permutation_on_a_4096_wide_layer():
    m, n, rank = 4096, 256, 8
    layer = nn.Linear(n, m)
    with LargestTensor() as watch:
        adapted = LoLDULinear(layer, rank)
        x = torch.randn(2, n)
        adapted(x).sum().backward()
        adapted.merge()
        adapted.unmerge()
    assert watch.largest <= m * n, f"an op made a tensor of {watch.largest} elements (> m·n = {m * n})"
    buffers = sum(b.numel() for name, b in adapted.named_buffers() if not name.startswith("base."))
    assert buffers <= rank * (m + n) + 2 * rank + 1, "B (m×r), Ũ_r (r×n), D_r, pivots, σ₀ only"
    assert all(t.numel() < m * m for t in [*adapted.parameters(), *adapted.buffers()])
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == rank


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\) = 16\]"):
        ldu_factors(torch.randn(16, 24), 17)
    with pytest.raises(ValueError, match="larger than layer"):
        apply_loldu(tiny_llama(), LoLDUConfig(rank=17))  # k_proj is 16 × 32
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_loldu(tiny_llama(), LoLDUConfig(rank=2, target_modules=["nope_proj"]))
    with pytest.raises(TypeError, match="embed_tokens is a Embedding"):
        apply_loldu(tiny_llama(), LoLDUConfig(rank=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="init_method must be one of"):
        apply_loldu(tiny_llama(), LoLDUConfig(init_method="kaiming"))
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        apply_loldu(tiny_llama(), LoLDUConfig(alpha=0))
    model = tiny_llama()
    apply_loldu(model, LoLDUConfig(rank=2))
    with pytest.raises(ValueError, match="apply LoLDU once"):
        apply_loldu(model, LoLDUConfig(rank=2))
    dependent = nn.Linear(8, 8)
    with torch.no_grad():
        dependent.weight[:, 1] = 2 * dependent.weight[:, 0]  # second column = 2 × first: pivot 1 is 0
    with pytest.raises(ValueError, match="layer 0: pivot 1 of the LU is numerically 0"):
        apply_loldu(nn.Sequential(dependent), LoLDUConfig(rank=2))
    with pytest.raises(ValueError, match="non-finite"):
        ldu_factors(torch.full((4, 4), float("nan")), 2)


# ------------------------------------------------------------------------------------------ lorite finetune
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loldu_cli")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json", n=60)


def finetune_argv(files, out, *extra):
    model, task = files
    return ["finetune", "--task", f"file:{task}", "--model", str(model), "--method", "loldu", "--rank", "4",
            "--steps", "4", "--batch-size", "4", "--n-validation", "8", "--n-test", "8", "--max-length", "64",
            "--out", str(out), *extra]  # fmt: skip


def test_cli_finetune_trains_the_diagonals_and_saves_the_adapter(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_argv(files, out, "--optimizer", "adamw", "--lr", "0.1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 4 * 14  # r per matrix, 7 linear layers × 2 blocks
    assert metrics["config"]["method"] == "loldu" and "accuracy" in metrics["test"]
    from lorite.models import load_causal_lm

    model, _ = load_causal_lm(str(files[0]))
    load_loldu(model, out / "adapter")
    moved = [
        float((layer.z.detach() - layer.diagonal).abs().max()) for layer in loldu_modules(model).values()
    ]
    assert max(moved) > 1e-2, "training moved the diagonals away from the pivots"


@pytest.mark.filterwarnings("ignore:LoRARite.from_model")  # its generic note; ours is asserted
def test_pair_optimizers_train_loldu_with_their_adamw_fallback(files, tmp_path):
    """No (A, B) pairs: lora_rite says so and trains the diagonals exactly as AdamW would."""
    from lorite.train.finetune import FinetuneConfig, finetune

    model, task = files
    base = dict(
        task=f"file:{task}", model=str(model), method="loldu", rank=4, lr=0.1, steps=3, batch_size=4,
        n_validation=8, n_test=8, max_length=64, skip_test=True,
    )  # fmt: skip
    adamw = finetune(FinetuneConfig(optimizer="adamw", **base), progress=False)
    with pytest.warns(UserWarning, match="LoLDU has no \\(A, B\\) pairs: it trains the LoLDU diagonals"):
        rite = finetune(FinetuneConfig(optimizer="lora_rite", **base), progress=False)
    assert rite["trainable_parameters"] == adamw["trainable_parameters"] == 4 * 14
    assert rite["history"]["loss"] == pytest.approx(adamw["history"]["loss"], rel=1e-5)


def test_cli_resume_equals_uninterrupted_training(files, tmp_path, capsys):
    from lorite.train.finetune import FinetuneConfig, finetune

    model, task = files
    config = FinetuneConfig(
        task=f"file:{task}", model=str(model), optimizer="adamw", method="loldu", rank=4, lr=0.1, steps=4,
        batch_size=4, n_validation=8, n_test=8, max_length=64, checkpoint_every=2,
    )  # fmt: skip
    straight = finetune(config, out=tmp_path / "straight", progress=False)
    finetune(config, out=tmp_path / "resumed", progress=False, stop_after=2)
    resumed = finetune(config, out=tmp_path / "resumed", resume=True, progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "40"], "LoLDU rank 40 is larger than layer"),
        (["--dropout", "0.1"], "LoLDU has no dropout"),
        (["--method-args", '{"bits": 4}'], "--method-args for loldu: unknown ['bits']"),
        (["--method-args", "[1]"], "--method-args must be a JSON object"),
        (["--method-args", '{"selection": "qr"}'], "selection must be one of"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(files, tmp_path, capsys, extra, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(finetune_argv(files, tmp_path / "bad", "--optimizer", "adamw", *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorite")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_compare_entries_can_override_the_method():
    """benchmarks/configs/loldu.json compares methods: an entry's ``training`` overrides its runs' settings."""
    from lorite.errors import LoriteError
    from lorite.train.compare import parse_optimizers

    lora, loldu = parse_optimizers(
        [
            {"label": "lora_r16", "optimizer": "adamw"},
            {"label": "loldu_r16", "optimizer": "adamw", "training": {"method": "loldu", "alpha": 1}},
        ]
    )
    assert lora.training == {} and loldu.training == {"method": "loldu", "alpha": 1}
    with pytest.raises(LoriteError, match="'x': unknown training settings \\['bits'\\]"):
        parse_optimizers([{"label": "x", "optimizer": "adamw", "training": {"bits": 4}}])


def test_save_takes_the_diagonals_from_a_gathered_state_dict(tmp_path):
    """Under FSDP2 finetune passes the gathered full state dict: its tensors win over the (sharded) modules'."""
    model = nn.Sequential(linear(16, 24))
    apply_loldu(model, LoLDUConfig(rank=3))
    gathered = {**model.state_dict(), "0.z": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    save_loldu(model, tmp_path / "adapter", state_dict=gathered)
    fresh = load_loldu(nn.Sequential(linear(16, 24)), tmp_path / "adapter")
    assert fresh[0].z.tolist() == [1.0, 2.0, 3.0]
