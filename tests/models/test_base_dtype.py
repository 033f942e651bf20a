"""The base weights' dtype (``--dtype``) and 4-bit base (``--load-in-4bit``): what loads in which dtype,
that LoRA factors and optimizer state stay fp32 on a bf16/fp16 base, the per-method ``auto`` policy, and the
errors where a setting cannot work."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_model_dir, write_task
from lorite.commands._options import Parser, add_training_args, training_config
from lorite.errors import LoriteError
from lorite.models import load_causal_lm, resolve_dtype
from lorite.models.loading import four_bit_config
from lorite.optim import create
from lorite.train.finetune import FinetuneConfig, base_dtype, evaluate_model, finetune
from lorite.train.methods import full, lora

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    return tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        (None, None, torch.float32),
        ("auto", None, torch.float32),
        ("auto", CPU, torch.float32),
        ("auto", CUDA, torch.bfloat16),
        ("auto", "cuda:1", torch.bfloat16),
        ("fp32", CUDA, torch.float32),
        ("bf16", CPU, torch.bfloat16),
        ("fp16", CPU, torch.float16),
        (torch.float64, CPU, torch.float64),
    ],
)
def test_resolve_dtype(dtype, device, expected):
    assert resolve_dtype(dtype, device) == expected


def test_an_unknown_dtype_is_refused():
    with pytest.raises(LoriteError, match=r"^--dtype must be one of auto, fp32, bf16, fp16, got 'fp64'$"):
        resolve_dtype("fp64")
    with pytest.raises(LoriteError, match=r"^--dtype must be one of auto, fp32, bf16, fp16, got 'half'$"):
        FinetuneConfig(task="x", dtype="half").validate()


@pytest.mark.parametrize(
    ("method", "dtype", "device", "bf16", "expected"),
    [
        ("lora", "auto", CUDA, True, "bf16"),  # a frozen base: bf16 on the GPU
        ("lora", "auto", CPU, True, "fp32"),
        ("lora", "auto", CUDA, False, "fp32"),  # --no-bf16: no bf16 anywhere
        ("full", "auto", CUDA, True, "fp32"),  # the loaded weights are the master weights
        ("loldu", "auto", CUDA, True, "fp32"),
        ("lq_lora", "auto", CUDA, True, "fp32"),
        ("full", "bf16", CUDA, True, "bf16"),  # asked for explicitly
        ("lora", "fp16", CPU, True, "fp16"),
    ],
)
def test_auto_is_bf16_for_lora_on_cuda_only(method, dtype, device, bf16, expected):
    config = FinetuneConfig(task="x", method=method, dtype=dtype, bf16=bf16)
    assert base_dtype(config, device) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_factors_and_optimizer_state_stay_fp32_on_a_low_precision_base(files, dtype):
    model, _ = load_causal_lm(files[0], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model = lora.prepare(model, FinetuneConfig(task="x", rank=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 linear layers × 2 decoder layers
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in frozen.values()} == {dtype}
    for name in ("lora_rite", "adamw"):
        optimizer = create(name, model, lr=1e-3)
        ids = torch.randint(3, 50, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float64_keys = getattr(optimizer, "float64_state_keys", frozenset())  # kept in float64 on purpose
        floating = {
            t.dtype
            for s in optimizer.state.values()
            for key, t in s.items()
            if torch.is_tensor(t) and t.is_floating_point() and key not in float64_keys
        }
        wide = {t.dtype for s in optimizer.state.values() for key, t in s.items() if key in float64_keys}
        assert torch.isfinite(loss) and floating == {torch.float32}, (name, floating)
        assert wide <= {torch.float64}, (name, wide)


def test_full_keeps_bf16_when_asked_and_refuses_fp16(files):
    config = FinetuneConfig(task="x", method="full", optimizer="adamw", dtype="bf16")
    model = full.prepare(load_causal_lm(files[0], dtype="bf16")[0], config)
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(LoriteError, match=r"^--method full trains the loaded weights: fp16 weights"):
        full.prepare(load_causal_lm(files[0], dtype="fp16")[0], config)


def test_a_lora_run_on_a_bf16_base_saves_fp32_factors_and_evaluates_again(files, tmp_path):
    model_dir, task = files
    config = FinetuneConfig(
        task=f"file:{task}", model=str(model_dir), optimizer="adamw", rank=4, steps=2, batch_size=2,
        n_validation=8, n_test=8, dtype="bf16", device="cpu",
    )  # fmt: skip
    results = finetune(config, out=tmp_path / "run", progress=False)
    assert results["base_dtype"] == "bf16" and results["config"]["dtype"] == "bf16"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["base_dtype"] == "bf16"
    with safe_open(tmp_path / "run" / "adapter" / "adapter_model.safetensors", "pt") as tensors:
        dtypes = {tensors.get_tensor(key).dtype for key in tensors.keys()}  # noqa: SIM118
    assert dtypes == {torch.float32}
    again = evaluate_model(config, adapter=tmp_path / "run" / "adapter")
    assert again["test"]["score"] == pytest.approx(results["test"]["score"], abs=1e-6)


def test_the_options_reach_the_config():
    parser = Parser()
    add_training_args(parser)
    args = parser.parse_args(["--dtype", "bf16", "--load-in-4bit"])
    config = training_config(args, "x", "lora_rite", 1e-3, 0)
    assert (config.dtype, config.load_in_4bit) == ("bf16", True)
    defaults = training_config(parser.parse_args([]), "x", "lora_rite", 1e-3, 0)
    assert (defaults.dtype, defaults.load_in_4bit) == ("auto", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp64"])


# ------------------------------------------------------------------------------------------ 4-bit base
def test_4bit_needs_bitsandbytes(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it raises ImportError
    message = r"^--load-in-4bit needs bitsandbytes \(CUDA only\): pip install 'lorite\[qlora\]'$"
    with pytest.raises(LoriteError, match=message):
        four_bit_config(torch.bfloat16, CUDA)
    with pytest.raises(LoriteError, match=message):  # before any weights are read
        load_causal_lm(files[0], dtype="bf16", device="cpu", load_in_4bit=True)


def test_4bit_needs_a_cuda_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    for device in (None, CPU):
        with pytest.raises(LoriteError, match=r"^--load-in-4bit needs a CUDA device"):
            four_bit_config(torch.bfloat16, device)


def test_4bit_config_is_qlora_nf4(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    config = four_bit_config(torch.bfloat16, CUDA)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(("method", "parallel"), [("full", "none"), ("loldu", "none"), ("lora", "fsdp2")])
def test_4bit_is_for_lora_without_fsdp2(method, parallel):
    config = FinetuneConfig(task="x", method=method, parallel=parallel, load_in_4bit=True)
    with pytest.raises(LoriteError, match=r"^--load-in-4bit trains LoRA on a frozen 4-bit base \(QLoRA\)"):
        config.validate()
