"""The paper's baselines: each matches an independent implementation (peft's own helpers where they exist,
a per-factor reference written here otherwise), and has exactly the invariance the LoRA-RITE paper (§2)
says it has."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import batches, deltas, general_T, invariance_gap, lm_step, max_relative_gap, scalar_T, tiny_peft
from lorite.optim import Lamb, LoRAPlus, ScaledAdam, Shampoo, create, find_lora_pairs

F64 = torch.float64


@pytest.fixture(scope="module")
def base64():
    return tiny_peft(dtype=F64)


@pytest.fixture(scope="module")
def data():
    return batches(50)


def run_pair(model_a, opt_a, model_b, opt_b, data):
    worst = 0.0
    for ids in data:
        lm_step(model_a, opt_a, ids)
        lm_step(model_b, opt_b, ids)
        worst = max(worst, max_relative_gap(deltas(model_a), deltas(model_b)))
    return worst


def test_lora_plus_matches_peft_create_loraplus_optimizer(base64, data):
    from peft.optimizers import create_loraplus_optimizer

    ours_model, peft_model = copy.deepcopy(base64), copy.deepcopy(base64)
    ours = LoRAPlus.from_model(ours_model, lr=1e-3, ratio=16)
    theirs = create_loraplus_optimizer(
        peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0
    )
    assert run_pair(ours_model, ours, peft_model, theirs, data[:20]) < 1e-10


def test_scaled_adam_matches_peft_riemannian_optimizer(base64, data):
    from peft.optimizers import create_riemannian_optimizer

    ours_model, peft_model = copy.deepcopy(base64), copy.deepcopy(base64)
    ours = ScaledAdam.from_model(ours_model, lr=1e-3, delta=1e-2)
    theirs = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, reg=1e-2, weight_decay=0.0)
    assert run_pair(ours_model, ours, peft_model, theirs, data[:20]) < 1e-10


def test_scaled_gd_is_transformation_invariant_scaled_adam_is_not(base64, data):
    def scaled_gd(model):
        return ScaledAdam.from_model(model, lr=3e-2, delta=1e-14, adam_normalization=False)

    gap, moved = invariance_gap(base64, scaled_gd, general_T, data)
    assert moved > 1e-2
    assert gap < 1e-8
    gap_adam, _ = invariance_gap(
        base64, lambda m: ScaledAdam.from_model(m, lr=1e-3, delta=1e-14), general_T, data
    )
    assert gap_adam > 1e-3


def test_lamb_is_scalar_invariant_but_not_transformation_invariant(base64, data):
    def lamb(model):
        return Lamb.from_model(model, lr=1e-2, eps=1e-30)

    gap, moved = invariance_gap(base64, lamb, scalar_T, data)
    assert moved > 1e-2
    assert gap < 1e-8
    gap_general, _ = invariance_gap(base64, lamb, general_T, data)
    assert gap_general > 1e-3


@pytest.mark.parametrize("name", ["adamw", "lora_plus", "shampoo"])
def test_elementwise_and_kronecker_methods_are_not_even_scalar_invariant(base64, data, name):
    gap, _ = invariance_gap(base64, lambda m: create(name, m, lr=1e-3), scalar_T, data[:20])
    assert gap > 1e-2


# ---------------------------------------------------------------- Shampoo against a per-factor reference
def reference_shampoo_step(X, G, st, lr, beta1, beta2, epsilon, k, block, t):
    """One step of the docstring's math on a single tall matrix X (rows × r), no batching, no padding."""
    rows, r = X.shape
    starts = [0] if rows <= block else list(range(0, rows, block))
    if "L" not in st:
        st.update(L={}, R={}, Lr={}, Rr={}, m=torch.zeros_like(X), v=torch.zeros_like(X), step=0)
    st["step"] += 1
    D = torch.zeros_like(G)
    for s in starts:
        e = min(rows, s + block)
        g = G[s:e]  # the reference keeps each block at its true size: no zero padding
        L = beta2 * st["L"].get(s, torch.zeros(e - s, e - s, dtype=X.dtype)) + (1 - beta2) * g @ g.T
        R = beta2 * st["R"].get(s, torch.zeros(r, r, dtype=X.dtype)) + (1 - beta2) * g.T @ g
        st["L"][s], st["R"][s] = L, R
        if (t - 1) % k == 0:

            def root(S):
                lam, E = torch.linalg.eigh((S + S.T) / 2)
                return E @ torch.diag((lam.clamp(min=0) + epsilon) ** -0.25) @ E.T

            st["Lr"][s], st["Rr"][s] = root(L), root(R)
        D[s:e] = st["Lr"][s] @ g @ st["Rr"][s]
    st["v"] = beta2 * st["v"] + (1 - beta2) * G**2
    adam = G / ((st["v"] / (1 - beta2 ** st["step"])).sqrt() + 1e-8)
    u = adam.norm() / D.norm().clamp(min=1e-300) * D
    st["m"] = beta1 * st["m"] + (1 - beta1) * u
    return X - lr * st["m"] / (1 - beta1 ** st["step"])


