"""The contract every lorite optimizer keeps (optax's common test suite and torch's OptimizerInfo in spirit):
descent, state_dict round trip with ``weights_only=True`` and exact resume, fp32 state for bf16 params,
the zero-grad lr=0 step of distributed checkpoint loading, pairs without grads, several adapters, the AdamW
fallback for DoRA / modules_to_save, and clear errors for bad input.

Method-specific properties (LoRA-RITE's invariance, …) live in each optimizer's own test file.

The low-rank projection optimizers (``galore_adamw``, ``fira_adamw``) run this suite on peft models, where
they project the LoRA factors (Fira's fine-tuning script in effect). Not applicable to them, by design:
``test_strict_mode_refuses_unpaired_and_lora_free_models`` and ``test_bad_inputs_raise_clear_errors`` (the
LoRA *pairs* API: ``strict=``, ``(A, B)`` tuples; their own input errors are in test_lowrank.py), and the
LoRA-specific transformation-invariance tests (test_lora_rite.py, test_baselines.py,
benchmarks/speed/invariance.py): GaLore and Fira act on each matrix alone and claim no invariance.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from helpers import batches, lm_step, tiny_llama, tiny_peft
from lorite.optim import PairOptimizer, available, create, find_lora_pairs

# A learning rate per registry entry that trains the tiny test models (a new entry must add one here).
TEST_LR = {
    "adamw": 1e-2,
    "lora_plus": 1e-3,
    "scaled_adam": 1e-2,
    "shampoo": 1e-2,
    "lamb": 1e-2,
    "lora_rite": 1e-2,
    "lora_rite_reference": 1e-2,
    "galore_adamw": 3e-2,
    "fira_adamw": 3e-2,
}
CASES = list(available())
# low-rank gradient projection (GaLore, Fira): no pairs API, see the module docstring for what they skip
LOW_RANK_CASES = ["galore_adamw", "fira_adamw"]
# lorite's own pair optimizers (torch's AdamW keeps torch's rules: state in the param dtype, no pairs API)
PAIR_CASES = [name for name in CASES if name not in ("adamw", *LOW_RANK_CASES)]
# lorite's optimizers that keep fp32 state for bf16 params and take tensor learning rates
LORITE_CASES = PAIR_CASES + LOW_RANK_CASES


def build(name, model, **kw):
    kw.setdefault("lr", TEST_LR[name])
    return create(name, model, **kw)


def test_registry_lists_the_papers_optimizers():
    assert set(available()) == set(TEST_LR)
    assert all(isinstance(text, str) and text for text in available().values())
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgdx'.*lora_rite"):
        create("sgdx", tiny_peft())


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(model):
    return [p.detach().clone() for p in trainable(model)]


@pytest.mark.parametrize("name", CASES)
def test_descent_on_least_squares(name):
    torch.manual_seed(0)
    X = torch.randn(256, 30)
    # a rank-4 target a rank-4 LoRA can reach, small enough that the reference variant's update
    # skipping (RMS of the unmagnified gradient > 1) stays off
    Y = X @ (torch.randn(30, 4) @ torch.randn(4, 40)) * 0.01
    net = nn.Sequential(nn.Linear(30, 40, bias=False))
    nn.init.zeros_(net[0].weight)  # W = s·B·A alone: least squares in the LoRA product
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["0"]))
    opt = build(name, model)
    losses = []
    for _ in range(100):
        loss = 0.5 * (model(X) - Y).square().sum(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], f"{name}: {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def trained(name, data):
    """A tiny peft model and its optimizer after one step on each batch of ``data``."""
    model = tiny_peft()
    optimizer = build(name, model)
    for ids in data:
        lm_step(model, optimizer, ids)
    return model, optimizer


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip_and_exact_resume(name):
    data = batches(8)
    uninterrupted, _ = trained(name, data)
    first, opt1 = trained(name, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = tiny_peft(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt2 = build(name, resumed)
    opt2.load_state_dict(checkpoint["optimizer"])
    for ids in data[4:]:
        lm_step(resumed, opt2, ids)
    for p, q in zip(trainable(uninterrupted), trainable(resumed)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", LORITE_CASES)
def test_loaded_state_is_a_copy(name):
    """``twin.load_state_dict(optimizer.state_dict())`` in one process, then both keep training: the twin
    must not share the source's state tensors (torch's loader keeps them where no cast is needed)."""
    data = batches(8)
    uninterrupted, _ = trained(name, data)
    source, source_opt = trained(name, data[:3])
    twin = copy.deepcopy(source)
    twin_opt = build(name, twin)
    twin_opt.load_state_dict(source_opt.state_dict())
    for ids in data[3:]:
        lm_step(source, source_opt, ids)  # the source steps first: shared state would move under the twin
        lm_step(twin, twin_opt, ids)
    for p, q, r in zip(trainable(uninterrupted), trainable(source), trainable(twin)):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("name", LORITE_CASES)
def test_bf16_params_keep_fp32_state_across_save_and_load(name):
    model = tiny_peft(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in trainable(model))
    opt = build(name, model)
    for ids in batches(3):
        lm_step(model, opt, ids)
    wide = getattr(opt, "float64_state_keys", frozenset())  # kept in float64 on purpose (LoRA-RITE's overlap)
    dtypes = {
        (key in wide, t.dtype)
        for s in opt.state.values()
        for key, t in s.items()
        if t.is_floating_point() and t.dim() > 0
    }
    assert (False, torch.float32) in dtypes and dtypes <= {(False, torch.float32), (True, torch.float64)}
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    opt2 = build(name, model)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for p in trainable(model):
        for key, value in opt.state[p].items():
            loaded = opt2.state[p][key]
            assert loaded.dtype == value.dtype, f"{key}: {value.dtype} came back as {loaded.dtype}"
            assert torch.equal(loaded, value)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after-steps"])
def test_zero_grad_lr0_step_is_nan_free_noop(name, fresh):
    """What torch.distributed.checkpoint does to materialise optimizer state before loading it."""
    model = tiny_peft(random_B=False)  # peft's B = 0 start, the hardest case
    opt = build(name, model)
    if not fresh:
        for ids in batches(2):
            lm_step(model, opt, ids)
    before = snapshot(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in trainable(model):
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(trainable(model), before):
        assert torch.equal(p, q)
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", CASES)
def test_pairs_without_grads_are_left_alone(name):
    model = tiny_peft()
    opt = build(name, model)
    pairs = find_lora_pairs(model).pairs
    idle = pairs[2]
    idle_before = (idle.A.detach().clone(), idle.B.detach().clone())
    busy_before = pairs[0].B.detach().clone()
    for ids in batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
        idle.A.grad = None
        idle.B.grad = None
        opt.step()
        opt.zero_grad()
    assert torch.equal(idle.A, idle_before[0]) and torch.equal(idle.B, idle_before[1])
    assert not torch.equal(pairs[0].B, busy_before)
    assert not opt.state[idle.A]


@pytest.mark.parametrize("name", CASES)
def test_several_adapters_train_together(name):
    model = tiny_peft(r=2)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    pairs = find_lora_pairs(model).pairs
    assert {p.rank for p in pairs} == {2, 4}
    before = {p.name: p.B.detach().clone() for p in pairs}
    opt = build(name, model)
    losses = [float(lm_step(model, opt, ids)) for ids in batches(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for p in pairs:
        assert not torch.equal(p.B, before[p.name]), p.name


@pytest.mark.parametrize("name", CASES)
def test_dora_and_modules_to_save_train_in_the_fallback(name):
    base = tiny_llama()
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"])
    )
    scan = find_lora_pairs(model)
    opt = build(name, model)
    if isinstance(opt, PairOptimizer):
        roles = [g["role"] for g in opt.param_groups]
        assert roles == ["lora_pairs", "adamw"]
        assert len(opt.param_groups[1]["params"]) == len(scan.unpaired)
    before = [u.param.detach().clone() for u in scan.unpaired]
    for ids in batches(3):
        lm_step(model, opt, ids)
    for u, b in zip(scan.unpaired, before):
        assert not torch.equal(u.param, b), u.name


@pytest.mark.parametrize("name", PAIR_CASES)
def test_strict_mode_refuses_unpaired_and_lora_free_models(name):
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"outside any LoRA pair.*DoRA magnitude"):
        build(name, dora, strict=True)
    with pytest.raises(ValueError, match="no trainable LoRA pairs"):
        build(name, tiny_llama(), strict=True)


def _cls(name):
    return type(build(name, tiny_peft()))


@pytest.mark.parametrize("name", PAIR_CASES)
def test_bad_inputs_raise_clear_errors(name):
    cls = _cls(name)
    A, B = torch.zeros(4, 10, requires_grad=True), torch.zeros(12, 4, requires_grad=True)
    with pytest.raises(ValueError, match="rank mismatch"):
        cls([(A, torch.zeros(12, 3, requires_grad=True))])
    with pytest.raises(ValueError, match="FSDP1 or DeepSpeed"):
        cls([(torch.zeros(40, requires_grad=True), torch.zeros(48, requires_grad=True))])
    with pytest.raises(ValueError, match="odd number"):
        cls([{"params": [A, B, torch.zeros(4, 3, requires_grad=True)]}])
    with pytest.raises(ValueError, match="each pair is exactly"):
        cls([(A, B, torch.zeros(4, 3))])
    with pytest.raises(TypeError, match="flat list"):
        cls([A, B])
    with pytest.raises(ValueError, match="more than one pair"):
        cls([(A, B), (A, torch.zeros(7, 4, requires_grad=True))])
    with pytest.raises(TypeError, match="complex"):
        cls([(torch.zeros(4, 10, dtype=torch.complex64), torch.zeros(12, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="learning rate"):
        cls([(A, B)], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        cls([(A, B)], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        cls([(A, B)], not_a_hyperparameter=1)
    fake_zero = torch.zeros(4, 10, requires_grad=True)
    fake_zero.ds_shape = (4, 10)
    with pytest.raises(ValueError, match="DeepSpeed"):
        cls([(fake_zero, B)])
    sparse = cls([(A, B)])
    A.grad = torch.zeros(4, 10).to_sparse()
    B.grad = torch.zeros(12, 4)
    with pytest.raises(TypeError, match="sparse"):
        sparse.step()


@pytest.mark.parametrize("name", LORITE_CASES)
def test_tensor_lr_and_scheduler_see_every_group(name):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    opt = build(name, model, lr=torch.tensor(1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for ids in batches(2):
        lm_step(model, opt, ids)
        sched.step()
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        assert float(group["lr"]) == pytest.approx(1e-3 * 0.25)


# GaLore and Fira decide on the host when to refresh each chunk's projection (an SVD every update_proj_gap
# steps, read from a CPU step counter): two graph breaks per chunk, by design (benchmarks/RESULTS.md)
TRACE_BREAKS_BY_DESIGN = {"galore_adamw", "fira_adamw"}


@pytest.mark.parametrize("name", [n for n in CASES if n not in TRACE_BREAKS_BY_DESIGN])
def test_step_traces_into_one_graph_and_compiles_to_the_eager_result(name):
    """torch.compile sees the whole step: one graph, no breaks (a break would mean a host read or Python
    the tracer cannot follow); the compiled step then gives the eager step's parameters."""
    model = tiny_peft(r=4)
    twin = copy.deepcopy(model)
    opt, twin_opt = build(name, model), build(name, twin)
    data = batches(4)
    for ids in data[:2]:  # the state exists, as after any first steps
        lm_step(model, opt, ids)
        lm_step(twin, twin_opt, ids)
    torch._dynamo.reset()
    model(input_ids=data[2], labels=data[2]).loss.backward()
    explained = torch._dynamo.explain(opt.step)()  # runs the step once, traced
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    opt.zero_grad(set_to_none=True)
    lm_step(twin, twin_opt, data[2])
    compiled = torch.compile(opt.step)
    model(input_ids=data[3], labels=data[3]).loss.backward()
    compiled()
    lm_step(twin, twin_opt, data[3])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
