"""Loading the real model (SmolLM2-135M-Instruct by default) and model configs."""

from .loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer, resolve_model_dir

__all__ = ["DEFAULT_MODEL", "load_causal_lm", "load_tokenizer", "resolve_model_dir"]
