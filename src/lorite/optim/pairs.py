"""Discovery and validation of LoRA factor pairs, by module, never by parameter order.

A LoRA layer adds ``s · B · A`` to a frozen weight ``W0``. In peft's orientation

* ``A`` (``lora_A[adapter].weight``) is ``r × n`` — for Conv LoRA ``r × in × k…``, flattened to ``r × (in·k…)``;
* ``B`` (``lora_B[adapter].weight``) is ``m × r`` — for Conv LoRA ``out × r × 1…``: its rank axis is dim 1;
* embedding LoRA keeps raw parameters ``lora_embedding_A[adapter]`` (``r × vocab``) and
  ``lora_embedding_B[adapter]`` (``dim × r``); the layer uses them transposed, but ``B·A`` is still
  the (transposed) weight delta, so they pair exactly like a linear layer;
* ``s`` is ``scaling[adapter]`` (``α/r``, or ``α/√r`` with rsLoRA).

So for every pair the rank is ``A.shape[0] == B.shape[1]``, and the optimizers in :mod:`lorite.optim`
work on the 2-D views ``A.reshape(r, -1)`` and ``B.reshape(m, r)``.

Pairing order-based (``zip(params[::2], params[1::2])``, as pytorch-optimizer and the LoRA-RITE reference
do) silently mis-pairs under DoRA magnitudes, ``modules_to_save``, several adapters or biases. Here every
``LoraLayer``-like module is visited and ``lora_A[name]`` is matched to ``lora_B[name]`` of *the same*
module. peft is never imported: modules are recognised by their attributes, so this file needs torch alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_ENGINES = (
    "single device, DDP (torch DistributedDataParallel, accelerate MULTI_GPU), FSDP2 (fully_shard, accelerate "
    "fsdp_version 2)"
)


@dataclass(frozen=True)
class LoraPair:
    """One LoRA factor pair ``(A, B)`` of one adapter of one layer.

    Attributes:
        name: ``"<module path>[<adapter>]"``, used in messages.
        A: the down-projection, rank on dim 0 (``r × n`` or ``r × in × k…``).
        B: the up-projection, rank on dim 1 (``m × r`` or ``out × r × 1…``).
        scaling: the layer's ``s`` in ``W = W0 + s·B·A`` (``α/r``; ``α/√r`` with rsLoRA).
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as a 2-D ``m × n`` matrix (the weight change this pair contributes)."""
        m = self.B.shape[0]
        return self.scaling * (self.B.reshape(m, self.rank) @ self.A.reshape(self.rank, -1))


@dataclass(frozen=True)
class UnpairedParameter:
    """A trainable parameter that belongs to no pair, and why (e.g. ``"DoRA magnitude"``)."""

    name: str
    param: torch.Tensor
    reason: str


@dataclass(frozen=True)
class PairScan:
    """Result of :func:`find_lora_pairs`: the pairs, and every other trainable parameter."""

    pairs: list[LoraPair]
    unpaired: list[UnpairedParameter]


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "lora_B", None), nn.ModuleDict
    )


def _scaling(module: nn.Module, adapter: str, rank: int) -> float:
    scaling = getattr(module, "scaling", {})
    if isinstance(scaling, dict) and adapter in scaling:
        return float(scaling[adapter])
    alpha = getattr(module, "lora_alpha", {}).get(adapter, rank)
    return float(alpha) / rank


def _pair_problem(A: torch.Tensor, B: torch.Tensor) -> str | None:
    """Why (A, B) cannot be treated as one rank-r pair, or None if it can."""
    if A.dim() < 2 or B.dim() < 2:
        return "not 2-D (flattened parameters)"
    if A.shape[0] != B.shape[1]:
        return f"rank mismatch: A has rank {A.shape[0]} on dim 0, B has {B.shape[1]} on dim 1"
    if any(size != 1 for size in B.shape[2:]):
        return f"B of shape {tuple(B.shape)} has a spatial kernel; only 1×1 up-projections pair"
    return None


def find_lora_pairs(model: nn.Module, adapter_names: Iterable[str] | None = None) -> PairScan:
    """Find every trainable LoRA pair of ``model``, by module and adapter name.

    Handles several adapters per layer, DoRA (the magnitude vector is unpaired), ``modules_to_save``
    copies (unpaired), embedding LoRA, Conv LoRA (B's rank on dim 1), LoRA biases (unpaired) and frozen
    adapters (skipped: neither factor requires grad). MoE ``target_parameters`` layers, whose factors hold
    ``E`` rank-r blocks in one ``r·E`` matrix, and grouped Conv LoRA are left unpaired rather than treated
    as one rank-``r·E`` pair.

    Args:
        model: a peft model, or any module whose LoRA layers follow peft's layout.
        adapter_names: restrict to these adapters (default: all).

    Returns:
        PairScan: ``pairs`` in module order, and ``unpaired`` — every other parameter with
        ``requires_grad``, with the reason it is not in a pair.
    """
    wanted = None if adapter_names is None else set(adapter_names)
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    pairs: list[LoraPair] = []
    unpaired: list[UnpairedParameter] = []
    claimed: dict[int, str] = {}  # id(param) -> pair name, to catch factors shared across pairs

    def claim(param: torch.Tensor, reason: str) -> None:
        if id(param) not in claimed and param.requires_grad:
            claimed[id(param)] = reason
            unpaired.append(UnpairedParameter(param_names.get(id(param), "?"), param, reason))

    for module_name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        candidates: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []
        for adapter, a_mod in module.lora_A.items():
            if adapter in module.lora_B:
                b_mod = module.lora_B[adapter]
                kind = "conv" if a_mod.weight.dim() > 2 else "linear"
                candidates.append((adapter, a_mod.weight, b_mod.weight, kind))
                if getattr(b_mod, "bias", None) is not None:
                    claim(b_mod.bias, "LoRA bias")
        emb_A = getattr(module, "lora_embedding_A", None)
        emb_B = getattr(module, "lora_embedding_B", None)
        if isinstance(emb_A, nn.ParameterDict) and isinstance(emb_B, nn.ParameterDict):
            for adapter, A in emb_A.items():
                if adapter in emb_B:
                    candidates.append((adapter, A, emb_B[adapter], "embedding"))
        num_experts = getattr(module, "num_experts", 1)
        for adapter, A, B, kind in candidates:
            if wanted is not None and adapter not in wanted:
                continue
            name = f"{module_name}[{adapter}]"
            if not A.requires_grad and not B.requires_grad:
                continue  # a frozen adapter: nothing to optimise
            if not (A.requires_grad and B.requires_grad):
                claim(A, "one factor of this pair is frozen")
                claim(B, "one factor of this pair is frozen")
                continue
            if num_experts > 1:
                claim(A, f"MoE LoRA: {num_experts} rank blocks in one factor")
                claim(B, f"MoE LoRA: {num_experts} rank blocks in one factor")
                continue
            problem = _pair_problem(A, B)
            if problem is not None:
                claim(A, problem)
                claim(B, problem)
                continue
            if id(A) in claimed or id(B) in claimed:
                if claimed.get(id(A)) == claimed.get(id(B)) and claimed.get(id(A)) is not None:
                    continue  # the same tied pair reached again through another module
                raise ValueError(
                    f"LoRA pair {name} shares a factor with {claimed.get(id(A)) or claimed.get(id(B))}; "
                    "a factor can belong to one pair only"
                )
            claimed[id(A)] = claimed[id(B)] = name
            pairs.append(LoraPair(name, A, B, _scaling(module, adapter, A.shape[0]), kind))
        # DoRA magnitudes and anything else the layer trains
        for attr in ("lora_magnitude_vector",):
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.Module):
                for p in holder.parameters():
                    claim(p, "DoRA magnitude")

    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in claimed:
            reason = "modules_to_save copy" if ".modules_to_save." in name else "not a LoRA factor"
            claim(p, reason)
    return PairScan(pairs, unpaired)


def validate_pair(A: torch.Tensor, B: torch.Tensor, where: str) -> None:
    """Raise a clear error if ``(A, B)`` cannot be optimised as one LoRA pair.

    ``where`` names the pair in the message (e.g. ``"param group 0, pair 3"``).
    """
    for label, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: factor {label} is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise TypeError(f"{where}: factor {label} is complex ({t.dtype}); LoRA factors must be real")
        if not t.is_floating_point():
            raise TypeError(
                f"{where}: factor {label} has dtype {t.dtype}; LoRA factors must be floating point"
            )
        if hasattr(t, "ds_shape") or hasattr(t, "ds_id"):
            raise ValueError(
                f"{where}: factor {label} is a DeepSpeed ZeRO partition; pair optimizers need whole 2-D "
                f"factors. Supported engines: {SUPPORTED_ENGINES}"
            )
        if t.dim() < 2:
            raise ValueError(
                f"{where}: factor {label} has shape {tuple(t.shape)}; pair optimizers need 2-D (or conv) "
                "LoRA factors. Flattened 1-D parameters come from FSDP1 or DeepSpeed ZeRO, which are not "
                f"supported. Supported engines: {SUPPORTED_ENGINES}"
            )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{where}: rank mismatch — A of shape {tuple(A.shape)} has rank {A.shape[0]} on dim 0 but "
            f"B of shape {tuple(B.shape)} has {B.shape[1]} on dim 1 (is the list ordered A, B, A, B, …?)"
        )
    if any(size != 1 for size in B.shape[2:]):
        raise ValueError(f"{where}: B of shape {tuple(B.shape)}: only 1×1 conv up-projections form a pair")
    if A.device != B.device:
        raise ValueError(f"{where}: A is on {A.device} but B is on {B.device}")


def tall_view(factor: torch.Tensor, is_A: bool) -> torch.Tensor:
    """The ``rows × r`` view of a factor: ``Aᵀ`` (``n × r``) for A, ``B`` (``m × r``) for B."""
    if is_A:
        return factor.reshape(factor.shape[0], -1).t()
    return factor.reshape(factor.shape[0], factor.shape[1])
