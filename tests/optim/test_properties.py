"""Property-based tests (hypothesis) of the optimizers, over random LoRA pairs: shapes ``m, n`` in 2..24 and
rank 1..min(m, n), float32 and float64, factorisations ``(c·A, B/c)`` with ``c`` in 1e-3..1e3 and random
invertible ``T`` of bounded condition number.

* **invariance**: LoRA-RITE (both variants) and ScaledGD (``scaled_adam`` without Adam's normalisation)
  move ``B·A`` the same way from ``(A, B)`` and ``(T⁻¹A, B·T)``; Lamb does for a scalar ``T``;
* **finite state**: every registered optimizer keeps its parameters and state finite;
* **non-finite gradients**: an inf/nan in one pair's gradient leaves that pair's parameters and state as
  they were and is counted in ``nonfinite_skips`` (LoRA-RITE; the baselines do not skip, by design of the
  papers they follow), while the other pairs still move;
* **state_dict round trip**: a fresh optimizer loaded from ``state_dict()`` (through ``torch.save`` with
  ``weights_only=True``) takes the same next step, bit for bit.

The layers follow peft's layout (``lora_A`` / ``lora_B`` ModuleDicts) without peft, so examples are cheap.
Derandomized: CI runs the same examples every time.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lorite.optim import LoRARite, ScaledAdam, available, create, find_lora_pairs
from lorite.optim.invariance import effective_deltas, relative_gap, reparameterize

PROFILE = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a learning rate per registry entry that moves these small problems without blowing them up
LR = {
    "adamw": 1e-2,
    "lora_plus": 1e-3,
    "scaled_adam": 1e-2,
    "shampoo": 1e-2,
    "lamb": 1e-2,
    "lora_rite": 1e-2,
    "lora_rite_reference": 1e-2,
    "galore_adamw": 1e-2,
    "fira_adamw": 1e-2,
}


# ------------------------------------------------------------------ random problems
class LoraLayer(nn.Module):
    """``y = s·B·A·x``, the factors in peft's layout (what :func:`find_lora_pairs` looks for)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        rank, n = A.shape
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, rank, bias=False, dtype=A.dtype)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, B.shape[0], bias=False, dtype=B.dtype)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(A)
            self.lora_B["default"].weight.copy_(B)
        self.scaling = {"default": scaling}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling["default"] * self.lora_B["default"](self.lora_A["default"](x))


