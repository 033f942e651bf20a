"""Model sources: the bundled default (a dequantized Q4_1 SmolLM2-135M-Instruct), a GGUF file, a local model
directory or a Hugging Face Hub id, loaded in the dtype asked for (or 4-bit); Llama pre-training configs."""

from .loading import (
    DEFAULT_MODEL,
    DTYPE_CHOICES,
    DTYPES,
    hub_cache_dir,
    is_hub_id,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "DTYPE_CHOICES",
    "hub_cache_dir",
    "is_hub_id",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_dir",
]
