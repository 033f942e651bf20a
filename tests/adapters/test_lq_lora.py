"""LQ-LoRA: the decomposition, the ILP, the peft model over quantized Q (pairs, optimizers, save/load). The
``lq_lora`` fine-tuning method and ``lorite quantize`` are tested in tests/train/test_quantize.py."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from helpers import tiny_llama
from lorite.adapters.lq_lora import (
    LQLoRAConfig,
    QuantizedLinear,
    apply_lq_lora,
    attach_lq_lora,
    decompose_matrices,
    estimate_fisher,
    lq_decompose,
    parse_config_name,
    plan_allocation,
    quantization_error,
    quantize_model,
    quantized_layers,
    resolve_grid,
    save_lq_lora,
    solve_allocation,
    target_linears,
)
from lorite.adapters.quant import QLORA_NF4, QuantConfig
from lorite.optim import available, create, find_lora_pairs

CONFIG = QuantConfig(3, 32, 8, 16, "fp32")
GRID = "nf2-b32-s8x256-fp32,nf3-b64-s8x256-fp32,nf3-b16-s4x256-fp32,nf4-b64-s8x256-fp32"  # small: fast tests


def low_rank_plus_noise(m=96, n=64, rank=4, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) + noise * torch.randn(
        m, n, generator=g
    )


# ------------------------------------------------------------------------------------------ decomposition
def test_decomposition_beats_plain_quantization_on_low_rank_plus_noise():
    W = low_rank_plus_noise()
    result = lq_decompose(W, 4, CONFIG, max_iter=20)
    plain = float(quantization_error(W[None], CONFIG)[0])
    assert result.error < 0.05 * plain  # the low-rank part takes what quantization handles worst
    assert result.error == pytest.approx(float((W - result.reconstruction()).norm()), rel=1e-5)
    assert result.error == pytest.approx(min(result.trace), rel=1e-6), "the best iterate is returned"
    assert len(result.trace) >= 2 and result.trace[1] < result.trace[0]
    assert result.L1.shape == (96, 4) and result.L2.shape == (4, 64)


def test_decomposition_of_a_generic_matrix_still_beats_plain_quantization():
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    for config in (CONFIG, QLORA_NF4, QuantConfig(2, 16, 4, 16)):
        assert lq_decompose(W, 8, config, max_iter=8).error < float(quantization_error(W[None], config)[0])


def test_stop_rule_keeps_the_best_iterate_when_the_error_rises():
    W = low_rank_plus_noise(seed=1)
    result = lq_decompose(W, 4, CONFIG, max_iter=100, rtol=0.0)
    assert len(result.trace) < 100  # it stopped on a rise or a stall, not at max_iter
    assert result.trace[-1] >= result.trace[-2]
    assert result.error == pytest.approx(min(result.trace), rel=1e-6)


def test_fisher_weighting_lowers_the_weighted_error():
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    F = 100 * torch.rand(96, 1, generator=g) ** 4 * torch.rand(1, 64, generator=g) ** 4
    weighted = lq_decompose(W, 8, CONFIG, fisher=F, max_iter=20)
    unweighted = lq_decompose(W, 8, CONFIG, max_iter=20)

    def weighted_error(result):
        return float((F * (W - result.reconstruction()).square()).sum().sqrt())

    assert weighted.error == pytest.approx(weighted_error(weighted), rel=1e-5)
    assert weighted_error(weighted) < 0.9 * weighted_error(unweighted)


def test_randomized_svd_is_seeded():
    W = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    a = lq_decompose(W, 8, CONFIG, max_iter=3, seed=5)
    b = lq_decompose(W, 8, CONFIG, max_iter=3, seed=5)
    assert a.trace == b.trace and torch.equal(a.L1, b.L1)


def test_format_names_round_trip():
    for config in resolve_grid("full"):
        assert parse_config_name(config.name) == config
    assert parse_config_name("nf4-b64-fp16") == QuantConfig(4, 64, None, 1, "fp16")
    assert len(resolve_grid("compact")) == 24
    with pytest.raises(ValueError, match="bad quantization format"):
        resolve_grid("nf5-b64")


# ------------------------------------------------------------------------------------------ ILP
def brute_force(costs, storage, budget):
    best = None
    for choice in itertools.product(range(len(costs[0])), repeat=len(costs)):
        used = sum(storage[i][c] for i, c in enumerate(choice))
        cost = sum(costs[i][c] for i, c in enumerate(choice))
        if used <= budget and (best is None or cost < best[0]):
            best = (cost, list(choice))
    return best


def test_ilp_picks_the_known_optimum_of_a_hand_made_instance():
    numel = [100, 100, 200]
    bits = [2, 3, 4]
    storage = [[n * b for b in bits] for n in numel]
    costs = [[10, 4, 1], [10, 9, 8.5], [20, 6, 2]]
    budget = 3 * sum(numel)  # 1200 bits
    # worked by hand: m0 at 4 bits (cost 1), m1 at 2 (10), m2 at 3 (6): 400 + 200 + 600 = 1200 bits
    allocation = solve_allocation(costs, storage, budget)
    assert allocation.choice == [2, 0, 1] and allocation.objective == 17
    assert allocation.storage_bits == 1200 and allocation.solver == "milp" and allocation.status == "optimal"
    assert brute_force(costs, storage, budget) == (17, [2, 0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_ilp_equals_brute_force_and_the_lagrangian_is_feasible(seed):
    g = torch.Generator().manual_seed(seed)
    n = 5
    numel = torch.randint(50, 500, (n,), generator=g).tolist()
    bits = [2.1, 3.1, 4.1, 8.1]
    storage = [[int(m * b) for b in bits] for m in numel]
    base = torch.rand(n, generator=g) * 10
    costs = [
        [float(base[i] * 2.0 ** (-2 * b) * (1 + 0.3 * torch.rand(1, generator=g))) for b in bits]
        for i in range(n)
    ]
    budget = (2.6 + 2 * float(torch.rand(1, generator=g))) * sum(numel)
    expected, _ = brute_force(costs, storage, budget)
    allocation = solve_allocation(costs, storage, budget)
    assert allocation.objective == pytest.approx(expected, rel=1e-9)
    assert allocation.storage_bits <= budget
    heuristic = solve_allocation(costs, storage, budget, solver="lagrangian")
    assert heuristic.storage_bits <= budget and heuristic.objective >= expected - 1e-12


def test_ilp_unconstrained_takes_the_cheapest_and_refuses_impossible_budgets():
    costs = [[3, 1, 2], [1, 2, 3]]
    storage = [[10, 20, 30], [10, 20, 30]]
    assert solve_allocation(costs, storage, 1e9).choice == [1, 0]
    with pytest.raises(ValueError, match="below the smallest possible storage"):
        solve_allocation(costs, storage, 19)


# ------------------------------------------------------------------------------------------ the model
def quantized_tiny(init="lq", budget=3.0, alpha=None, seed=0):
    model = tiny_llama(seed=seed, hidden=64)
    original = copy.deepcopy(model)
    settings = LQLoRAConfig(budget=budget, rank=4, alpha=alpha, init=init, max_iter=6, grid=GRID)
    weights = {n: m.weight.detach() for n, m in target_linears(model).items()}
    plan = plan_allocation(weights, settings, progress=False)
    decompositions = decompose_matrices(weights, plan.configs, settings, progress=False)
    return original, apply_lq_lora(model, decompositions, settings), decompositions, plan


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_output_at_initialisation_equals_the_reconstruction(alpha):
    original, model, decompositions, plan = quantized_tiny(alpha=alpha)
    assert plan.bits_per_param <= 3.0
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name, decomposition in decompositions.items():
            reference.get_submodule(name).weight.copy_(decomposition.reconstruction())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-3)
    layer = model.get_base_model().get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer.base_layer, QuantizedLinear)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


def test_zero_init_is_plain_quantization():
    original, model, decompositions, _ = quantized_tiny(init="zero")
    for name, layer in quantized_layers(model).items():
        W = original.get_submodule(name).weight.detach()
        assert torch.equal(layer.dequantize(), decompositions[name].quantized.dequantize())
        assert float((layer.dequantize() - W).norm()) == pytest.approx(decompositions[name].error, rel=1e-5)
    assert all(torch.count_nonzero(p.B) == 0 for p in find_lora_pairs(model).pairs)


def test_lorite_pairs_every_factor_and_every_optimizer_trains_it():
    _, model, decompositions, _ = quantized_tiny()
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == len(decompositions) == 14 and not scan.unpaired
    frozen = {name: layer.q_codes.clone() for name, layer in quantized_layers(model).items()}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for name in available():
        trial = copy.deepcopy(model)
        optimizer = create(name, trial, lr=1e-3)
        before = [p.A.detach().clone() for p in find_lora_pairs(trial).pairs]
        trial(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after = [p.A.detach() for p in find_lora_pairs(trial).pairs]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), name
        for layer_name, layer in quantized_layers(trial).items():
            assert torch.equal(layer.q_codes, frozen[layer_name]), "Q is frozen"


def test_save_load_round_trip_after_training(tmp_path):
    _, model, _, _ = quantized_tiny(budget=2.5)
    optimizer = create("lora_rite", model, lr=1e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_lq_lora(model, tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        "adapter",
        "lq_lora.json",
        "quantized.safetensors",
    }
    loaded = attach_lq_lora(tiny_llama(seed=0, hidden=64), tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    for name, layer in quantized_layers(model).items():
        twin = quantized_layers(loaded)[name]
        assert twin.config == layer.config and torch.equal(twin.dequantize(), layer.dequantize())
    with pytest.raises(ValueError, match="does not match the saved shape"):
        attach_lq_lora(tiny_llama(hidden=32), tmp_path / "saved")


def test_casting_the_model_leaves_the_stored_scales_alone():
    _, model, _, _ = quantized_tiny()
    layer = next(iter(quantized_layers(model).values()))
    before = layer.dequantize()
    model.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(), before)
    ids = torch.randint(0, 64, (1, 8))
    assert model(input_ids=ids).logits.dtype == torch.bfloat16


def test_fisher_is_the_sum_of_squared_per_example_gradients():
    model = tiny_llama(hidden=32)
    examples = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in torch.randint(0, 64, (3, 1, 10), generator=torch.Generator().manual_seed(0))
    ]
    name = "model.layers.1.mlp.down_proj"
    fisher = estimate_fisher(model, examples, [name], progress=False)
    expected = torch.zeros_like(model.get_submodule(name).weight)
    for example in examples:
        model.zero_grad()
        model(**example).loss.backward()
        expected += model.get_submodule(name).weight.grad.square()
    torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored"


def test_quantize_model_report_and_fisher_variant():
    model = tiny_llama(hidden=64)
    examples = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in torch.randint(0, 64, (4, 1, 12), generator=torch.Generator().manual_seed(0))
    ]
    fisher = estimate_fisher(model, examples, progress=False)
    _, report = quantize_model(
        model, LQLoRAConfig(budget=3.5, rank=4, max_iter=4, grid=GRID), fisher, progress=False
    )
    assert report["bits_per_param"] <= 3.5 and report["fisher"]
    assert report["storage_bits_per_param_with_lora"] > report["bits_per_param"]
    assert len(report["matrices"]) == 14 and sum(report["format_counts"].values()) == 14
    assert all(m["relative_error"] < m["plain_quantization_relative_error"] for m in report["matrices"])


def test_rank_larger_than_a_layer_is_refused():
    with pytest.raises(ValueError, match="rank 40 is larger"):
        quantize_model(tiny_llama(hidden=32), LQLoRAConfig(rank=40), progress=False)


def test_cost_cache_reuses_errors(tmp_path):
    model = tiny_llama(hidden=32)
    weights = {n: m.weight.detach() for n, m in target_linears(model).items()}
    settings = LQLoRAConfig(budget=3.0, rank=2, max_iter=3, grid="nf2-b32-s8x256-fp32,nf4-b32-s8x256-fp32")
    first = plan_allocation(weights, settings, cache=tmp_path / "costs.json", progress=False)
    cached = json.loads((tmp_path / "costs.json").read_text())
    assert len(cached) == 2 * 14
    (tmp_path / "costs.json").write_text(json.dumps({k: 1.0 for k in cached}))  # the cache is what is read
    second = plan_allocation(weights, settings, cache=tmp_path / "costs.json", progress=False)
    assert first.costs != second.costs and all(c == 1.0 for row in second.costs for c in row)


# ------------------------------------------------------------------------------------------ CLI and finetune
def test_single_format_needs_no_costs_but_checks_the_budget():
    weights = {n: m.weight.detach() for n, m in target_linears(tiny_llama(hidden=32)).items()}
    plan = plan_allocation(
        weights, LQLoRAConfig(budget=3.6, rank=2, grid="nf3-b32-s8x256-fp32"), progress=False
    )
    assert set(plan.allocation.choice) == {0} and all(c == [0.0] for c in plan.costs)
    with pytest.raises(ValueError, match="below the smallest possible storage"):
        plan_allocation(weights, LQLoRAConfig(budget=3.0, rank=2, grid="nf3-b32-s8x256-fp32"), progress=False)


# ------------------------------------------------------------------------------------------ damaged folders


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    _, model, _, _ = quantized_tiny(budget=2.5)
    return save_lq_lora(model, tmp_path_factory.mktemp("lq") / "saved")


def _damaged_copy(saved, tmp_path, damage):
    import shutil

    copy_ = tmp_path / "copy"
    shutil.copytree(saved, copy_)
    damage(copy_)
    return copy_


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _drop_a_layer(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "quantized.safetensors"))
    name = next(k for k in tensors if k.endswith(".codes"))
    save_file({k: v for k, v in tensors.items() if k != name}, str(folder / "quantized.safetensors"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "lq_lora.json").write_text('{"format": "lorite-lq'), r"lq_lora.json does not parse"),
        (
            lambda f: (f / "lq_lora.json").write_text(json.dumps({"format": "lorite-lq-lora/1"})),
            r"lq_lora.json lists no quantized layers",
        ),
        (lambda f: _truncate(f / "quantized.safetensors"), r"quantized.safetensors does not load \(.*header"),
        (lambda f: (f / "quantized.safetensors").unlink(), r"quantized.safetensors is missing"),
        (_drop_a_layer, r"quantized.safetensors does not hold layer '.*' \(.*lacks \['codes'\]"),
        (
            lambda f: _truncate(f / "adapter" / "adapter_model.safetensors"),
            r"adapter_model.safetensors does not",
        ),
        (
            lambda f: (f / "adapter" / "adapter_config.json").write_text("{"),
            r"adapter_config.json does not parse",
        ),
    ],
)
def test_a_damaged_saved_folder_names_the_file_and_says_to_quantize_again(
    saved_folder, tmp_path, damage, message
):
    from lorite.errors import DamagedArtifact

    folder = _damaged_copy(saved_folder, tmp_path, damage)
    with pytest.raises(DamagedArtifact, match=message) as caught:
        attach_lq_lora(tiny_llama(seed=0, hidden=64), folder)
    text = str(caught.value)
    assert f"saved LQ-LoRA model: {folder}" in text and "quantize the model again (lorite quantize)" in text


def test_not_a_saved_folder_stays_bad_input(tmp_path, saved_folder):
    from lorite.errors import DamagedArtifact

    with pytest.raises(ValueError, match="is not a saved LQ-LoRA model") as caught:
        attach_lq_lora(tiny_llama(seed=0, hidden=64), tmp_path)
    assert not isinstance(caught.value, DamagedArtifact)
    other = _damaged_copy(
        saved_folder, tmp_path, lambda f: (f / "lq_lora.json").write_text('{"format": "x/9"}')
    )
    with pytest.raises(ValueError, match="unknown format 'x/9'") as caught:
        attach_lq_lora(tiny_llama(seed=0, hidden=64), other)
    assert not isinstance(caught.value, DamagedArtifact)


def test_cli_finetune_on_a_damaged_quantized_folder_is_one_line_and_exit_1(saved_folder, tmp_path, capsys):
    from helpers import tiny_model_dir, write_task
    from lorite.cli import main

    folder = _damaged_copy(saved_folder, tmp_path, lambda f: _truncate(f / "lq_lora.json"))
    task, model = write_task(tmp_path / "task" / "task.json"), tiny_model_dir(tmp_path / "model")
    capsys.readouterr()  # writing the model shows a progress bar
    argv = ["finetune", "--task", f"file:{task}", "--model", str(model),
            "--method", "lq_lora", "--method-args", json.dumps({"quantized": str(folder)}), "--rank", "4",
            "--steps", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lorite finetune: error:")]  # (and transformers' bars)
    assert len(errors) == 1 and f"{folder / 'lq_lora.json'} does not parse" in errors[0], err
    assert not (tmp_path / "run").exists()
