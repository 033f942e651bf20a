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


@pytest.mark.parametrize("rank", [4, 64, 128])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_step_does_not_synchronise(variant, rank):
    """At every kind of rank (register Jacobi kernel at 4, global-memory kernel at 64 and 128)."""
    model = tiny_peft(r=rank, hidden=max(32, 2 * rank)).cuda()
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


def _lora_params(model):
    return [t for pair in find_lora_pairs(model).pairs for t in (pair.A, pair.B)]


@pytest.mark.parametrize("rank", [4, 64])
def test_step_can_be_captured_in_a_cuda_graph_with_a_changing_lr(rank):
    """Capture ``opt.step()`` from outside once, replay it with new gradients and a new learning rate each
    time (a device-tensor lr, updated in place as torch's schedulers do), and match an eager twin built the
    same way and fed the same batches and rates from the start."""
    hidden = max(32, 2 * rank)
    model, twin_model = tiny_peft(r=rank, hidden=hidden).cuda(), tiny_peft(r=rank, hidden=hidden).cuda()
    lr = torch.tensor(1e-2, device="cuda")
    opt = LoRARite.from_model(model, lr=lr)  # a device lr reaches the graph
    twin = LoRARite.from_model(twin_model, lr=1e-2)
    data = [ids.cuda() for ids in batches(8)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, state and gradient tensors exist before capture
        for ids in data[:3]:
            opt.zero_grad(set_to_none=False)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for ids in data[:3]:
        lm_step(twin_model, twin, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i, ids in enumerate(data[3:]):
        rate = 1e-2 * (0.5**i)  # a schedule: the captured step must follow it
        lr.fill_(rate)
        for group in twin.param_groups:
            group["lr"] = rate
        opt.zero_grad(set_to_none=False)
        model(input_ids=ids, labels=ids).loss.backward()
        graph.replay()
        lm_step(twin_model, twin, ids)
    torch.cuda.synchronize()
    for p, q in zip(_lora_params(model), _lora_params(twin_model)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [4, 64])
def test_cuda_graph_option_replays_exactly_what_eager_steps_do(rank):
    """``LoRARite(cuda_graph=True)``: captured after two eager steps, replayed with fresh gradient tensors
    (``zero_grad(set_to_none=True)``) and a float lr that a schedule changes — bit-identical to eager."""
    hidden = max(32, 2 * rank)
    runs = []
    for graphed in (False, True):
        model = tiny_peft(r=rank, hidden=hidden).cuda()
        opt = LoRARite.from_model(model, lr=1e-2, cuda_graph=graphed)
        for i, ids in enumerate(batches(8)):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * 0.7**i
            lm_step(model, opt, ids.cuda())
        assert (opt._captured is not None) == graphed
        torch.cuda.synchronize()
        runs.append(_lora_params(model))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


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


@pytest.mark.parametrize("rank", [4, 8, 16, 32, 48, 64, 128, 256])
def test_small_eigh_is_sync_free_and_matches_fp64_lapack(rank):
    """The Triton Jacobi kernels (registers up to 32 × 32, global memory above) at every LoRA rank: no host
    synchronisation, and eigenpairs that match float64 LAPACK."""
    from lorite.optim import _jacobi, _linalg

    if not _jacobi.available():
        pytest.skip("needs Triton")
    x = torch.randn(210, rank, rank + 3, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    V64 = x @ x.mT / rank
    V64[0] = 0.0  # peft's B = 0 start
    V64[1, :, -1] = V64[1, -1, :] = 0.0  # a zero eigenvalue
    V = V64.float().cuda()
    assert _linalg.eigh_route(V) == "jacobi"
    _linalg.eigh_small(V)  # the first call of a size compiles the kernel and copies its pairing table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, vectors = _linalg.eigh_small(V)
        only_values = _linalg.eigvalsh_small(V)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert values.is_cuda and vectors.is_cuda and values.dtype == torch.float32
    exact = torch.linalg.eigvalsh(V64)
    scale = exact.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    assert ((values.cpu().double().sort(-1).values - exact).abs() / scale).max() < 5e-5
    assert ((only_values.cpu().double().sort(-1).values - exact).abs() / scale).max() < 5e-5
    vectors64 = vectors.cpu().double()
    rebuilt = vectors64 @ torch.diag_embed(values.cpu().double()) @ vectors64.mT
    assert ((rebuilt - V64).abs().amax(dim=(-2, -1)) / scale[:, 0]).max() < 1e-4
    eye = torch.eye(rank, dtype=torch.float64)
    assert (vectors64.mT @ vectors64 - eye).abs().max() < 1e-4
