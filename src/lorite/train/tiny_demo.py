"""A seconds-long demonstration: LoRA on a tiny random-init Llama, LoRA-RITE against AdamW.

The task is synthetic: sequences that count upwards modulo the vocabulary from a random start, so a
model that learns the rule predicts every token after the first. Both optimizers see the same data.
"""

from __future__ import annotations

import torch


def _model(seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


def _batches(steps: int, seed: int, batch: int = 16, length: int = 24, vocab: int = 64):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        yield (start + torch.arange(length)) % vocab


def run_tiny_demo(steps: int = 60, seed: int = 0) -> dict[str, list[float]]:
    from ..optim import LoRARite

    optimizers = {
        "adamw": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3),
        "lora_rite": lambda m: LoRARite.from_model(m, lr=3e-2),
    }
    curves: dict[str, list[float]] = {}
    for name, make in optimizers.items():
        model = _model(seed)
        optimizer = make(model)
        curves[name] = []
        for ids in _batches(steps, seed + 1):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curves[name].append(float(loss.detach()))
    print("LoRA r=8 on a tiny random Llama, synthetic counting task (training loss)")
    print(f"{'step':>5}  {'adamw':>8}  {'lora_rite':>9}")
    for step in range(0, steps, max(1, steps // 12)):
        print(f"{step + 1:>5}  {curves['adamw'][step]:8.4f}  {curves['lora_rite'][step]:9.4f}")
    print(f"{steps:>5}  {curves['adamw'][-1]:8.4f}  {curves['lora_rite'][-1]:9.4f}")
    return curves
