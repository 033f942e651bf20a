"""GaLore and Fira (lorite.optim.galore / fira) and their shared projector and limiter (_lowrank): the spec's
§4 invariants, a float64 re-implementation of the official algorithm (spec §2.2, written here from the
spec), the projector's refresh methods, model discovery and input errors.

The LoRA-specific invariance tests (test_lora_rite.py, benchmarks/speed/invariance.py) do not apply: GaLore
and Fira act on full weight matrices and make no transformation-invariance claim.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from helpers import batches, lm_step, tiny_llama, tiny_peft
from lorite.optim import FiraAdamW, GaLoreAdamW, create
from lorite.optim._lowrank import (
    LowRankProjector,
    NormGrowthLimiter,
    limit_norm_growth,
    orthonormalize,
    projection_side,
)

WIDE, TALL = (6, 10), (10, 6)


def random_matrices(shapes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def spectrum_matrix(m, n, decay=0.7, seed=0):
    """A matrix with singular values decay**i and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))[0]
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * s) @ V.T


# ---------------------------------------------------------------------- projector
@pytest.mark.parametrize("shape", [WIDE, TALL], ids=["wide", "tall"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_full_rank_projection_round_trips_and_r_is_min(shape, proj_type):
    (G,) = random_matrices([shape])
    G = G[None]
    projector = LowRankProjector(shape, rank=100, proj_type=proj_type, svd="exact")
    assert projector.rank == min(shape)
    bases = projector.new_bases(1, G.device, G.dtype)
    projector.refresh(G, bases, first=True)
    R = projector.project(G, bases)
    assert tuple(R.shape[1:]) == projector.moment_shape
    torch.testing.assert_close(projector.project_back(R, bases), G, rtol=1e-10, atol=1e-10)
    out = torch.zeros_like(G)
    torch.testing.assert_close(projector.add_project_back_(out, R, bases, alpha=2.0), 2 * G)


def test_std_side_keeps_the_larger_dimension():
    assert projection_side(WIDE, "std") == "left" and projection_side(TALL, "std") == "right"
    assert projection_side(WIDE, "reverse_std") == "right" and projection_side(TALL, "reverse_std") == "left"
    assert projection_side((5, 5), "std") == "right"
    with pytest.raises(ValueError, match="proj_type"):
        projection_side(WIDE, "random")
    for shape in (WIDE, TALL):
        assert LowRankProjector(shape, 3).moment_shape == (3, max(shape))


@pytest.mark.parametrize("method", ["exact", "subspace", "lowrank"])
def test_refresh_finds_the_top_singular_subspace(method):
    G = spectrum_matrix(40, 24, decay=0.6)[None]
    projector = LowRankProjector((40, 24), rank=4, svd=method, svd_iters=4)
    bases = projector.new_bases(1, G.device, G.dtype)
    projector.refresh(G, bases, first=True)  # subspace: the first refresh is exact
    if method == "subspace":  # now from a poor start: a random basis
        bases["proj"].copy_(orthonormalize(torch.randn(1, 24, 4, dtype=torch.float64))[0])
        projector.refresh(G, bases, first=False)
    Q = bases["proj"][0]
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=Q.dtype), atol=1e-8, rtol=0)
    captured = (G[0] @ Q).square().sum() / G.square().sum()
    best = (0.6 ** torch.arange(24.0)).square()
    assert captured >= 0.999 * best[:4].sum() / best.sum()


def test_subspace_refresh_keeps_an_exact_basis_and_tracks_a_drifting_one():
    G = spectrum_matrix(30, 50, decay=0.5)[None]
    projector = LowRankProjector((30, 50), rank=5, svd="subspace")
    bases = projector.new_bases(1, G.device, G.dtype)
    projector.refresh(G, bases, first=True)
    exact = bases["proj"].clone()
    projector.refresh(G, bases, first=False)  # already the singular vectors: same basis, same signs
    torch.testing.assert_close(bases["proj"], exact, atol=1e-6, rtol=0)
    drifted = G + 0.02 * spectrum_matrix(30, 50, decay=0.9, seed=3)[None]
    projector.refresh(drifted, bases, first=False)
    top = torch.linalg.svdvals(drifted[0]).square()
    captured = (bases["proj"][0].T @ drifted[0]).square().sum()
    assert captured >= 0.999 * top[:5].sum()


