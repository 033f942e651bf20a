"""Optimizer-step and whole-training-step speed, and optimizer state memory, for every lorite optimizer
next to torch's AdamW (and pytorch-optimizer's LoRARite when it is installed).

Configs (LoRA r=16 on q, k, v, o, gate, up, down):

* ``gemma2b`` — Gemma-2B shape from transformers' GemmaConfig: 18 layers, hidden 2048, FFN 16384,
  8 heads × 256, 1 KV head; 126 pairs, 19.6M LoRA parameters; whole step on batch 8×512, bf16 base;
* ``smollm2`` — SmolLM2-135M's own config (30 layers, hidden 576, 9×64 heads, 3 KV heads, FFN 1536);
  210 pairs; whole step on batch 16×512 with bf16 autocast over fp32 weights (random weights: speed only);
* ``cpu`` — 8 layers, hidden 1024, k/v 256, FFN 4096; 56 pairs; 2 threads; optimizer step only.

    python benchmarks/speed/optimizer_step.py --config cpu
    python benchmarks/speed/optimizer_step.py --config gemma2b --whole-step      # on a GPU

Times are medians over ``--steps`` timed steps after warm-up (CUDA events on GPU). The optimizer step is
timed on LoRA factors with random gradients; the whole step is forward + backward + step + zero_grad.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import markdown_table, write_json

import lorite.optim as lo

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "gemma2b": dict(layers=18, hidden=2048, ffn=16384, heads=8, head_dim=256, kv_heads=1, vocab=256000),
    "smollm2": dict(layers=30, hidden=576, ffn=1536, heads=9, head_dim=64, kv_heads=3, vocab=49152),
    "cpu": dict(layers=8, hidden=1024, ffn=4096, heads=8, head_dim=128, kv_heads=2, vocab=32000),
}


def lora_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear layer."""
    h, q, kv, f = cfg["hidden"], cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"], cfg["ffn"]
    per_layer = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                 "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # fmt: skip
    return [per_layer[m] for _ in range(cfg["layers"]) for m in MODULES]


def make_pairs(cfg: dict, rank: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pairs = []
    for fan_in, fan_out in lora_shapes(cfg):
        A = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).to(device).requires_grad_()
        B = (0.01 * torch.randn(fan_out, rank, generator=gen)).to(device).requires_grad_()
        pairs.append((A, B))
    return pairs


