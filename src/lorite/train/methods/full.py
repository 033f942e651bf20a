"""Full fine-tuning (``--method full``): every weight of the model trains; the run saves the whole model.

The baseline LoRA is measured against in Biderman et al., "LoRA Learns Less and Forgets Less" (arXiv
2405.09673): same data, same loop, same evaluation as ``--method lora``; only what trains differs.

* Optimizer: any registry optimizer that works on plain parameters — today ``adamw`` (torch's AdamW). The
  LoRA-pair optimizers (``lora_rite``, ``lora_plus``, ``scaled_adam``, ``shampoo``, ``lamb``) are refused:
  without LoRA pairs every parameter would silently land in their AdamW fallback group, so a run labelled
  "lora_rite" would really be AdamW.
* Precision: weights, gradients and optimizer state stay fp32 — ``--dtype auto`` (the default) loads the
  base in fp32 for this method on every device, since the weights loaded are the master weights that train
  — and the forward runs under bf16 autocast on CUDA (``FinetuneConfig.bf16``), so ΔW = W_tuned − W_base
  keeps updates far below bf16's resolution. ``--dtype bf16``, asked for explicitly, trains pure bf16
  (weights, gradients and AdamW state in bf16: half the memory, but updates under a weight's bf16 spacing,
  about |w|·2⁻⁸, are lost) and saves a bf16 model; ``--dtype fp16`` is refused (no loss scaling here, and
  AdamW's eps of 1e-8 is 0 in fp16).
* Memory: ``--gradient-checkpointing`` recomputes each decoder layer's activations in the backward pass.
* Output: ``model/`` — ``config.json``, ``model.safetensors`` (fp32, or bf16 as trained) and the tokenizer
  files of the model the run started from — a directory that ``--model``, ``lorite analyze spectrum
  --tuned`` and ``lorite analyze forgetting`` accept; written to a temporary directory and renamed into
  place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ...cache import atomic_directory
from ...errors import LoriteError
from ...optim import PairOptimizer, create

MODEL_DIR = "model"


def uses_lora_pairs(optimizer: str, **hparams) -> bool:
    """Whether registry optimizer ``optimizer`` is a LoRA-pair optimizer (built on a one-weight probe)."""
    probe = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no LoRA pairs: AdamW fallback" is the very thing being probed
        try:
            built = create(optimizer, probe, **hparams)
        except (TypeError, ValueError) as error:
            raise LoriteError(f"--optimizer {optimizer} with {hparams}: {error}") from error
    return isinstance(built, PairOptimizer)


def prepare(model, config):
    """Make every parameter trainable (embeddings, norms, the head — tied or not) and check the optimizer
    and the weights' dtype (fp32 or bf16; see the module docstring)."""
    kwargs = {"lr": config.lr, **config.optimizer_kwargs}
    if any(p.dtype == torch.float16 for p in model.parameters()):
        raise LoriteError(
            "--method full trains the loaded weights: fp16 weights without loss scaling underflow "
            "(AdamW's eps is 0 in fp16); use --dtype fp32 (the default) or bf16"
        )
    if uses_lora_pairs(config.optimizer, **kwargs):
        raise LoriteError(
            f"--method full trains plain weights; --optimizer {config.optimizer} optimises LoRA (A, B) pairs "
            "and would put every weight in its AdamW fallback. Use --optimizer adamw"
        )
    model.requires_grad_(True)
    return model


def _copy_tokenizer(model, target: Path) -> None:
    """The tokenizer files of the directory ``model`` was loaded from, so that ``target`` is a complete
    model directory (no tokenizer is saved when the model was not loaded from a local directory)."""
    source = Path(getattr(model, "name_or_path", "") or "")
    if not source.is_dir():
        return
    from transformers import AutoTokenizer  # optional dependency (lorite[peft])

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return
    tokenizer.save_pretrained(target)


def save(model, out: Path) -> None:
    """``out/model``: the whole model (safetensors, in the dtype it trained in) plus its tokenizer, written
    atomically."""
    with atomic_directory(Path(out) / MODEL_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(model, tmp)
