"""DDP works unchanged: two gloo processes end with identical parameters, equal to one process that sees
the same global batch (LoRA-RITE's step is deterministic given the all-reduced gradient)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import batches, free_port, spawn_ranks, tiny_peft
from lorite.optim import LoRARite

STEPS = 5
VARIANTS = ["paper", "reference"]


def _train(model, optimizer, data, rank=0, world=1):
    for ids in data:
        shard = ids.chunk(world)[rank]
        # mean over the shard; DDP averages the shards' gradients, which is the global mean
        loss = model(input_ids=shard, labels=shard).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _worker(rank, world, port, variant, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_peft()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = LoRARite.from_model(ddp.module, lr=1e-2, variant=variant)
        data = batches(STEPS, batch=8)
        for ids in data:
            shard = ids.chunk(world)[rank]
            ddp(input_ids=shard, labels=shard).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_two_ranks_equal_single_process(tmp_path, variant):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    outputs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    spawn_ranks(_worker, (2, free_port(), variant, str(tmp_path)), 2, outputs)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"

    single = tiny_peft()
    optimizer = LoRARite.from_model(single, lr=1e-2, variant=variant)
    _train(single, optimizer, batches(STEPS, batch=8))
    initial = tiny_peft()
    for name, p in single.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(rank0[name], p.detach(), rtol=1e-4, atol=1e-5)
            assert not torch.equal(p, initial.get_parameter(name)), "training must have moved the parameters"
