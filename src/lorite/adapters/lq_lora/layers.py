"""LQ-LoRA in a model: the frozen NF-k layer :class:`QuantizedLinear`, peft LoRA on top of it
(:func:`apply_lq_lora`), and the storage it takes (:func:`storage_report`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict

import torch
from torch import nn

from ..quant import QuantizedTensor, storage_bits
from .config import LQLoRAConfig
from .decomposition import LQDecomposition

LORA_FACTOR_BITS = 16  # LoRA factors counted as bf16 in the "bits with LoRA" figures


def target_linears(
    model: nn.Module, target_modules: str | Iterable[str] = "all-linear"
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to decompose, by module path: every linear except the output head
    (``"all-linear"``), or those whose path is or ends with ``.NAME`` for a NAME in ``target_modules``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = None if target_modules == "all-linear" else [target_modules] if isinstance(target_modules, str) else list(target_modules)  # fmt: skip
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if names is None:
            if isinstance(module, nn.Linear) and module is not head:
                found[path] = module
            continue
        if any(path == t or path.endswith("." + t) for t in names):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target module {path!r} is a {type(module).__name__}, not nn.Linear")
            found[path] = module
    if not found:
        raise ValueError(f"no nn.Linear layer matches target modules {target_modules!r}")
    return found


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """A float tensor reinterpreted as integers of its width, so that ``model.to(dtype)`` leaves it alone."""
    return (
        t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])
        if t.is_floating_point()
        else t
    )


class _DequantizedLinear(torch.autograd.Function):
    """``x·Qᵀ`` with ``Q`` dequantized in forward and again in backward, so no dense copy of ``Q`` is kept
    between them (the frozen ``Q`` gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return nn.functional.linear(x.to(dtype), layer.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.input_dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer ``y = x·Q̂ᵀ + b`` whose weight lives in NF-k storage (buffers only, no
    parameters) and is dequantized on the fly, on whatever device the buffers are. Float scales are kept as
    same-width integer views so that ``model.to(dtype)`` cannot round them."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(quantized.shape) != 2:
            raise ValueError(f"QuantizedLinear needs a 2-D weight, got shape {quantized.shape}")
        self.out_features, self.in_features = quantized.shape
        self.config = quantized.config
        self._dtypes = {name: t.dtype for name, t in quantized.tensors().items()}
        for name, t in quantized.tensors().items():
            self.register_buffer(f"q_{name}", _bits_view(t.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def quantized(self) -> QuantizedTensor:
        tensors = {name: getattr(self, f"q_{name}").view(dtype) for name, dtype in self._dtypes.items()}
        return QuantizedTensor.from_tensors(tensors, (self.out_features, self.in_features), self.config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.config.name}"


def apply_lq_lora(
    model: nn.Module,
    decompositions: dict[str, LQDecomposition],
    settings: LQLoRAConfig,
    base_model: str | None = None,
):
    """peft LoRA on the decomposed layers, their base weights replaced by :class:`QuantizedLinear` ``Q``
    and (``init="lq"``) ``A = L2/√s``, ``B = L1/√s`` so that ``s·B·A = L1·L2``; ``init="zero"`` keeps peft's
    initialisation (``B = 0``). Returns the peft model (only ``A``, ``B`` trainable)."""
    from peft import LoraConfig, get_peft_model  # optional dependency (lorite[peft]), slow to import

    settings.validate()
    names = list(decompositions)
    lora = LoraConfig(
        r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
        target_modules=names, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    root = model.get_base_model()
    root_scale = math.sqrt(settings.scaling)
    with torch.no_grad():
        for name, decomposition in decompositions.items():
            layer = root.get_submodule(name)
            base = layer.base_layer
            device = base.weight.device
            layer.base_layer = QuantizedLinear(decomposition.quantized.to(device), base.bias)
            if settings.init == "lq":
                if decomposition.L1 is None or decomposition.L1.shape[1] != settings.rank:
                    raise ValueError(f"{name}: the decomposition has no rank-{settings.rank} factors")
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                A.copy_(decomposition.L2.to(A) / root_scale)  # type: ignore[union-attr]
                B.copy_(decomposition.L1.to(B) / root_scale)  # type: ignore[union-attr]
    model.lq_lora_info = {"base_model": base_model, "settings": asdict(settings)}
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`QuantizedLinear` of a (peft) model, keyed by the path of the layer it replaced in the
    underlying transformers model (``model.layers.0.self_attn.q_proj``)."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        path.removesuffix(".base_layer"): module
        for path, module in root.named_modules()
        if isinstance(module, QuantizedLinear)
    }


def storage_report(model: nn.Module) -> dict[str, float]:
    """Bits per parameter of the quantized layers: ``Q`` alone (exact), and with the LoRA factors counted
    at 16 bits each."""
    layers = quantized_layers(model)
    numel = sum(m.in_features * m.out_features for m in layers.values())
    q_bits = sum(storage_bits(m.in_features * m.out_features, m.config) for m in layers.values())
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    return {
        "quantized_parameters": numel,
        "bits_per_param": q_bits / numel if numel else 0.0,
        "bits_per_param_with_lora": (q_bits + LORA_FACTOR_BITS * lora) / numel if numel else 0.0,
        "lora_parameters": lora,
        "quantized_bytes": sum(m.quantized.nbytes for m in layers.values()),
    }
