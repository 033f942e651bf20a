r"""LoLDU: low-rank adaptation through a pivoted LU (Lower-Diag-Upper) factorisation, training only a
length-r diagonal per adapted matrix (Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
Decomposition for Parameter-Efficient Fine-Tuning", arXiv 2410.13618).

For a linear layer ``y = x Wᵀ + b`` with ``W ∈ R^{m×n}`` (``m = out_features``, ``n = in_features``,
``k = min(m, n)``) and rank ``r ≤ k``:

1. partial-pivoting LU ``W = P·L·U`` (``P`` a row permutation, ``L`` unit lower-trapezoidal ``m×k``, ``U``
   upper-trapezoidal ``k×n``); ``D = diag(U)``, ``Ũ = diag(D)⁻¹·U`` (unit diagonal);
2. the first ``r`` *pivots* (not the ``r`` largest directions in any norm — see
   :func:`ldu_factors`): ``B = P·L[:, :r]`` (``m×r``, buffer ``up``), ``Ũ_r = Ũ[:r]`` (``r×n``, buffer
   ``down``), ``D_r = D[:r]`` (buffer ``diagonal``);
3. the frozen weight becomes the residual ``W_res = W − σ₀·B·diag(D_r)·Ũ_r`` and the layer computes

   .. math::  y = x W_{res}^T + b + σ\,\big((x Ũ_r^T) ⊙ z\big)\,B^T,
              \qquad W_{eff} = W_{res} + σ\,B\,\mathrm{diag}(z)\,Ũ_r

   with the trainable diagonal ``z ∈ R^r`` (parameter ``z``) initialised to ``D_r``, so ``W_eff = W`` at
   initialisation, and ``σ = α/r`` (parameter ``scale``, ``α`` = ``LoLDUConfig.alpha``; frozen unless
   ``train_scale``; ``σ₀`` its initial value).

Trainable parameters: ``r`` per adapted matrix (``r + 1`` with ``train_scale``). The permutation is never a
dense ``m×m`` matrix and the forward never builds an ``m×n`` update: it costs ``O((m + n)·r)`` per token,
like a LoRA whose factors are frozen with a trainable diagonal between them. Only merging (and
:func:`unload_loldu`) forms ``B·diag(z)·Ũ_r``, once.

Fine-tuning with it (``lorite finetune --method loldu``) is :mod:`lorite.train.methods.loldu`.

Optimizers: LoLDU has no LoRA ``(A, B)`` pairs, so lorite's pair optimizers (``lora_rite``, ``lora_plus``,
``scaled_adam``, ``shampoo``, ``lamb``…) put every ``z`` into their AdamW fallback group and train it as
AdamW would (``fallback_lr`` defaults to ``lr``). Use ``adamw``; the others work but add nothing. Because
``σ`` multiplies every step of ``z`` and ``z`` starts at pivot-sized values, LoLDU wants learning rates
one to two orders of magnitude above LoRA's (σ = 1/r by default, as in the authors' code).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import atomic_directory

SELECTIONS = ("lu", "svd")
INIT_METHODS = ("lu", "uniform", "s_uniform", "normal", "s_normal", "constant", "ones", "zeros")
DECOMPOSE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
WEIGHTS_FILE = "loldu.safetensors"
CONFIG_FILE = "loldu_config.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ the factors
@dataclass(frozen=True)
class LDUFactors:
    """The leading rank-r block of ``W = P·L·diag(D)·Ũ`` in factored form (see the module docstring).

    Attributes:
        up: ``B = P·L[:, :r]`` (``m×r``): the permuted unit-lower columns.
        down: ``Ũ_r`` (``r×n``): unit-upper rows.
        diagonal: ``D_r`` (``r``): the first ``r`` pivots.
        pivot_rows: the original row index of each of the first ``r`` pivots (``int64``, ``r``): all
            that is kept of ``P``; empty for ``selection="svd"``.
    """

    up: torch.Tensor
    down: torch.Tensor
    diagonal: torch.Tensor
    pivot_rows: torch.Tensor


def ldu_factors(
    weight: torch.Tensor, rank: int, selection: str = "lu", dtype: torch.dtype = torch.float64
) -> LDUFactors:
    """The first ``rank`` pivots of the partial-pivoting LU of ``weight`` (``m×n``), or (``selection="svd"``,
    an ablation that is *not* the paper's method) the top ``rank`` singular triplets ``U_r, S_r, V_rᵀ``.

    The first ``r`` steps of partial-pivoting elimination only read the first ``r`` columns, so the ``r``
    pivots, ``L[:, :r]`` and ``U[:r, :r]`` are those of the LU of the ``m×r`` panel ``W[:, :r]``; the rest
    of the first ``r`` rows of ``U`` follows from ``(PᵀW)[:r] = L[:r, :r]·U[:r]``, one unit-triangular solve.
    Cost ``O(m r² + r² n)`` and memory ``O((m + n) r)``, against ``O(m n k)`` for the full factorisation
    (identical in exact arithmetic; the tests check it against ``torch.linalg.lu``). The factorisation
    runs in ``dtype`` (float64 by default: ``Ũ = diag(D)⁻¹U`` is ill-conditioned when a pivot is small).

    Raises:
        ValueError: ``rank`` outside ``[1, min(m, n)]``, a non-finite weight, an unknown ``selection``, or
            a zero pivot among the first ``rank`` (the first ``rank`` columns are linearly dependent).
    """
    if weight.dim() != 2:
        raise ValueError(f"LoLDU factors a 2-D weight, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n) = {min(m, n)}] for a {m}×{n} weight, got {rank}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    W = weight.detach()
    if not torch.isfinite(W).all():
        raise ValueError("the weight holds non-finite values")
    device = W.device
    if selection == "svd":
        left, singular, right = torch.linalg.svd(W.to(dtype), full_matrices=False)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return LDUFactors(left[:, :rank].contiguous(), right[:rank].contiguous(), singular[:rank], empty)

    # only the m×r panel and r rows of W are ever converted to `dtype`: no full-size copy
    panel, pivots = torch.linalg.lu_factor(W[:, :rank].to(dtype))  # packed L\U of the panel, LAPACK swaps
    # LAPACK's pivots are sequential swaps "row i <-> row pivots[i]" (1-based); replaying them on 0..m-1
    # gives perm with (PᵀW)[i] = W[perm[i]]. Only r swaps: a Python loop is fine.
    perm = list(range(m))
    for i, swap_with in enumerate(pivots.tolist()):
        perm[i], perm[swap_with - 1] = perm[swap_with - 1], perm[i]
    perm_t = torch.tensor(perm, dtype=torch.int64, device=device)
    lower = torch.tril(panel, diagonal=-1) + torch.eye(m, rank, dtype=dtype, device=device)  # L[:, :r]
    diagonal = torch.diagonal(panel[:rank, :rank]).clone()
    # a pivot below rounding level of W (in W's own precision) is a zero: the columns are dependent
    tolerance = torch.finfo(W.dtype).eps * float(W.abs().max())
    tiny = (diagonal.abs() <= tolerance).nonzero()
    if tiny.numel():
        i = int(tiny[0])
        raise ValueError(
            f"pivot {i} of the LU is numerically 0 (|D| = {abs(float(diagonal[i])):.2e}): the first {rank} "
            f"columns of the weight are linearly dependent; use a smaller rank or selection='svd'"
        )
    upper = torch.linalg.solve_triangular(
        lower[:rank], W[perm_t[:rank]].to(dtype), upper=False, unitriangular=True
    )  # U[:r] (r×n), diagonal D_r
    up = torch.empty_like(lower)
    up[perm_t] = lower  # B = P·L[:, :r]: row perm[i] of B is row i of L
    return LDUFactors(up, upper / diagonal[:, None], diagonal, perm_t[:rank].clone())


def initial_diagonal(method: str, diagonal: torch.Tensor) -> torch.Tensor:
    """``z`` at initialisation from the pivots ``D_r`` (``diagonal``); random methods draw from torch's
    global generator. "lu" (the paper's default) keeps ``W_eff = W``; every other method changes the
    initial function: "uniform" U(−|μ|/2, |μ|/2) with μ the mean of ``D_r``, "s_uniform" U(−1, 1),
    "normal" N(μ, std(D_r)), "s_normal" N(0, 1), "constant" μ, "ones", "zeros"."""
    if method not in INIT_METHODS:
        raise ValueError(f"init_method must be one of {INIT_METHODS}, got {method!r}")
    d = diagonal.detach()
    mean = float(d.mean())
    std = float(d.std()) if d.numel() > 1 else 0.0
    if method == "lu":
        return d.clone()
    if method == "uniform":
        return (torch.rand(d.shape, dtype=d.dtype) * 2 - 1).to(d.device) * (abs(mean) / 2)
    if method == "s_uniform":
        return (torch.rand(d.shape, dtype=d.dtype) * 2 - 1).to(d.device)
    if method == "normal":
        return (torch.randn(d.shape, dtype=d.dtype) * std + mean).to(d.device)
    if method == "s_normal":
        return torch.randn(d.shape, dtype=d.dtype).to(d.device)
    if method == "constant":
        return torch.full_like(d, mean)
    return torch.ones_like(d) if method == "ones" else torch.zeros_like(d)


# ------------------------------------------------------------------------------------------ the layer
class LoLDULinear(nn.Module):
    """An ``nn.Linear`` with a LoLDU adapter (math in the module docstring).

    ``base`` holds the frozen residual ``W_res`` (and bias); buffers ``up`` (``B``, ``m×r``), ``down``
    (``Ũ_r``, ``r×n``), ``diagonal`` (``D_r``), ``initial_scale`` (``σ₀``) and ``pivot_rows``; parameters
    ``z`` (``r``, trainable) and ``scale`` (``σ``, trainable only with ``train_scale``). Adapter
    parameters are float32 when the base weight is 16-bit (as peft does for LoRA).

    Args:
        base: the layer to adapt; its weight is overwritten in place with ``W_res``.
        rank: ``r``.
        alpha: ``σ₀ = alpha / rank``.
        init_method: see :func:`initial_diagonal`.
        train_scale: make ``σ`` trainable (one more parameter).
        selection: "lu" (the paper) or "svd" (ablation: top singular triplets with a trainable diagonal).
        decompose_dtype: precision of the factorisation; buffers are then cast to the weight's dtype.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float = 1.0,
        init_method: str = "lu",
        train_scale: bool = False,
        selection: str = "lu",
        decompose_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoLDULinear adapts nn.Linear layers, got {type(base).__name__}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive number, got {alpha}")
        factors = ldu_factors(base.weight, rank, selection, decompose_dtype)
        weight = base.weight
        dtype = weight.dtype
        param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        scale = alpha / rank
        with torch.no_grad():  # W_res = W − σ₀·B·diag(D_r)·Ũ_r, formed once in the factorisation's precision
            residual = torch.addmm(
                weight.to(decompose_dtype), factors.up * factors.diagonal, factors.down, alpha=-scale
            )
            weight.copy_(residual)
            del residual
        weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.base = base
        self.rank, self.alpha, self.init_method = rank, float(alpha), init_method
        self.selection, self.train_scale = selection, train_scale
        self.decompose_dtype = decompose_dtype
        self.register_buffer("up", factors.up.to(dtype))
        self.register_buffer("down", factors.down.to(dtype))
        self.register_buffer("diagonal", factors.diagonal.to(param_dtype))
        self.register_buffer("initial_scale", torch.tensor(scale, dtype=param_dtype, device=weight.device))
        self.register_buffer("pivot_rows", factors.pivot_rows)
        self.z = nn.Parameter(initial_diagonal(init_method, factors.diagonal).to(param_dtype))
        self.scale = nn.Parameter(self.initial_scale.clone(), requires_grad=train_scale)
        self.merged = False
        self.disabled = False  # the original W's function (σ₀, D_r in place of σ, z)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, selection={self.selection!r}, "
            f"init_method={self.init_method!r}, train_scale={self.train_scale}, merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged and not self.disabled:
            return out
        if self.merged:  # disabled while merged: take the merged update back out, put D_r in
            weights = self.initial_scale * self.diagonal - self.scale * self.z
        elif self.disabled:
            weights = self.initial_scale * self.diagonal
        else:
            weights = self.scale * self.z
        hidden = F.linear(x, self.down)  # x·Ũ_rᵀ: (…, r)
        # the diagonal is applied in the parameters' precision: under bf16 autocast, rounding z itself would
        # hide every update smaller than half a bf16 ulp of z
        hidden = (hidden.to(weights.dtype) * weights).to(hidden.dtype)
        return out + F.linear(hidden, self.up)

    def delta_weight(self, diagonal: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        """``σ·B·diag(z)·Ũ_r`` (``m×n``; or with the given ``diagonal``/``scale``). Builds a dense matrix:
        for merging and checks only, never called by :meth:`forward`."""
        z = self.z if diagonal is None else diagonal
        s = self.scale if scale is None else scale
        return ((self.up.to(z.dtype) * (s * z)) @ self.down.to(z.dtype)).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W_res + σ·B·diag(z)·Ũ_r``; the forward then is the plain linear layer."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W ← W − σ·B·diag(z)·Ũ_r``), up to floating-point rounding."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The weight before adaptation, ``W_res + σ₀·B·diag(D_r)·Ũ_r`` (up to rounding)."""
        weight = self.base.weight.clone()
        if self.merged:
            weight -= self.delta_weight()
        return weight + self.delta_weight(self.diagonal, self.initial_scale)


# ------------------------------------------------------------------------------------------ the model
@dataclass
class LoLDUConfig:
    """How :func:`apply_loldu` adapts a model.

    ``target_modules``: "all-linear" (every ``nn.Linear`` but the output layer, as peft) or module-name
    suffixes (``["q_proj", "v_proj"]``). ``alpha``: ``σ = alpha / rank``; the default 1 is the authors'
    (σ = 1/r). See :class:`LoLDULinear` for the rest.
    """

    rank: int = 16
    alpha: float = 1.0
    target_modules: str | list[str] = "all-linear"
    init_method: str = "lu"
    train_scale: bool = False
    selection: str = "lu"
    decompose_dtype: str = "float64"
    modules: list[str] = field(default_factory=list)  # exact names, set when loading a saved adapter

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoLDU rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoLDU alpha must be a positive number, got {self.alpha!r}")
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"LoLDU init_method must be one of {INIT_METHODS}, got {self.init_method!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"LoLDU selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.decompose_dtype not in DECOMPOSE_DTYPES:
            raise ValueError(
                f"LoLDU decompose_dtype must be one of {sorted(DECOMPOSE_DTYPES)}, got {self.decompose_dtype!r}"
            )
        targets = self.target_modules
        if not (targets == "all-linear" or (isinstance(targets, list) and targets and all(
            isinstance(t, str) and t for t in targets
        ))):  # fmt: skip
            raise ValueError(f"LoLDU target_modules must be 'all-linear' or a list of names, got {targets!r}")


def loldu_modules(model: nn.Module) -> dict[str, LoLDULinear]:
    """Every LoLDU layer of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoLDULinear)}


def _targets(model: nn.Module, config: LoLDUConfig) -> list[str]:
    if config.modules:
        found = dict(model.named_modules())
        missing = [name for name in config.modules if name not in found]
        if missing:
            raise ValueError(f"the model has no module {missing[0]!r} (named by the saved LoLDU adapter)")
        return list(config.modules)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if config.target_modules == "all-linear":
            if isinstance(module, nn.Linear) and module is not output and name.split(".")[-1] != "lm_head":
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in config.target_modules):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoLDU adapts nn.Linear layers; {name} is a {type(module).__name__}")
            names.append(name)
    if not names:
        raise ValueError(f"LoLDU target_modules {config.target_modules!r} match no linear layer of the model")
    return names


