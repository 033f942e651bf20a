"""LoRA-RITE on CUDA: the step never synchronises with the host, it can be captured in a CUDA graph, and
its GPU path (CholeskyQR2 + Triton Jacobi) follows the per-pair reference."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import batches, deltas, lm_step, max_relative_gap, tiny_peft
from lorite.optim import LoRARite, find_lora_pairs
from reference_lora_rite import ReferenceLoRARite

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_step_does_not_synchronise(variant):
    model = tiny_peft().cuda()
    opt = LoRARite.from_model(model, lr=1e-2, variant=variant)
    ids = batches(3)[0].cuda()
    for _ in range(2):  # the first steps build the plan (index tensors are copied to the device once)
        lm_step(model, opt, ids)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(opt.diagnostics["unmagnified_grad_norm"]).item()


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: a captured step diverges from the eager one (0.007 abs after 5 replays on "
    "torch 2.11 + CUDA 13); the docs say CUDA-graph capture is not supported yet",
)
def test_step_can_be_captured_in_a_cuda_graph():
    """Capture ``opt.step()`` once, replay it with new gradients, and match an eager twin."""
    model = tiny_peft().cuda()
    opt = LoRARite.from_model(model, lr=torch.tensor(1e-2, device="cuda"))  # a device lr reaches the graph
    data = [ids.cuda() for ids in batches(8)]
    params = [t for pair in find_lora_pairs(model).pairs for t in (pair.A, pair.B)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, state and gradient tensors exist before capture
        for ids in data[:3]:
            opt.zero_grad(set_to_none=False)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    twin_model = copy.deepcopy(model)
    twin = LoRARite.from_model(twin_model, lr=1e-2)
    twin.load_state_dict(opt.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    twin_params = [t for pair in find_lora_pairs(twin_model).pairs for t in (pair.A, pair.B)]
    for ids in data[3:]:
        opt.zero_grad(set_to_none=False)
        model(input_ids=ids, labels=ids).loss.backward()
        graph.replay()
        lm_step(twin_model, twin, ids)
    torch.cuda.synchronize()
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert not torch.equal(params[1], data[0].new_zeros(1).float()), "sanity"


def test_gpu_path_follows_the_per_pair_reference():
    base = tiny_peft(dtype=torch.float32, seed=3)
    ours_model = copy.deepcopy(base).cuda()
    ref_model = copy.deepcopy(base)
    ours = LoRARite.from_model(ours_model, lr=3e-3)
    ref = ReferenceLoRARite([(p.A, p.B) for p in find_lora_pairs(ref_model).pairs], lr=3e-3)
    worst = 0.0
    for ids in batches(100, seed=5):
        lm_step(ours_model, ours, ids.cuda())
        ref_model(input_ids=ids, labels=ids).loss.backward()
        ref.step()
        ref_model.zero_grad(set_to_none=True)
        ours_deltas = {k: v.cpu() for k, v in deltas(ours_model).items()}
        worst = max(worst, max_relative_gap(deltas(ref_model), ours_deltas))
    assert worst < 1e-4, f"GPU path drifted {worst:.2e} from the CPU per-pair reference"


@pytest.mark.parametrize("rank", [16, 64])
def test_small_eigh_routes_and_matches_lapack(rank):
    """r ≤ 32: the sync-free Jacobi kernel (when Triton is there); r > 32: LAPACK on the host, except under
    CUDA-graph capture. Both match LAPACK."""
    from lorite.optim import _jacobi, _linalg

    x = torch.randn(420, rank, rank, generator=torch.Generator().manual_seed(rank))
    V = (x @ x.mT / rank).cuda()
    expected_route = (
        "host" if rank > _linalg.HOST_EIGH_ABOVE else "jacobi" if _jacobi.available() else "torch"
    )
    assert _linalg._eigh_route(V) == expected_route
    values, vectors = _linalg.eigh_small(V)
    assert values.is_cuda and vectors.is_cuda and values.dtype == torch.float32
    exact = torch.linalg.eigvalsh(V.cpu().double())
    assert (values.cpu().double().sort(-1).values - exact).abs().max() < 1e-4 * exact.abs().max()
    rebuilt = vectors @ torch.diag_embed(values) @ vectors.mT
    assert (rebuilt - V).abs().max() < 1e-4 * V.abs().max()
    assert (_linalg.eigvalsh_small(V).sort(-1).values.cpu().double() - exact).abs().max() < 1e-4 * exact.max()
