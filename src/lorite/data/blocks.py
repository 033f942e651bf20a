"""Packed token blocks: documents tokenised, joined with an end-of-text token and cut into fixed-length
blocks — the unit of language-model training and perplexity evaluation (fine-tuning on a corpus here,
pretraining later)."""

from __future__ import annotations

import torch


def pack_blocks(token_lists: list[list[int]], block_length: int, separator: int | None) -> torch.Tensor:
    """Concatenate ``token_lists`` (``separator`` between documents) and cut into ``(N, block_length)``
    blocks; the tail shorter than a block is dropped."""
    if block_length < 2:
        raise ValueError(f"block_length must be >= 2, got {block_length}")
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    n = len(stream) // block_length
    return torch.tensor(stream[: n * block_length], dtype=torch.long).view(n, block_length)


def tokenize_documents(tokenizer, texts: list[str], block_length: int) -> torch.Tensor:
    """Blocks of ``block_length`` tokens from ``texts`` with the tokenizer's EOS between documents."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return pack_blocks(ids, block_length, tokenizer.eos_token_id)