def apply_loldu(model: nn.Module, config: LoLDUConfig | None = None) -> nn.Module:
    """Replace the target layers of ``model`` by :class:`LoLDULinear` (in place) and freeze everything
    but the LoLDU diagonals (and scales with ``train_scale``). The model's function is unchanged when
    ``init_method="lu"``. Returns ``model``.

    Raises:
        ValueError: a bad config, a rank above a target layer's ``min(m, n)``, no matching layer, a model
            that already has LoLDU layers, or a zero pivot (named by layer).
        TypeError: a named target that is not an ``nn.Linear``.
    """
    config = config or LoLDUConfig()
    config.validate()
    if loldu_modules(model):
        raise ValueError("the model already has LoLDU layers; apply LoLDU once")
    names = _targets(model, config)
    for name in names:
        layer = model.get_submodule(name)
        if config.rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"LoLDU rank {config.rank} is larger than layer {name} "
                f"({layer.out_features} × {layer.in_features})"
            )
    if config.init_method != "lu":
        warnings.warn(
            f"LoLDU init_method={config.init_method!r} changes the model at initialisation (W_eff ≠ W); "
            "only 'lu' starts from the pretrained function",
            stacklevel=2,
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            adapted = LoLDULinear(
                getattr(parent, child), config.rank, config.alpha, config.init_method, config.train_scale,
                config.selection, DECOMPOSE_DTYPES[config.decompose_dtype],
            )  # fmt: skip
        except ValueError as error:
            raise ValueError(f"LoLDU on layer {name}: {error}") from error
        setattr(parent, child, adapted)
    return model


def loldu_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoLDU parameters (each ``z``, and ``scale`` where trainable)."""
    return [p for layer in loldu_modules(model).values() for p in (layer.z, layer.scale) if p.requires_grad]


def merge_loldu(model: nn.Module) -> None:
    """Merge every LoLDU layer (see :meth:`LoLDULinear.merge`)."""
    for layer in loldu_modules(model).values():
        layer.merge()


def unmerge_loldu(model: nn.Module) -> None:
    for layer in loldu_modules(model).values():
        layer.unmerge()


def set_loldu_enabled(model: nn.Module, enabled: bool) -> None:
    """Disabled, every LoLDU layer computes the *original* weight's function (not ``W_res``'s, as the
    authors' code does)."""
    for layer in loldu_modules(model).values():
        layer.disabled = not enabled


@torch.no_grad()
def unload_loldu(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain ``nn.Linear`` layers back: with the adaptation merged (``merge=True``) or with the
    original weights. Returns ``model``."""
    for name, layer in loldu_modules(model).items():
        weight = layer.original_weight() if not merge else None
        if merge:
            layer.merge()
        else:
            layer.base.weight.copy_(weight)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


def loldu_summary(model: nn.Module) -> dict[str, Any]:
    """Counts for reports: adapted matrices, trainable LoLDU parameters, frozen buffer elements (``B`` and
    ``Ũ_r``: ``r·(m + n)`` per matrix), and the smallest ``|D_r|`` (small pivots make ``Ũ_r`` large)."""
    layers = loldu_modules(model)
    if not layers:
        raise ValueError("the model has no LoLDU layers")
    return {
        "matrices": len(layers),
        "trainable_parameters": sum(p.numel() for p in loldu_parameters(model)),
        "buffer_elements": sum(layer.up.numel() + layer.down.numel() for layer in layers.values()),
        "min_abs_pivot": min(float(layer.diagonal.abs().min()) for layer in layers.values()),
        "ranks": sorted({layer.rank for layer in layers.values()}),
    }


# ------------------------------------------------------------------------------------------ save / load
def _layer_config(layers: dict[str, LoLDULinear]) -> dict[str, Any]:
    def settings(layer: LoLDULinear) -> tuple:
        return (layer.rank, layer.alpha, layer.init_method, layer.selection, layer.train_scale,
                layer.decompose_dtype)  # fmt: skip

    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if settings(layer) != settings(first):
            raise ValueError(f"LoLDU layer {name} has other settings than the first; save them apart")
    decompose_dtype = {v: k for k, v in DECOMPOSE_DTYPES.items()}[first.decompose_dtype]
    config = LoLDUConfig(
        rank=first.rank, alpha=first.alpha, init_method=first.init_method, train_scale=first.train_scale,
        selection=first.selection, decompose_dtype=decompose_dtype, modules=list(layers),
    )  # fmt: skip
    return {"format_version": FORMAT_VERSION, "method": "loldu", "arxiv": "2410.13618", **asdict(config)}


def save_loldu(model: nn.Module, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Write the adapter to ``directory`` atomically (replacing one there): ``loldu.safetensors`` with each
    layer's ``z``, ``scale`` and ``pivot_rows`` (``r`` pivots, to check the base model on load), and
    ``loldu_config.json``. ``B``, ``Ũ_r`` are not saved: :func:`load_loldu` recomputes them from the base
    model, so an adapter is ``r`` floats and ``r`` integers per matrix. ``state_dict``: the whole model's
    tensors by name, when the modules' own are sharded (FSDP2)."""
    from safetensors.torch import save_file  # optional dependency (lorite[peft])

    layers = loldu_modules(model)
    if not layers:
        raise ValueError("the model has no LoLDU layers to save")
    config = _layer_config(layers)
    tensors = {}
    for name, layer in layers.items():
        for key, own in (("z", layer.z), ("scale", layer.scale), ("pivot_rows", layer.pivot_rows)):
            value = state_dict.get(f"{name}.{key}", own) if state_dict is not None else own
            value = value.detach().cpu()
            tensors[f"{name}.{key}"] = (value.reshape(-1) if key == "scale" else value).contiguous()
            if key != "pivot_rows":
                tensors[f"{name}.{key}"] = tensors[f"{name}.{key}"].float()
    with atomic_directory(Path(directory)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "lorite-loldu"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return Path(directory)


def load_loldu(model: nn.Module, directory: str | Path) -> nn.Module:
    """Adapt ``model`` (the *base* model the adapter was trained on) with the LoLDU adapter saved in
    ``directory``: decompose again, check that the first ``r`` pivots are the saved ones, load ``z`` and
    ``scale``. Returns ``model``.

    Raises:
        FileNotFoundError: no adapter in ``directory``.
        ValueError: a malformed adapter, a model without the saved layers, or other pivots (another base
            model, or a near-tie that another device broke differently).
    """
    from safetensors.torch import load_file  # optional dependency (lorite[peft])

    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"no LoLDU adapter in {str(directory)!r} (expected {CONFIG_FILE}, {WEIGHTS_FILE})"
        )
    saved = json.loads((directory / CONFIG_FILE).read_text())
    if saved.get("method") != "loldu" or saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_FILE} is not a LoLDU adapter of format {FORMAT_VERSION}")
    fields = set(LoLDUConfig.__dataclass_fields__)
    config = LoLDUConfig(**{k: v for k, v in saved.items() if k in fields})
    if not config.modules:
        raise ValueError(f"{directory / CONFIG_FILE} names no modules")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    expected = {f"{name}.{key}" for name in config.modules for key in ("z", "scale", "pivot_rows")}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match its config (e.g. {odd[0]!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random init_method is overwritten below
        apply_loldu(model, config)
    with torch.no_grad():
        for name, layer in loldu_modules(model).items():
            pivots = tensors[f"{name}.pivot_rows"].to(layer.pivot_rows.device)
            if not torch.equal(pivots, layer.pivot_rows):
                raise ValueError(
                    f"LoLDU layer {name}: the base weight's pivots differ from the saved adapter's; is this "
                    "the model the adapter was trained on?"
                )
            layer.z.copy_(tensors[f"{name}.z"])
            layer.scale.copy_(tensors[f"{name}.scale"].reshape(()))
    return model
