"""A character-level tokenizer and small synthetic corpora for the pre-training tests (no downloads)."""

from __future__ import annotations

import random
import string

from lorite.data.corpora import Document


def char_tokenizer():
    """A fast tokenizer with one token per printable character plus ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<|endoftext|>", "<pad>", *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")


def synthetic_documents(kind: str, n: int, seed: int = 0) -> list[Document]:
    """``n`` documents of easily learned text: ``"prose"`` (sentences from a small grammar) or ``"code"``."""
    rng = random.Random(f"{kind}:{seed}")
    documents = []
    for i in range(n):
        if kind == "prose":
            words = ["the cat", "a dog", "my friend", "the king"]
            verbs = ["sat on", "looked at", "ran to", "spoke of"]
            lines = [
                f"{rng.choice(words)} {rng.choice(verbs)} {rng.choice(words)}."
                for _ in range(rng.randint(8, 20))
            ]
        else:
            lines = [f"def f{j}(x):\n    return x + {rng.randint(0, 9)}\n" for j in range(rng.randint(4, 10))]
        documents.append(Document(f"{kind}-{i}", "\n".join(lines)))
    return documents


def synthetic_corpora(n: int = 40) -> dict[str, list[Document]]:
    return {"prose": synthetic_documents("prose", n), "code": synthetic_documents("code", n)}
