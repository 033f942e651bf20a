"""Tiny random-init models and data shared by the tests (fast: hidden 32–64, 2 layers)."""

from __future__ import annotations

import copy

import torch


def tiny_llama(dtype=torch.float32, seed=0, vocab=64, hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_peft(dtype=torch.float32, seed=0, r=4, random_B=True, **lora_kwargs):
    """A tiny Llama with peft LoRA on all linear layers; B randomised so that B·A ≠ 0 (unless told)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(dtype=dtype, seed=seed)
    lora_kwargs.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if random_B:
        from lorite.optim import find_lora_pairs

        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pair in find_lora_pairs(model).pairs:
                pair.B.copy_(0.1 * torch.randn(pair.B.shape, generator=gen, dtype=pair.B.dtype))
    return model


def batches(n_steps, seed=0, batch=4, seq=16, vocab=64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n_steps)]


def lm_step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def deltas(model):
    """Every pair's effective weight change s·B·A, by pair name."""
    from lorite.optim import find_lora_pairs

    return {pair.name: pair.delta_weight().detach().clone() for pair in find_lora_pairs(model).pairs}


def max_relative_gap(d1, d2):
    return max(float((d1[k] - d2[k]).abs().max() / d1[k].abs().max()) for k in d1)


def reparameterize(model, transform):
    """Return a copy whose pairs are (T⁻¹A, B·T) with ``T = transform(rank, index)``: same B·A."""
    from lorite.optim import find_lora_pairs

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for index, pair in enumerate(find_lora_pairs(twin).pairs):
            T = transform(pair.rank, index).to(pair.A.dtype)
            pair.A.copy_(torch.linalg.solve(T, pair.A))
            pair.B.copy_(pair.B @ T)
    return twin