def test_refresh_survives_zero_and_nonfinite_gradients():
    projector = LowRankProjector((8, 12), rank=3, svd="subspace")
    bases = projector.new_bases(2, torch.device("cpu"), torch.float32)
    zero = torch.zeros(2, 8, 12)
    projector.refresh(zero, bases, first=True)
    projector.refresh(zero, bases, first=False)
    P = bases["proj"]
    torch.testing.assert_close(P.mT @ P, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    before = P.clone()
    bad = torch.randn(2, 8, 12)
    bad[1, 0, 0] = float("nan")
    projector.refresh(bad, bases, first=False)
    assert torch.isfinite(P).all()
    assert torch.equal(P[1], before[1]) and not torch.equal(P[0], before[0])


# ---------------------------------------------------------------------- limiter
def test_limiter_passes_shrinking_and_constant_norms_and_cuts_jumps_to_gamma():
    previous = torch.tensor([-1.0])
    norms = [4.0, 2.0, 2.0, 20.0, 20.0, 1.0]
    seen = []
    for value in norms:
        factor, previous = limit_norm_growth(torch.tensor([value]), previous, gamma=1.01, eps=0.0)
        seen.append((float(factor), float(previous)))
    assert seen[0] == (1.0, 4.0)  # the first call only records
    assert seen[1] == (1.0, 2.0) and seen[2] == (1.0, 2.0)  # shrinking, constant: unchanged
    assert seen[3][1] == pytest.approx(2.0 * 1.01, rel=1e-6)  # 10× jump: growth γ over the limited norm
    assert seen[4][1] == pytest.approx(2.0 * 1.01**2, rel=1e-6)
    assert seen[5] == (1.0, 1.0)


def test_norm_growth_limiter_component_keeps_one_scalar_of_state():
    limiter = NormGrowthLimiter(gamma=1.5)
    state: dict = {}
    x = torch.ones(3, 4)
    limiter(x, state)
    assert state["limiter_norm"].shape == () and float(state["limiter_norm"]) == pytest.approx(math.sqrt(12))
    y = limiter(torch.full((3, 4), 10.0), state)
    assert float(torch.linalg.vector_norm(y)) == pytest.approx(1.5 * math.sqrt(12), rel=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        NormGrowthLimiter(gamma=0.5)


# ---------------------------------------------------------------------- optimizer invariants
class GaLoreSGD(GaLoreAdamW):
    """GaLore with the identity inner rule: W ← W − lr·α·P Pᵀ G."""

    def _inner_rule(self, group, storage, R, t):
        return R.clone(), group["lr"]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_with_full_rank_and_identity_rule_is_sgd(proj_type):
    """r = min(m, n): the basis of the smaller side is complete (std) — between refreshes too. A basis on
    the larger side (reverse_std, forced left/right, full's second factor) spans only the refresh
    gradient's row/column space, so those types equal SGD when every step refreshes."""
    weights = [w.requires_grad_() for w in random_matrices([WIDE, TALL, WIDE])]
    reference = [w.detach().clone() for w in weights]
    gap = 2 if proj_type == "std" else 1
    group = {"params": weights, "rank": 10, "update_proj_gap": gap, "scale": 1.0, "proj_type": proj_type}
    opt = GaLoreSGD([group], lr=0.1)
    for step in range(5):
        grads = random_matrices([WIDE, TALL, WIDE], seed=10 + step)
        for w, g in zip(weights, grads):
            w.grad = g
        opt.step()
        reference = [r - 0.1 * g for r, g in zip(reference, grads)]
    for w, r in zip(weights, reference):  # 1e-9: the subspace refresh's sub-fp32 perturbation (≈1e-10)
        torch.testing.assert_close(w.detach(), r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("scaling", ["column", "matrix"])
def test_fira_with_full_rank_and_alpha_1_equals_galore(variant, scaling):
    shapes = [WIDE, TALL]
    a = [w.requires_grad_() for w in random_matrices(shapes)]
    b = [w.detach().clone().requires_grad_() for w in a]
    common = {"rank": 10, "update_proj_gap": 3, "svd": "exact"}
    galore = GaLoreAdamW([{"params": a, "scale": 1.0, **common}], lr=0.01, weight_decay=0.1)
    fira = FiraAdamW(
        [{"params": b, "alpha": 1.0, "variant": variant, "scaling": scaling, **common}],
        lr=0.01,
        weight_decay=0.1,
    )
    for step in range(7):
        for x, y, g in zip(a, b, random_matrices(shapes, seed=20 + step)):
            x.grad, y.grad = g, g.clone()
        galore.step()
        fira.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_std_moments_are_r_by_max_dimension_for_wide_and_tall():
    weights = [w.float().requires_grad_() for w in random_matrices([WIDE, TALL])]
    opt = FiraAdamW([{"params": weights, "rank": 3}])
    for w in weights:
        w.grad = torch.randn_like(w)
    opt.step()
    for w in weights:
        state = opt.state[w]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (3, 10)
        assert state["proj"].shape == (6, 3) and state["limiter_norm"].shape == ()
        assert state["step"].device.type == "cpu" and float(state["step"]) == 1.0


def test_reset_moments_flag_zeroes_them_at_a_refresh():
    w = torch.randn(6, 10, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2, "reset_moments": True}])
    for step in range(3):
        w.grad = torch.randn(6, 10)
        opt.step()
        if step == 1:
            first_moment = opt.state[w]["exp_avg"].clone()
    # step 3 refreshes (t = 2): the moment restarts from (1 − β1)·R alone
    R = opt.state[w]["proj"].T @ w.grad
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.1 * R)
    assert not torch.allclose(first_moment, opt.state[w]["exp_avg"])