@pytest.mark.parametrize("block", [16, 1024], ids=["blocked-and-padded", "whole"])
def test_shampoo_matches_per_factor_reference(block):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 64, generator=gen, dtype=F64)  # inputs
    Y = torch.randn(30, 64, generator=gen, dtype=F64)
    A = torch.randn(4, 40, generator=gen, dtype=F64).requires_grad_()
    B = torch.randn(30, 4, generator=gen, dtype=F64).requires_grad_()
    A_ref, B_ref = A.detach().clone(), B.detach().clone()
    # ε = 1e-6: with ε = 1e-12 the roots of these rank-4 statistics are ill-conditioned on their null space
    # (fp64 roundoff of the zero eigenvalues is ~1e-3 of ε), so two correct implementations differ visibly.
    opt = Shampoo(
        [(A, B)], lr=1e-2, block_size=block, precondition_frequency=3, epsilon=1e-6, relative_epsilon=0.0
    )
    states = ({}, {})
    for t in range(1, 11):
        opt.zero_grad()
        (0.5 * ((B @ A @ X - Y) ** 2).sum() / 64).backward()
        opt.step()
        a, b = A_ref.clone().requires_grad_(), B_ref.clone().requires_grad_()
        (0.5 * ((b @ a @ X - Y) ** 2).sum() / 64).backward()
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, epsilon=1e-6, k=3, block=block, t=t)
        A_ref = reference_shampoo_step(A_ref.T, a.grad.T, states[0], **kw).T
        B_ref = reference_shampoo_step(B_ref, b.grad, states[1], **kw)
        torch.testing.assert_close(A.detach(), A_ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(B.detach(), B_ref, rtol=1e-8, atol=1e-10)
    left = opt.state[A]["left"]
    assert left.shape == ((3, 16, 16) if block == 16 else (1, 40, 40))


def test_lamb_trust_ratio_and_zero_init():
    """B = 0: trust ratio 1 (a plain Adam step); otherwise each tensor moves by lr·‖X‖ in norm (β1 = 0)."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 10, generator=gen, dtype=F64).requires_grad_()
    B = torch.zeros(12, 4, dtype=F64, requires_grad=True)
    opt = Lamb([(A, B)], lr=1e-2, betas=(0.0, 0.999), eps=1e-30)
    A.grad = torch.randn(4, 10, generator=gen, dtype=F64)
    B.grad = torch.randn(12, 4, generator=gen, dtype=F64)
    A0 = A.detach().clone()
    opt.step()
    # first step: m̂/√v̂ = sign(g) elementwise, so B (ratio 1) moves by lr in every entry
    torch.testing.assert_close(B.detach().abs(), torch.full_like(B, 1e-2))
    torch.testing.assert_close(float((A.detach() - A0).norm()), 1e-2 * float(A0.norm()))


def test_registry_builds_every_baseline_on_a_real_peft_layout():
    model = tiny_peft()
    for name in ("lora_plus", "scaled_adam", "shampoo", "lamb"):
        opt = create(name, model, lr=1e-3)
        assert len(opt.param_groups[0]["params"]) == 2 * len(find_lora_pairs(model).pairs)


def test_newton_inverse_root_agrees_with_eigh():
    from lorite.optim.shampoo import inverse_root

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 64, 32, generator=gen)
    S = X @ X.mT * 1e-3  # rank-deficient, as a young statistic is
    G = S @ torch.randn(3, 64, 4, generator=gen)  # directions the statistic has seen
    by_eigh = inverse_root(S, 4, 1e-12, method="eigh") @ G
    by_newton = inverse_root(S, 4, 1e-12, method="newton") @ G
    assert float((by_eigh - by_newton).norm() / by_eigh.norm()) < 1e-4
