"""Small LLaMA-architecture models built from a config, for pre-training from scratch.

The sizes follow the small LLaMA configs of GaLore (Zhao et al., arXiv 2403.03507, Table 2 and its
``configs/llama_*.json``) and Fira (Chen et al., arXiv 2410.01623): SwiGLU MLP, RMSNorm (ε = 1e-6), RoPE,
multi-head attention (no GQA), untied input/output embeddings, max 1024 positions, init std 0.02.

=====  ======  =====  ======  =====  ========  =====================  ======================
name   hidden  FFN    layers  heads  head dim  params, vocab 49,152   params, vocab 32,000
=====  ======  =====  ======  =====  ========  =====================  ======================
tiny   32      88     2       4      8         3,170,976              2,073,248
20m    256     688    4       4      64        28,330,240             19,548,416
60m    512     1376   8       8      64        75,637,248             58,073,600
130m   768     2048   12      12     64        160,451,328            134,105,856
350m   1024    2736   24      16     64        403,096,576            367,969,280
=====  ======  =====  ======  =====  ========  =====================  ======================

The names count parameters as the papers do, with their 32,000-token T5 vocabulary; lorite uses the
SmolLM2 tokenizer (49,152 tokens, :data:`SMOLLM2_VOCAB_SIZE`), whose two embedding matrices add the
difference (the transformer blocks are identical). Per layer: 4·h² attention + 3·h·f MLP + 2·h norm
weights; plus 2·V·h embeddings and h for the final norm. ``tiny`` is for tests (pass a small vocab).

``20m`` is chosen for LiGO growth to ``60m`` (arXiv 2303.00980): width ×2 (256 → 512, FFN 688 → 1376)
and depth ×2 (4 → 8 layers) with the head dimension fixed at 64, so growth adds heads (4 → 8) and never
splits a RoPE head.
"""

from __future__ import annotations

from typing import Any

from ..runtime import seeded
from .loading import resolve_model_dir

SMOLLM2_VOCAB_SIZE = 49152

LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2, "num_attention_heads": 4},
    "20m": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    "130m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "350m": {
        "hidden_size": 1024,
        "intermediate_size": 2736,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}

# shared by every size (GaLore's configs/llama_*.json)
_COMMON = {
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def llama_config(size: str, vocab_size: int = SMOLLM2_VOCAB_SIZE, **overrides: Any):
    """The ``transformers.LlamaConfig`` of ``size`` (a key of :data:`LLAMA_SIZES`); ``overrides`` replace
    any field (e.g. ``max_position_embeddings``)."""
    from transformers import LlamaConfig  # optional dependency (lorite[peft]), slow to import

    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {size!r}; available: {', '.join(LLAMA_SIZES)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    fields = {**_COMMON, **LLAMA_SIZES[size]}
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, **fields)


def build_llama(size: str, vocab_size: int = SMOLLM2_VOCAB_SIZE, seed: int = 0, **overrides: Any):
    """A randomly initialised fp32 ``LlamaForCausalLM`` of ``size``; the weights depend only on ``seed``
    (the global RNG state is left as it was)."""
    from transformers import LlamaForCausalLM  # optional dependency (lorite[peft]), slow to import

    config = llama_config(size, vocab_size, **overrides)
    with seeded(seed):
        return LlamaForCausalLM(config)


def parameter_count(size: str, vocab_size: int = SMOLLM2_VOCAB_SIZE) -> int:
    """Closed-form parameter count of ``size`` (matches ``build_llama(...).num_parameters()``)."""
    c = LLAMA_SIZES[size]
    h, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    return n * (4 * h * h + 3 * h * f + 2 * h) + 2 * vocab_size * h + h


def pretraining_tokenizer(spec=None):
    """The SmolLM2 tokenizer (from the cached GGUF conversion, see :mod:`lorite.models.loading`); its
    vocabulary is :data:`SMOLLM2_VOCAB_SIZE` tokens."""
    from transformers import AutoTokenizer  # optional dependency (lorite[peft])

    return AutoTokenizer.from_pretrained(resolve_model_dir(spec))