# ---------------------------------------------------------------------- the official algorithm, float64
def reference_run(W0, grads, *, lr, betas, eps, weight_decay, rank, gap, alpha, residual, variant="official",
                  scaling="column", gamma=1.01):  # fmt: skip
    """One weight, spec §2.1/§2.2 in the official code's own orientation (GaLore's projector shapes).

    ``residual=False``: GaLore. Signs of new singular vectors agree with the previous basis's (an SVD's
    signs are arbitrary; lorite fixes them this way, see lorite.optim._lowrank).
    """
    W = W0.clone()
    m, n = W.shape
    right = m >= n  # std: the right projector Q (r × n) for tall, the left P (m × r) for wide
    rank_axis = 1 if right else 0

    def project(X, basis):
        return X @ basis.T if right else basis @ X  # m × r, or r × n

    def back(X, basis):
        return X @ basis if right else basis.T @ X

    M, V, basis, previous = None, None, None, None
    for index, G in enumerate(grads):
        if index % gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            new = Vh[:rank] if right else U[:, :rank].T  # rows = basis vectors
            if basis is not None:
                new = new * torch.where((new * basis).sum(1, keepdim=True) < 0, -1.0, 1.0)
            basis = new
        step = index + 1
        R = project(G, basis)
        if M is None:
            M, V = torch.zeros_like(R), torch.zeros_like(R)
        M = betas[0] * M + (1 - betas[0]) * R
        V = betas[1] * V + (1 - betas[1]) * R * R
        N = M / (V.sqrt() + eps)
        step_size = lr * math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
        update = alpha * back(N, basis)
        if residual:
            if scaling == "column":
                phi = N.norm(dim=rank_axis) / (R.norm(dim=rank_axis) + 1e-8)
                phi = phi[:, None] if right else phi[None, :]
            else:
                phi = N.norm() / (R.norm() + 1e-8)
            if variant == "official":
                S = (G - alpha * back(R, basis)) * phi
            else:
                S = (G - back(R, basis)) * phi
            norm = S.norm()
            if previous is not None:
                S = S / (max(norm / (previous + 1e-8), gamma) / gamma)
            previous = S.norm()
            update = update + (S if variant == "official" else alpha * S)
        W = W - step_size * update
        if weight_decay:
            W = W - lr * weight_decay * W
    return W


@pytest.mark.parametrize(
    "optimizer, options",
    [
        ("galore", {}),
        ("fira", {"variant": "official", "scaling": "column"}),
        ("fira", {"variant": "paper", "scaling": "column"}),
        ("fira", {"variant": "official", "scaling": "matrix"}),
    ],
    ids=["galore", "fira-official", "fira-paper", "fira-official-matrix"],
)
def test_matches_the_float64_reference_of_the_official_algorithm(optimizer, options):
    shapes = [(12, 20), (20, 12), (12, 20)]
    steps, hyper = 9, dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    weights = [w.requires_grad_() for w in random_matrices(shapes, seed=1)]
    initial = [w.detach().clone() for w in weights]
    grads = [random_matrices(shapes, seed=100 + t) for t in range(steps)]
    group = {"params": weights, "rank": 4, "update_proj_gap": 4, "svd": "exact", **options}
    if optimizer == "galore":
        opt = GaLoreAdamW([{**group, "scale": 0.25}], **hyper)
    else:
        opt = FiraAdamW([{**group, "alpha": 0.25}], **hyper)
    for t in range(steps):
        for w, g in zip(weights, grads[t]):
            w.grad = g.clone()
        opt.step()
    for i, w in enumerate(weights):
        expected = reference_run(
            initial[i], [grads[t][i] for t in range(steps)], **hyper, rank=4, gap=4, alpha=0.25,
            residual=optimizer == "fira", **options,
        )  # fmt: skip
        torch.testing.assert_close(w.detach(), expected, rtol=1e-9, atol=1e-11)
    if optimizer == "fira":  # the residual path matters: the limiter state is in use
        assert all(float(opt.state[w]["limiter_norm"]) > 0 for w in weights)


