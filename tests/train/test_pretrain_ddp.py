"""Pre-training under DDP: two gloo ranks with 4 blocks each follow the single process with 8 blocks
(the same global sample order, sliced by rank; gradients averaged by DDP) up to float rounding."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import free_port, spawn_ranks
from lorite.data.blocks import build_token_cache
from lorite.train.pretrain import PretrainConfig, pretrain
from pretraining_data import char_tokenizer, synthetic_corpora


def _config(cache, batch_size):
    return PretrainConfig(
        size="tiny", lr=3e-3, tokens=32 * 8 * 6, block_length=32, batch_size=batch_size,
        corpora=["prose", "code"], data=str(cache), eval_every=3, eval_blocks=8, device="cpu",
    )  # fmt: skip


def _worker(rank, world, port, cache, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pretrain(_config(cache, batch_size=4), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_follow_the_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    cache = build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=tmp_path
    )
    single = pretrain(_config(cache, batch_size=8), tmp_path / "single")
    ddp_dir = tmp_path / "ddp"
    # metrics.json is rewritten at every evaluation; the run is finished once model/ is saved
    finished = [ddp_dir / "metrics.json", ddp_dir / "model" / "model.safetensors"]
    spawn_ranks(_worker, (2, free_port(), cache, ddp_dir), 2, finished, reset=[ddp_dir])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["total_steps"] == single["total_steps"] == 6 and ddp["tokens_per_step"] == 256
    for a, b in zip(ddp["validation"], single["validation"]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    wa = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "single" / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
