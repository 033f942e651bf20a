"""The base dtype on CUDA: ``--dtype auto`` loads a LoRA run's base in bf16 there, and ``--load-in-4bit``
trains LoRA on a 4-bit NF4 base (QLoRA, needs bitsandbytes) — the factors and optimizer state fp32 in
both, the saved adapter evaluating to the run's own score."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_model_dir, write_task
from lorite.models import load_causal_lm
from lorite.optim import create
from lorite.train.finetune import FinetuneConfig, evaluate_model, finetune
from lorite.train.methods import lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="needs bitsandbytes (pip install 'lorite[qlora]')",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_dtype")
    return tiny_model_dir(root / "model", hidden=64), write_task(root / "task" / "task.json")


def run_config(files, **overrides) -> FinetuneConfig:
    model_dir, task = files
    settings = dict(
        task=f"file:{task}", model=str(model_dir), optimizer="adamw", lr=1e-3, rank=4, steps=3,
        batch_size=4, n_validation=16, n_test=16, device="cuda",
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def adapter_dtypes(folder) -> set:
    with safe_open(folder / "adapter_model.safetensors", "pt") as tensors:
        return {tensors.get_tensor(key).dtype for key in tensors.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("load_in_4bit", "expected"), [(False, "bf16"), pytest.param(True, "nf4", marks=needs_bitsandbytes)]
)
def test_a_lora_run_on_a_low_precision_base(files, tmp_path, load_in_4bit, expected):
    config = run_config(files, load_in_4bit=load_in_4bit)
    results = finetune(config, out=tmp_path / "run", progress=False)
    assert results["base_dtype"] == expected and not results["diverged"]
    # r·(in + out) per layer: q, o 64→64; k, v 64→32; gate, up 64→128; down 128→64 — in 2 decoder layers
    assert results["trainable_parameters"] == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    assert adapter_dtypes(tmp_path / "run" / "adapter") == {torch.float32}
    again = evaluate_model(config, adapter=tmp_path / "run" / "adapter")
    assert again["test"]["score"] == pytest.approx(results["test"]["score"], abs=1e-6)


@needs_bitsandbytes
@pytest.mark.parametrize("optimizer", ["lora_rite", "adamw"])
def test_qlora_layers_and_states(files, optimizer):
    import bitsandbytes as bnb

    model, _ = load_causal_lm(files[0], dtype="bf16", device="cuda", load_in_4bit=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear layer of the 2 decoder layers; the head stays dense
    model = lora.prepare(model, FinetuneConfig(task="x", rank=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and {p.dtype for p in trainable} == {torch.float32}
    opt = create(optimizer, model, lr=1e-3)
    ids = torch.randint(3, 50, (4, 16), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    states = [
        t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()
    ]
    assert states and {t.dtype for t in states} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
