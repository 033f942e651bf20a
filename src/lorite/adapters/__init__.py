"""Adapters that are not peft LoRA: LoLDU (:mod:`.loldu`), and the quantisation-aware ones of their own
modules. Each module imports with torch alone."""
