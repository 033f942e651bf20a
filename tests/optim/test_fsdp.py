"""FSDP2 (``fully_shard``) with every pair optimizer, on CPU with gloo.

Under FSDP2 each LoRA factor is a DTensor sharded on dim 0 — with three ranks and rank r = 2, A's two
rows leave one rank with an empty shard. The pair optimizers gather, compute the pair update, and keep
their shard (``PairOptimizer._step_pairs_gathered``). Checked here: N ranks end with the parameters of one
process that sees the same global batch; first moments are DTensors with the factor's placements; a
``torch.distributed.checkpoint`` save/load in the middle of training changes nothing.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import batches, free_port, spawn_ranks, tiny_peft
from lorite.optim import create

PAIR_OPTIMIZERS = {  # name -> lr
    "lora_rite": 1e-2,
    "lora_rite_reference": 1e-3,
    "scaled_adam": 1e-3,
    "shampoo": 1e-3,
    "lora_plus": 1e-3,
    "lamb": 1e-2,
}
STEPS = 4
# Shampoo's inverse fourth roots of rank-deficient statistics amplify the fp32 rounding of the gradient's
# reduction order: one process accumulating the same batch in three chunks moves it by 4e-5 too.
ATOL = {"shampoo": 1e-4}


def _single_process(name: str) -> dict[str, torch.Tensor]:
    model = tiny_peft(r=2)
    optimizer = create(name, model, lr=PAIR_OPTIMIZERS[name])
    for ids in batches(STEPS, batch=6):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = tiny_peft(r=2)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _train_sharded(model, optimizer, data, rank, world):
    for ids in data:
        shard = ids.chunk(world)[rank]  # equal shards: the mean of shard means is the global mean
        model(input_ids=shard, labels=shard).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _full_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world, port, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        data = batches(STEPS, batch=6)
        for name, lr in PAIR_OPTIMIZERS.items():
            model = _sharded_model()
            optimizer = create(name, model, lr=lr)
            _train_sharded(model, optimizer, data, rank, world)
            results[name] = _full_params(model)
            moments = [v for state in optimizer.state.values() for v in state.values()]
            results[f"{name}:sharded_state"] = torch.tensor(any(isinstance(v, DTensor) for v in moments))
        # resume through torch.distributed.checkpoint after 2 of 4 steps == uninterrupted
        model = _sharded_model()
        optimizer = create("lora_rite", model, lr=PAIR_OPTIMIZERS["lora_rite"])
        _train_sharded(model, optimizer, data[:2], rank, world)
        dcp.save({"optim": get_optimizer_state_dict(model, optimizer), "model": model.state_dict()},
                 checkpoint_id=os.path.join(out_dir, "dcp"))  # fmt: skip
        resumed = _sharded_model()
        resumed_optimizer = create("lora_rite", resumed, lr=PAIR_OPTIMIZERS["lora_rite"])
        state = {
            "optim": get_optimizer_state_dict(resumed, resumed_optimizer),
            "model": resumed.state_dict(),
        }
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
        resumed.load_state_dict(state["model"])
        set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
        _train_sharded(resumed, resumed_optimizer, data[2:], rank, world)
        results["resumed"] = _full_params(resumed)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [3])
def test_fsdp2_ranks_equal_single_process_for_every_pair_optimizer(tmp_path, world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    spawn_ranks(
        _worker, (world, free_port(), str(tmp_path)), world, [tmp_path / f"rank{r}.pt" for r in range(world)]
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    initial = {n: p.detach() for n, p in tiny_peft(r=2).named_parameters() if p.requires_grad}
    for name in PAIR_OPTIMIZERS:
        single = _single_process(name)
        assert bool(ranks[0][f"{name}:sharded_state"]), f"{name}: factor-shaped state should be DTensors"
        for param, value in single.items():
            for r in range(1, world):
                assert torch.equal(ranks[0][name][param], ranks[r][name][param]), f"{name}: ranks disagree"
            torch.testing.assert_close(
                ranks[0][name][param], value, rtol=1e-4, atol=ATOL.get(name, 1e-5), msg=name
            )
        moved = max((single[p] - initial[p]).abs().max().item() for p in single)
        assert moved > 1e-4, f"{name}: training must move the parameters"
    for param, value in ranks[0]["lora_rite"].items():
        torch.testing.assert_close(ranks[0]["resumed"][param], value, rtol=1e-5, atol=1e-6)