class Problem(nn.Module):
    """Least squares in the LoRA products: ``Σ_i ½·mean‖s·B_i·A_i·X_i − Y_i‖²``; ``model(**batch).loss``."""

    peft_config: dict = {}  # noqa: RUF012  (looks like a peft model to GaLore/Fira: they project the factors)

    def __init__(self, layers: list[LoraLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs, ys):
        loss = sum(0.5 * (layer(x) - y).square().sum(-1).mean() for layer, x, y in zip(self.layers, xs, ys))
        return SimpleNamespace(loss=loss)


def conditioned(rows: int, cols: int, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    """A random ``rows × cols`` float64 matrix whose singular values lie in ``[low, high]``."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    sigma = low + (high - low) * torch.rand(k, generator=gen, dtype=torch.float64)
    return U @ torch.diag(sigma) @ V.T


@st.composite
def pair_shapes(draw, max_dim: int = 24):
    m = draw(st.integers(2, max_dim))
    n = draw(st.integers(2, max_dim))
    return m, n, draw(st.integers(1, min(m, n)))


@st.composite
def problems(draw, n_pairs: int = 1):
    """(shapes, dtype, log10 of the factor scale c, seed): one random problem."""
    shapes = [draw(pair_shapes()) for _ in range(n_pairs)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    log_scale = draw(st.floats(-3.0, 3.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return shapes, dtype, log_scale, seed


def build(shapes, dtype, log_scale, seed, samples: int = 32):
    """A :class:`Problem` with factors ``(c·A, B/c)`` of condition ≤ 4 (``B·A`` of order 1 whatever ``c``)
    and its batch (the same data every step: a deterministic full-batch problem)."""
    gen = torch.Generator().manual_seed(seed)
    c = 10.0**log_scale
    layers, xs, ys = [], [], []
    for m, n, rank in shapes:
        A = c * conditioned(rank, n, gen, 0.5, 2.0)
        B = conditioned(m, rank, gen, 0.5, 2.0) / c
        layers.append(LoraLayer(A.to(dtype), B.to(dtype), scaling=1.0))
        X = torch.randn(samples, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        target = B @ A + 0.3 * torch.randn(
            m, n, generator=gen, dtype=torch.float64
        )  # a residual of order 0.3
        xs.append(X.to(dtype))
        ys.append((X @ target.T).to(dtype))
    return Problem(layers), {"xs": xs, "ys": ys}


def conditioned_transform(seed: int, kappa: float):
    """``transform(rank, index)`` for :func:`lorite.optim.invariance.reparameterize`: a random invertible ``T`` per pair with
    condition number at most ``kappa`` (and a random sign pattern: not close to the identity)."""

    def make(rank: int, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 7919 + index)
        return conditioned(rank, rank, gen, 1.0, kappa)

    return make


def step(model, optimizer, batch):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tensors_of(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------ invariance
def scaled_gd(model, **kw):
    """ScaledGD with momentum (δ → 0): the invariant member of the ScaledAdam family."""
    return ScaledAdam.from_model(model, lr=3e-2, delta=1e-30, adam_normalization=False, **kw)


INVARIANT = {
    "lora_rite": lambda model: LoRARite.from_model(model, lr=1e-2),
    "lora_rite_reference": lambda model: LoRARite.from_model(model, variant="reference", lr=1e-2),
    "lora_rite escape off, wd": lambda model: LoRARite.from_model(
        model, lr=1e-2, escape_mass=False, weight_decay=0.1
    ),
    "scaled_gd": scaled_gd,
}
STEPS = 4


def trajectory(model, make_optimizer, batch) -> list[dict[str, torch.Tensor]]:
    """``s·B·A`` of every pair after each of :data:`STEPS` full-batch steps (on a copy of ``model``)."""
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model)
    out = []
    for _ in range(STEPS):
        step(model, optimizer, batch)
        out.append({k: v.double() for k, v in effective_deltas(model).items()})
    return out


def check_invariance(problem, make_optimizer, transform) -> None:
    """The two factorisations of ``problem`` move ``B·A`` alike: in float64 to 1e-7 of the movement; in
    float32 to within a few times float32's own error (the gap between the float32 run and the same run
    in float64) — LoRA-RITE's first step is the polar factor of the gradient, which amplifies rounding by
    the gradient's condition number, and fp32 can promise no more than that."""
    model, batch = build(*problem)
    start = {k: v.double() for k, v in effective_deltas(model).items()}
    plain = trajectory(model, make_optimizer, batch)
    twin = trajectory(reparameterize(model, transform), make_optimizer, batch)
    deviation = max(relative_gap(a, b) for a, b in zip(plain, twin))
    moved = relative_gap(plain[-1], start)
    assert moved > 1e-4, f"B·A must move for the comparison to mean anything (moved {moved:.2e})"
    if problem[1] == torch.float64:
        assert deviation <= 1e-7 * moved, f"deviation {deviation:.2e} for a movement of {moved:.2e}"
        return
    model64, batch64 = build(problem[0], torch.float64, *problem[2:])
    exact = trajectory(model64, make_optimizer, batch64)
    rounding = max(relative_gap(a, b) for a, b in zip(plain, exact))  # fp32's own error on this problem
    assert deviation <= 30 * rounding + 1e-6 * moved, (
        f"deviation {deviation:.2e} for a movement of {moved:.2e}; fp32 vs fp64 of one run: {rounding:.2e}"
    )


@pytest.mark.parametrize("name", list(INVARIANT))
@settings(max_examples=25, **PROFILE)
@given(problem=problems(n_pairs=2), t_seed=st.integers(0, 2**31 - 1), kappa=st.floats(1.0, 10.0))
def test_invariant_optimizers_move_the_product_alike_from_any_factorisation(name, problem, t_seed, kappa):
    check_invariance(problem, INVARIANT[name], conditioned_transform(t_seed, kappa))


@settings(max_examples=25, **PROFILE)
@given(problem=problems(n_pairs=2), log_s=st.floats(-3.0, 3.0))
def test_lamb_moves_the_product_alike_under_scalar_rescaling(problem, log_s):
    s = 10.0**log_s
    check_invariance(
        problem,
        lambda model: create("lamb", model, lr=1e-2, eps=1e-30),
        lambda rank, index: s * torch.eye(rank, dtype=torch.float64),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_the_invariance_check_catches_optimizers_that_are_not_invariant(name, dtype):
    """Negative controls: AdamW (elementwise) and Lamb (per-tensor trust ratio) under a general ``T``."""
    with pytest.raises(AssertionError, match="deviation"):
        check_invariance(
            ([(8, 12, 3), (10, 6, 2)], dtype, 1.0, 3),
            lambda model: create(name, model, lr=1e-2),
            conditioned_transform(5, 4.0),
        )


# ------------------------------------------------------------------ finite state
@pytest.mark.parametrize("name", list(available()))
@settings(max_examples=15, **PROFILE)
@given(problem=problems(n_pairs=2), steps=st.integers(1, 6))
def test_parameters_and_state_stay_finite(name, problem, steps):
    model, batch = build(*problem)
    optimizer = create(name, model, lr=LR[name])
    for _ in range(steps):
        step(model, optimizer, batch)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in tensors_of(optimizer) if t.is_floating_point())


# ------------------------------------------------------------------ non-finite gradients
NONFINITE_SKIPPING = ["lora_rite", "lora_rite_reference"]  # the baselines follow their papers: no skip


@pytest.mark.parametrize("name", NONFINITE_SKIPPING)
@settings(max_examples=20, **PROFILE)
@given(
    problem=problems(n_pairs=3),
    bad_pair=st.integers(0, 2),
    in_B=st.booleans(),
    value=st.sampled_from([math.inf, -math.inf, math.nan]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    warmup=st.integers(1, 3),
)
def test_a_non_finite_gradient_skips_its_pair_and_is_counted(
    name, problem, bad_pair, in_B, value, where, warmup
):
    model, batch = build(*problem)
    optimizer = create(name, model, lr=LR[name])
    for _ in range(warmup):
        step(model, optimizer, batch)
    pairs = find_lora_pairs(model).pairs
    bad = pairs[bad_pair]
    kept = {
        id(t): (t.detach().clone(), {k: v.clone() for k, v in optimizer.state[t].items()})
        for t in (bad.A, bad.B)
    }
    others = {p.name: p.delta_weight().detach().clone() for p in pairs if p is not bad}

    model(**batch).loss.backward()
    grad = (bad.B if in_B else bad.A).grad
    grad.view(-1)[int(where * grad.numel())] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time warning (its own test: test_lora_rite)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    assert optimizer.nonfinite_skips == 1
    for t in (bad.A, bad.B):
        before, state = kept[id(t)]
        assert torch.equal(t, before), "the pair with the non-finite gradient must not move"
        assert optimizer.state[t].keys() == state.keys()
        for key, saved in state.items():
            now = optimizer.state[t][key]
            assert torch.equal(now, saved), f"state {key!r} of the skipped pair changed"
    for pair in pairs:
        if pair is not bad:
            assert not torch.equal(pair.delta_weight(), others[pair.name]), f"{pair.name} must still move"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in tensors_of(optimizer) if t.is_floating_point())
    step(model, optimizer, batch)  # a finite gradient afterwards: the pair trains again
    assert not torch.equal(bad.A, kept[id(bad.A)][0]) or not torch.equal(bad.B, kept[id(bad.B)][0])
    assert optimizer.nonfinite_skips == 1


# ------------------------------------------------------------------ state_dict round trip
@pytest.mark.parametrize("name", list(available()))
@settings(max_examples=12, **PROFILE)
@given(problem=problems(n_pairs=2), steps=st.integers(1, 4))
def test_state_dict_round_trip_takes_the_same_next_step(name, problem, steps):
    model, batch = build(*problem)
    optimizer = create(name, model, lr=LR[name])
    for _ in range(steps):
        step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    loaded = create(name, twin, lr=LR[name])
    loaded.load_state_dict(torch.load(buffer, weights_only=True))

    step(model, optimizer, batch)
    step(twin, loaded, batch)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), f"{name}: the loaded optimizer took another step"
    first, second = effective_deltas(model), effective_deltas(twin)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert optimizer.state_dict()["param_groups"] == loaded.state_dict()["param_groups"]
    for p, q in zip(model.parameters(), twin.parameters()):
        mine, theirs = optimizer.state[p], loaded.state[q]
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, theirs[key]), f"{name}: state {key!r} differs after the step"
            else:
                assert value == theirs[key]
