"""GaLore / Fira on CUDA: the steady step and the default (subspace) refresh never synchronise with the
host, and the CUDA step follows the CPU one."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import batches, lm_step, tiny_llama
from lorite.optim import create

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
def test_steady_steps_and_subspace_refresh_do_not_synchronise(name):
    model = tiny_llama().cuda()
    opt = create(name, model, lr=1e-2, rank=8, update_proj_gap=2)
    ids = batches(1)[0].cuda()
    lm_step(model, opt, ids)  # the first refresh is an exact SVD, which synchronises
    torch.cuda.synchronize()
    for _ in range(3):  # steps 2–4: steady, the subspace refresh (t = 2), steady
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw"])
@pytest.mark.parametrize("svd", ["exact", "subspace"])
def test_cuda_step_follows_the_cpu_step(name, svd):
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    hyper = dict(lr=1e-2, rank=8, update_proj_gap=3, svd=svd)
    opt_cpu, opt_gpu = create(name, cpu, **hyper), create(name, gpu, **hyper)
    for ids in batches(5):
        lm_step(cpu, opt_cpu, ids)
        lm_step(gpu, opt_gpu, ids.cuda())
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
