"""lorite — efficient LLM training around LoRA-RITE, its baselines and its research family."""

__version__ = "0.1.0"