def set_grads(pairs, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for A, B in pairs:
        A.grad = (1e-3 * torch.randn(A.shape, generator=gen)).to(A.device)
        B.grad = (1e-3 * torch.randn(B.shape, generator=gen)).to(B.device)


def build_optimizer(name: str, pairs, device: torch.device):
    params = [t for pair in pairs for t in pair]
    if name == "adamw":
        if device.type == "cuda":
            return torch.optim.AdamW(params, lr=1e-4, fused=True)
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "pytorch_optimizer.LoRARite":
        from pytorch_optimizer import LoRARite as Theirs

        return Theirs(params, lr=1e-3)  # alternating A, B order
    classes = {
        "lora_rite": lambda: lo.LoRARite(pairs, lr=1e-3),
        "lora_rite+graph": lambda: lo.LoRARite(pairs, lr=1e-3, cuda_graph=True),
        "lora_rite_reference+graph": lambda: lo.LoRARite(
            pairs, lr=1e-3, variant="reference", cuda_graph=True
        ),
        "lora_rite_reference": lambda: lo.LoRARite(pairs, lr=1e-3, variant="reference"),
        "lora_plus": lambda: lo.LoRAPlus(pairs, lr=1e-4),
        "scaled_adam": lambda: lo.ScaledAdam(pairs, lr=1e-4),
        "shampoo": lambda: lo.Shampoo(pairs, lr=1e-4),
        "lamb": lambda: lo.Lamb(pairs, lr=1e-3),
    }
    return classes[name]()


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values() if isinstance(state, dict) else ():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def call_ms(fn, device: torch.device) -> float:
    """Milliseconds of one ``fn()``: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - began)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn, device) for _ in range(steps))


def optimizer_step_ms(name: str, cfg: dict, rank: int, device, steps: int, warmup: int) -> tuple[float, int]:
    pairs = make_pairs(cfg, rank, device)
    optimizer = build_optimizer(name, pairs, device)
    set_grads(pairs, seed=1)
    ms = timed(optimizer.step, steps, warmup, device)
    return ms, state_bytes(optimizer)


def build_model(config_name: str, device: torch.device, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = CONFIGS[config_name]
    common = dict(
        hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
        vocab_size=cfg["vocab"], max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    if config_name == "gemma2b":
        with torch.device(device):
            model = GemmaForCausalLM(GemmaConfig(**common)).to(torch.bfloat16)
    else:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    model.config.use_cache = False
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(MODULES), lora_dropout=0.0)
    return get_peft_model(model, lora)  # LoRA factors are fp32 (peft upcasts adapters)


def make_optimizer(name: str, model):
    if name == "pytorch_optimizer.LoRARite":
        from pytorch_optimizer import LoRARite as Theirs

        return Theirs([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    base, graphed = name.removesuffix("+graph"), name.endswith("+graph")
    return lo.create(base, model, lr=1e-4, **({"cuda_graph": True} if graphed else {}))


def whole_step_ms(names: list[str], config_name: str, rank: int, device, steps: int, warmup: int, batch, seq):
    """Median ms of forward + backward + step + zero_grad for every optimizer, on one model, measured in
    two interleaved rounds (so that clock ramp-up and allocator state do not favour whoever runs last)."""
    model = build_model(config_name, device, rank)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, CONFIGS[config_name]["vocab"], (batch, seq), generator=gen).to(device)
    autocast = config_name == "smollm2"
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _round in range(2):
        for name in names:
            optimizer = make_optimizer(name, model)

            def step(optimizer=optimizer):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            samples[name].append(timed(step, steps, warmup, device))
            del optimizer
            torch.cuda.empty_cache()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-step", action="store_true")
    parser.add_argument("--optimizers", default="all")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and args.config != "cpu" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    names = ["adamw", "lora_rite", "lora_rite_reference", "lora_plus", "scaled_adam", "shampoo", "lamb"]
    if device.type == "cuda":  # the step captured in a CUDA graph (LoRARite(cuda_graph=True))
        names[3:3] = ["lora_rite+graph", "lora_rite_reference+graph"]
    try:
        import pytorch_optimizer  # noqa: F401

        names.append("pytorch_optimizer.LoRARite")
    except ImportError:
        pass
    if args.optimizers != "all":
        names = args.optimizers.split(",")
    cfg = CONFIGS[args.config]
    n_params = sum(args.rank * (i + o) for i, o in lora_shapes(cfg))
    print(f"config {args.config}: {len(lora_shapes(cfg))} pairs, {n_params / 1e6:.1f}M LoRA params, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({args.threads} threads)"))  # fmt: skip
    rows = []
    for name in names:
        step_ms, memory = optimizer_step_ms(name, cfg, args.rank, device, args.steps, args.warmup)
        rows.append({"optimizer": name, "step_ms": step_ms, "state_bytes": memory})
        print(f"  measured {name}: {rows[-1]}", flush=True)
    if args.whole_step and device.type == "cuda":
        batch, seq = (8, 512) if args.config == "gemma2b" else (16, 512)
        whole = whole_step_ms(names, args.config, args.rank, device, 10, 3, batch, seq)
        for row in rows:
            row["whole_ms"] = whole[row["optimizer"]]
    base = rows[0]
    header = ["optimizer", "step ms", "× AdamW", "whole step ms", "overhead", "state MB", "state vs AdamW"]
    cells = []
    for row in rows:
        whole = row.get("whole_ms")
        overhead = f"{100 * (whole / base['whole_ms'] - 1):+.1f}%" if whole and base.get("whole_ms") else "—"
        cells.append([
            row["optimizer"], f"{row['step_ms']:.2f}", f"{row['step_ms'] / base['step_ms']:.1f}×",
            f"{whole:.1f}" if whole else "—", overhead, f"{row['state_bytes'] / 2**20:.1f}",
            f"{100 * (row['state_bytes'] / base['state_bytes'] - 1):+.1f}%",
        ])  # fmt: skip
    print("\n" + markdown_table(header, cells), end="")
    if args.json:
        write_json(Path(args.json), {"config": args.config, "device": str(device), "rows": rows})


if __name__ == "__main__":
    main()
