"""rank90 of ΔW: exact on matrices of known spectrum, the random reference, model dirs and peft adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import tiny_model_dir
from lorite.analysis.spectrum import (
    adapter_scale,
    analyze_spectrum,
    explained_fraction,
    lowrank_singular_values,
    random_baseline_rank,
    rank_from_singular_values,
    spectral_rank,
    write_spectrum_report,
)
from lorite.cli import main


def with_spectrum(values, m=40, n=30, seed=0) -> torch.Tensor:
    """U·diag(values)·Vᵀ with random orthonormal U (m×k), V (n×k): a matrix of exactly these singular values."""
    gen = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(
    ("values", "threshold", "criterion", "rank"),
    [
        ([3.0, 2.0, 1.0], 0.9, "var", 2),  # σ² shares 9/14, 13/14 ≥ 0.9
        ([3.0, 2.0, 1.0], 0.95, "var", 3),
        ([3.0, 2.0, 1.0], 0.9, "sv", 3),  # σ shares 3/6, 5/6 < 0.9: σ gives the larger rank
        ([1.0] * 10, 0.9, "var", 9),  # exactly 0.9 at k = 9
        ([1.0] * 7, 0.9, "var", 7),  # 6/7 < 0.9
        ([5.0], 0.9, "var", 1),
        ([4.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.7, "var", 1),  # 16/21 ≥ 0.7
        ([2.0, 2.0, 2.0, 2.0, 1.0], 1.0, "var", 5),
    ],
)
def test_rank_is_exact_for_a_known_spectrum(values, threshold, criterion, rank):
    matrix = with_spectrum(values)
    assert spectral_rank(matrix, threshold, criterion).rank == rank
    assert spectral_rank(matrix.float(), threshold, criterion).rank == rank, "fp32 gives the same rank"
    assert rank_from_singular_values(torch.tensor(values), threshold, criterion) == rank


def test_rank_k_matrix_needs_at_most_k_and_the_curve_is_its_cumulative_share():
    matrix = with_spectrum([4.0, 3.0, 2.0, 1.0], m=64, n=48)
    result = spectral_rank(matrix)
    assert result.rank <= 4
    expected = torch.tensor([16, 25, 29, 30], dtype=torch.float64) / 30
    assert torch.allclose(result.explained[:4], expected, atol=1e-10)
    assert torch.allclose(result.explained[4:], torch.ones(44, dtype=torch.float64), atol=1e-10)
    assert rank_from_singular_values(torch.zeros(5)) == 0, "a zero update has rank 0"
    assert explained_fraction(torch.tensor([1.0, 3.0])).tolist() == [0.9, 1.0], "sorted descending first"


def test_lowrank_singular_values_equal_the_dense_product():
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    dense = torch.linalg.svdvals(-2.5 * B @ A)
    assert torch.allclose(lowrank_singular_values(B, A, -2.5), dense[:6], rtol=1e-10)
    assert dense[6:].max() < 1e-10 * dense[0]
    # rank above the smaller side: still exact (min(m, r, n) values)
    B, A = (
        torch.randn(8, 12, generator=gen, dtype=torch.float64),
        torch.randn(12, 20, generator=gen, dtype=torch.float64),
    )
    assert torch.allclose(lowrank_singular_values(B, A), torch.linalg.svdvals(B @ A), rtol=1e-10)
    with pytest.raises(ValueError, match="do not chain"):
        lowrank_singular_values(B, A.T)


def test_random_gaussian_reference():
    square = random_baseline_rank((256, 256))
    assert 0.49 * 256 <= square <= 0.53 * 256, square  # spec: ≈ 0.51·n (523 for 1024)
    assert random_baseline_rank((256, 256), seed=0) == square, "seeded"
    assert random_baseline_rank((256, 256), criterion="sv") > square + 0.1 * 256, "σ needs more than σ²"
    wide = random_baseline_rank((128, 384))
    assert 0.68 * 128 <= wide <= 0.76 * 128, wide  # spec: ≈ 0.71·m for 4096×11008 (aspect 2.7)
    assert abs(random_baseline_rank((384, 128)) - wide) <= 3, "the transposed shape: the same law"
    with pytest.raises(ValueError, match="threshold"):
        random_baseline_rank((4, 4), threshold=1.5)
    with pytest.raises(ValueError, match="criterion"):
        rank_from_singular_values(torch.ones(3), criterion="energy")


# ------------------------------------------------------------------------------------------- model dirs
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base model dir and a "tuned" copy whose ΔW is known: layer 0 q_proj gets σ = (2, 1), layer 1
    down_proj σ = (1,), every other matrix nothing."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("spectrum")
    base = tiny_model_dir(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    layers = model.model.layers
    with torch.no_grad():
        q = layers[0].self_attn.q_proj.weight
        q += with_spectrum([2.0, 1.0], *q.shape, seed=1).float()
        down = layers[1].mlp.down_proj.weight
        down += with_spectrum([1.0], *down.shape, seed=2).float()
    model.save_pretrained(root / "tuned")
    return base, root / "tuned", root


def test_model_delta_ranks_are_exact(models, tmp_path):
    base, tuned, _ = models
    result = analyze_spectrum(base=base, tuned=tuned, device="cpu")
    ranks = {(m.layer, m.module): m.rank for m in result["matrices"]}
    assert ranks[(0, "self_attn.q_proj")] == 2  # 4/5 < 0.9 ≤ 5/5
    assert ranks[(1, "mlp.down_proj")] == 1
    assert sum(ranks.values()) == 3, "every untouched matrix has ΔW = 0, rank 0"
    assert len(ranks) == 2 * 7
    q = next(m for m in result["matrices"] if (m.layer, m.module) == (0, "self_attn.q_proj"))
    assert q.norm == pytest.approx(math.sqrt(5), rel=1e-4)
    assert q.random_rank == random_baseline_rank((32, 32)) and q.base_rank is not None and q.base_rank > 2
    assert [m.module for m in result["matrices"][:7]] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]  # fmt: skip
    paths = write_spectrum_report(result, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["modules"]["self_attn.q_proj"]["rank_max"] == 2
    assert saved["modules"]["self_attn.q_proj"]["random_rank"] == q.random_rank
    assert "| 0 | 2 | 0 | 0 | 0 | 0 | 0 | 0 |" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 10_000


def test_adapter_spectrum_is_merge_free_and_matches_the_merged_delta(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _, _ = models
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    reference = AutoModelForCausalLM.from_pretrained(base).state_dict()

    result = analyze_spectrum(adapter=tmp_path / "adapter", base=base, device="cpu")
    assert len(result["matrices"]) == 4
    for m in result["matrices"]:
        dense = merged.state_dict()[m.name] - reference[m.name]
        full = spectral_rank(dense)
        assert m.rank == full.rank and m.rank <= 4 and m.max_rank == 4
        assert m.norm == pytest.approx(float(dense.norm()), rel=1e-4), "scaling α/√r applied"
        assert m.base_rank is not None
    # a run directory is accepted for its adapter/
    (tmp_path / "run").mkdir()
    (tmp_path / "adapter").rename(tmp_path / "run" / "adapter")
    assert len(analyze_spectrum(adapter=tmp_path / "run", device="cpu")["matrices"]) == 4


def test_adapter_scale_follows_peft():
    config = {"lora_alpha": 16, "alpha_pattern": {"down_proj": 4}}
    assert adapter_scale(config, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert adapter_scale(config, "model.layers.0.mlp.down_proj", 8) == 0.5
    assert adapter_scale({**config, "use_rslora": True}, "model.layers.0.self_attn.q_proj", 16) == 4.0


def run_cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_spectrum_and_bad_inputs(capsys, models, tmp_path):
    base, tuned, _ = models
    out = tmp_path / "spec"
    code, _ = run_cli(
        capsys, ["analyze", "spectrum", "--base", str(base), "--tuned", str(tuned), "--out", str(out)]
    )
    assert code == 0 and (out / "spectrum.json").exists()
    before = (out / "spectrum.json").read_text()
    bad = [
        (["--base", str(base), "--tuned", str(tuned), "--out", str(out)], "already holds spectrum.json"),
        (["--out", str(tmp_path / "a")], "exactly one"),
        (["--tuned", str(tuned), "--adapter", str(tuned), "--out", str(tmp_path / "b")], "exactly one"),
        (["--base", str(base), "--tuned", "/no/such", "--out", str(tmp_path / "c")], "does not exist"),
        (
            ["--base", str(base), "--tuned", str(tmp_path), "--out", str(tmp_path / "d")],
            "holds no safetensors",
        ),
        (["--adapter", str(tuned), "--out", str(tmp_path / "e")], "no adapter_config.json"),
        (
            ["--base", str(base), "--tuned", str(tuned), "--threshold", "0", "--out", str(tmp_path / "f")],
            "(0, 1]",
        ),
        (
            ["--base", str(base), "--tuned", str(tuned), "--criterion", "x", "--out", str(tmp_path / "g")],
            "criterion",
        ),
        (["--base", str(base), "--tuned", str(tuned), "--threshold", "big"], "invalid float"),
    ]
    for argv, message in bad:
        code, err = run_cli(capsys, ["analyze", "spectrum", *argv])
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert (out / "spectrum.json").read_text() == before, "what was saved is untouched"
    assert not any((tmp_path / name).exists() for name in "abcdefg")
