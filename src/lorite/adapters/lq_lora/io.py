"""Saved LQ-LoRA models: packed ``Q`` (safetensors), the peft adapter and ``lq_lora.json``, written
atomically; ``Q`` replaces ``W``, so the adapter alone would not be enough to load one.

Loading checks the folder before building anything: a ``lq_lora.json`` that does not parse or lacks its
fields, a missing or truncated safetensors file, a layer whose tensors are missing or of the wrong size is
a :class:`~lorite.errors.DamagedArtifact` naming the file (the folder cannot be repaired: quantize again).
A folder that is not a saved LQ-LoRA model at all (no ``lq_lora.json``, another format) and a model that
does not match the saved layers stay :class:`ValueError` (bad input).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...cache import atomic_directory
from ...errors import DamagedArtifact
from ...models import load_causal_lm
from ..quant import QuantConfig, QuantizedTensor
from .layers import QuantizedLinear, quantized_layers

FORMAT = "lorite-lq-lora/1"


def write_lq_lora(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file  # optional dependency (lorite[peft])

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layers (apply_lq_lora first)")
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in layers.items():
        for part, t in layer.quantized.tensors().items():
            tensors[f"{name}.{part}"] = t.detach().cpu().contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        modules[name] = {"shape": [layer.out_features, layer.in_features], "format": layer.config.to_dict()}
    info = getattr(model, "lq_lora_info", {}) or {}
    meta = {
        "format": FORMAT,
        "base_model": info.get("base_model"),
        "settings": info.get("settings"),
        "modules": modules,
    }
    save_file(tensors, str(folder / "quantized.safetensors"))
    model.save_pretrained(folder / "adapter", safe_serialization=True)
    (folder / "lq_lora.json").write_text(json.dumps(meta, indent=1))


def save_lq_lora(model: nn.Module, out: str | Path) -> Path:
    """Write ``out`` atomically: ``quantized.safetensors`` (packed ``Q`` of every quantized layer, and their
    biases), ``adapter/`` (peft's safetensors adapter) and ``lq_lora.json`` (format, base model, settings,
    each layer's shape and storage format)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        write_lq_lora(model, tmp)
    return out


REDO = "the folder is damaged; quantize the model again (lorite quantize) into a new --out"


def _damaged(file: Path, what: str) -> DamagedArtifact:
    return DamagedArtifact(f"saved LQ-LoRA model: {file} {what}; {REDO}")


def read_lq_lora_meta(path: str | Path) -> dict:
    """The ``lq_lora.json`` of a saved LQ-LoRA model, checked (see the module docstring)."""
    path = Path(path)
    meta_file = path / "lq_lora.json"
    if not meta_file.exists():
        raise ValueError(f"{str(path)!r} is not a saved LQ-LoRA model (no lq_lora.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(meta_file, f"does not parse ({' '.join(str(error).split())})") from error
    if not isinstance(meta, dict):
        raise _damaged(meta_file, "does not hold a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise _damaged(meta_file, "lists no quantized layers ('modules')")
    for name, spec in modules.items():
        try:
            shape = [int(n) for n in spec["shape"]]
            QuantConfig.from_dict(spec["format"])
        except (KeyError, TypeError, ValueError) as error:
            raise _damaged(meta_file, f"has a bad entry for layer {name!r} ({error})") from error
        if len(shape) != 2 or min(shape) < 1:
            raise _damaged(meta_file, f"gives layer {name!r} the shape {spec['shape']}")
    return meta


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # optional dependency (lorite[peft])

    if not file.is_file():
        raise _damaged(file, "is missing")
    try:
        return load_file(str(file))
    except Exception as error:  # safetensors' SafetensorError (truncated, bad header) is a bare Exception
        raise _damaged(file, f"does not load ({' '.join(str(error).split())})") from error


def _check_adapter(folder: Path) -> None:
    """peft's adapter folder: its config parses and its weights load (before peft builds anything)."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise _damaged(config, "is missing")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(config, f"does not parse ({' '.join(str(error).split())})") from error
    _load_safetensors(folder / "adapter_model.safetensors")


def attach_lq_lora(model: nn.Module, path: str | Path, is_trainable: bool = True):
    """Load the adapter of a saved LQ-LoRA model onto ``model`` (the same base architecture) and replace the
    adapted layers' weights with the saved quantized ``Q``."""
    from peft import PeftModel  # optional dependency (lorite[peft]), slow to import

    path = Path(path)
    meta = read_lq_lora_meta(path)
    quantized_file = path / "quantized.safetensors"
    tensors = _load_safetensors(quantized_file)
    _check_adapter(path / "adapter")
    packed = {}
    for name, spec in meta["modules"].items():
        config = QuantConfig.from_dict(spec["format"])
        parts = {
            part: tensors[f"{name}.{part}"]
            for part in ("codes", "scales", "scale_codes", "scale_offset")
            if f"{name}.{part}" in tensors
        }
        try:
            packed[name] = QuantizedTensor.from_tensors(parts, tuple(spec["shape"]), config)
        except ValueError as error:  # a layer's tensors missing or of the wrong size
            raise _damaged(quantized_file, f"does not hold layer {name!r} ({error})") from error
        try:
            layer = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{path}: the model has no layer {name!r}") from error
        if not isinstance(layer, nn.Linear) or [layer.out_features, layer.in_features] != spec["shape"]:
            raise ValueError(f"{path}: layer {name!r} does not match the saved shape {spec['shape']}")
    model = PeftModel.from_pretrained(model, str(path / "adapter"), is_trainable=is_trainable)
    root = model.get_base_model()
    for name in meta["modules"]:
        layer = root.get_submodule(name)
        device = layer.base_layer.weight.device
        quantized = packed[name].to(device)
        bias = tensors.get(f"{name}.bias")
        layer.base_layer = QuantizedLinear(quantized, None if bias is None else bias.to(device))
    model.lq_lora_info = {"base_model": meta.get("base_model"), "settings": meta.get("settings")}
    return model


def load_lq_lora(path: str | Path, device: str | torch.device | None = None, is_trainable: bool = False):
    """``(model, tokenizer)`` of a saved LQ-LoRA model: its base model (from the path recorded in
    ``lq_lora.json``) with the saved ``Q`` and adapter."""
    meta = read_lq_lora_meta(path)
    model, tokenizer = load_causal_lm(meta.get("base_model"))
    model = attach_lq_lora(model, path, is_trainable=is_trainable)
    if device is not None:
        model.to(device)
    return model, tokenizer