# ---------------------------------------------------------------------- checkpoints, models
@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
@pytest.mark.parametrize("svd", ["subspace", "exact"])
def test_weights_only_round_trip_then_training_equals_uninterrupted(name, svd):
    data = batches(8)
    hyper = dict(lr=1e-2, rank=4, update_proj_gap=3, svd=svd, weight_decay=0.01)
    uninterrupted = tiny_llama()
    opt = create(name, uninterrupted, **hyper)
    for ids in data:
        lm_step(uninterrupted, opt, ids)

    first = tiny_llama()
    opt1 = create(name, first, **hyper)
    for ids in data[:4]:
        lm_step(first, opt1, ids)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = tiny_llama(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = create(name, resumed, **hyper)
    opt2.load_state_dict(checkpoint["optimizer"])
    for ids in data[4:]:  # crosses the refresh at t = 6
        lm_step(resumed, opt2, ids)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_from_model_projects_attn_and_mlp_linears_and_adamw_for_the_rest():
    model = tiny_llama()
    opt = create("galore_adamw", model, lr=1e-3, rank=8)
    projected, rest = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in projected["params"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert "rank" not in rest and {names[id(p)].split(".")[0] for p in rest["params"]} <= {"model", "lm_head"}
    assert all(p.dim() == 1 or "embed" in names[id(p)] or "lm_head" in names[id(p)] for p in rest["params"])
    assert projected["rank"] == 8 and projected["scale"] == 0.25 and projected["update_proj_gap"] == 200
    only_q = create("fira_adamw", model, target_modules=["q_proj"], scale=0.5)
    assert len(only_q.param_groups[0]["params"]) == 2 and only_q.param_groups[0]["alpha"] == 0.5
    peft_model = tiny_peft()
    lora = create("galore_adamw", peft_model)
    assert len(lora.param_groups) == 1  # every trainable parameter is a LoRA factor (nn.Linear)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_bf16_weights_keep_fp32_state_and_train():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = create("fira_adamw", model, lr=1e-2, rank=4)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for ids in batches(2):
        lm_step(model, opt, ids)
    state = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "proj", "limiter_norm")} == {torch.float32}
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_bad_inputs_raise_clear_errors():
    w = torch.zeros(4, 6, requires_grad=True)
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "random"}])
    with pytest.raises(ValueError, match="svd"):
        GaLoreAdamW([{"params": [w], "rank": 2, "svd": "qr"}])
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        GaLoreAdamW([{"params": [w], "rank": 0}])
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 0.5}])
    with pytest.raises(ValueError, match="only 2-D weights"):
        GaLoreAdamW([{"params": [torch.zeros(4, requires_grad=True)], "rank": 2}])
    with pytest.raises(ValueError, match=r"lr must be a number"):
        GaLoreAdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        FiraAdamW([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="needs scaling='matrix'"):
        FiraAdamW([{"params": [w], "rank": 2, "proj_type": "full"}])
    with pytest.raises(ValueError, match="disagree"):
        FiraAdamW([{"params": [w], "rank": 2, "scale": 0.5, "alpha": 0.25}])
    with pytest.raises(ValueError, match="variant"):
        FiraAdamW([{"params": [w], "rank": 2, "variant": "code"}])
    with pytest.raises(ValueError, match="gamma"):
        FiraAdamW([{"params": [w], "rank": 2, "gamma": 0.9}])
    with pytest.raises(TypeError, match="complex"):
        GaLoreAdamW([torch.zeros(2, 2, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        create("galore_adamw", tiny_llama(), alpha_typo=1)
    with pytest.raises(ValueError, match="target_modules"):
        create("galore_adamw", tiny_llama(), target_modules=["nothing_matches"])
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.zeros(4, 6).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_loading_state_saved_with_another_rank_is_refused():
    w = torch.randn(6, 10, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn(6, 10)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["rank"] = 3
    other = GaLoreAdamW([{"params": [w], "rank": 3}])
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match="checkpoint saved with other projection settings"):
        other.step()


def test_first_refresh_falls_back_to_a_randomized_svd_when_the_svd_fails(monkeypatch):
    """A failed first SVD (no convergence, or out of memory) must not leave the all-zero starting basis,
    which would freeze the matrix until the next refresh (seen on the H100 under memory pressure)."""
    G = spectrum_matrix(40, 24, decay=0.6)[None]
    projector = LowRankProjector((40, 24), rank=4, svd="subspace")
    bases = projector.new_bases(1, G.device, G.dtype)

    real_svd = torch.linalg.svd

    def failing_svd(A, *args, **kwargs):  # the full-size SVD fails; the randomized SVD's small one works
        if sorted(A.shape[-2:]) == [24, 40]:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    with pytest.warns(RuntimeWarning, match="randomized SVD"):
        projector.refresh(G, bases, first=True)
    Q = bases["proj"][0]
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=Q.dtype), atol=1e-6, rtol=0)
    captured = (G[0] @ Q).square().sum() / G.square().sum()
    best = (0.6 ** torch.arange(24.0)).square()
    assert captured >= 0.99 * best[:4].sum() / best.sum()
