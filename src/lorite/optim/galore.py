"""GaLore-AdamW: Adam on a rank-``r`` projection of each weight gradient (Zhao et al., arXiv 2403.03507).

For a weight ``W ∈ R^{m×n}`` with gradient ``G_t`` and projector ``P`` (refreshed from ``G_t`` every
``update_proj_gap`` = T steps, see :mod:`lorite.optim._lowrank`), at step ``t`` (1-based):

.. math::
    R_t = P^\\top G_t \\qquad M_t = \\beta_1 M_{t-1} + (1-\\beta_1) R_t \\qquad
    V_t = \\beta_2 V_{t-1} + (1-\\beta_2) R_t^2 \\qquad N_t = M_t / (\\sqrt{V_t} + \\epsilon)

    W_t = W_{t-1} - \\eta_t\\,\\alpha\\,P N_t, \\qquad \\eta_t = \\mathrm{lr}\\,
    \\sqrt{1-\\beta_2^t} / (1-\\beta_1^t), \\qquad W_t \\leftarrow W_t - \\mathrm{lr}\\cdot\\lambda\\,W_t

with ``α`` = ``scale``, ``λ`` = ``weight_decay`` (HF-AdamW style: decay of the already-updated weight),
``ε`` = ``eps`` outside the bias correction (folded into the step size). The moments are *not* reset when
the subspace is refreshed (``reset_moments=True`` zeroes them); the first refresh is on the first step.
Parameters of groups without a ``rank`` key get AdamW (``torch.optim.adam``, fused on CUDA).

Speed: projected parameters of one shape (and group, dtype, device, step count) are stacked into
``(B, m, n)`` chunks; each step is a handful of batched kernels per chunk (``bmm`` projections, the Adam
moments on the stacked ``r × kept`` state, one ``_foreach_sub_`` into the weights), with no host
synchronisation: step counts live on the CPU (like torch's Adam), the lr may be a tensor. The per-parameter
state tensors are views of the chunk's stacked state, so nothing is copied between the two.

State per projected parameter (tensors only, ``torch.load(weights_only=True)``-loadable): ``step`` (CPU),
``exp_avg``/``exp_avg_sq`` of shape ``(r, kept)`` (``r × max(m, n)`` for ``proj_type="std"``), ``proj``
(``k × r`` orthonormal basis; plus ``proj_right`` for ``"full"``), fp32 at least whatever the parameter's
dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ._adam import adamw_group_step
from ._linalg import compute_dtype
from ._lowrank import PROJ_TYPES, SVD_METHODS, LowRankProjector


@dataclass
class _Chunk:
    """Same-shape projected parameters stepped together; ``storage`` holds their stacked state."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    projector: LowRankProjector
    storage: dict[str, torch.Tensor]
    marker: torch.Tensor  # the view handed to state[params[0]]["exp_avg"]; detects replaced state

    @property
    def bases(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.storage.items() if k.startswith("proj")}


def select_projected_parameters(
    model: nn.Module, target_modules: Iterable[str] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``model``'s trainable parameters into (projected, AdamW).

    Projected: the 2-D weights of ``nn.Linear`` modules whose qualified name contains one of
    ``target_modules`` (default ``("attn", "mlp")``, GaLore's ``torchrun_main.py``). On a peft model
    (``model.peft_config`` exists) the default is every trainable ``nn.Linear`` weight — the LoRA factors
    (and Linear ``modules_to_save``): that is what Fira's ``fine_tuning/ft_fira.sh`` does in effect (its
    name list also matches the ``lora_A``/``lora_B`` Linear modules, and the frozen base weights get no
    gradient). Everything else trainable goes to AdamW.
    """
    is_peft = hasattr(model, "peft_config")
    targets = tuple(target_modules) if target_modules is not None else (None if is_peft else ("attn", "mlp"))
    if isinstance(target_modules, str):
        raise TypeError("target_modules must be a list of name substrings, not a string")
    linear_weights: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (targets is None or any(t in name for t in targets)):
            linear_weights.add(id(module.weight))
    projected: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (projected if id(p) in linear_weights and p.dim() == 2 else rest).append(p)
    if not projected and not rest:
        raise ValueError("the model has no trainable parameters")
    if not projected and not is_peft:
        raise ValueError(
            f"no trainable nn.Linear weight has a name containing any of {list(targets or ())}; "
            "pass target_modules=[...] naming the layers to project"
        )
    return projected, rest


def _check_number(group: dict[str, Any], key: str, where: str, low: float, integer: bool = False) -> None:
    value = group[key]
    if isinstance(value, torch.Tensor):
        value = float(value.detach().cpu()) if value.numel() == 1 else math.nan
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where}: {key} must be {kind} >= {low}, got {group[key]!r}")


class GaLoreAdamW(torch.optim.Optimizer):
    """GaLore with Adam (arXiv 2403.03507), see the module docstring for the update.

    Args:
        params: tensors or param-group dicts; groups with a ``rank`` key are projected (their parameters
            must be 2-D), the others get AdamW. Missing projection keys take :attr:`projection_defaults`:
            ``rank=128``, ``update_proj_gap=200``, ``scale=0.25``, ``proj_type="std"``,
            ``svd="subspace"``, ``svd_iters=2``, ``reset_moments=False``.
        lr, betas, eps, weight_decay: as GaLore's ``GaLoreAdamW`` (defaults 1e-3, (0.9, 0.999), 1e-6, 0).
        max_chunk_numel: at most this many weight entries are stacked per batched chunk (bounds the
            temporary ``(B, m, n)`` copies; default 2**26).

    Build it over a model with :meth:`from_model` (``lorite.optim.create("galore_adamw", model, ...)``).
    """

    projection_defaults: ClassVar[dict[str, Any]] = {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "svd": "subspace",
        "svd_iters": 2,
        "reset_moments": False,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        max_chunk_numel: int = 2**26,
    ) -> None:
        self.max_chunk_numel = int(max_chunk_numel)
        self._chunks: list[_Chunk] = []
        self._chunk_key: tuple | None = None
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        lr: float | torch.Tensor = 1e-3,
        *,
        target_modules: Iterable[str] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_chunk_numel: int = 2**26,
        **projection: Any,
    ) -> GaLoreAdamW:
        """Project the weights :func:`select_projected_parameters` picks; AdamW for the rest (one optimizer).

        ``projection`` holds the projected group's keys (``rank``, ``update_proj_gap``, ``scale``, …);
        unknown keys raise ``TypeError``.
        """
        projection = cls._normalise_projection_keys(dict(projection), f"{cls.__name__}.from_model")
        unknown = set(projection) - set(cls.projection_defaults)
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown hyperparameters {sorted(unknown)}")
        projected, rest = select_projected_parameters(model, target_modules)
        groups: list[dict[str, Any]] = []
        if projected:
            groups.append({"params": projected, **cls.projection_defaults, **projection})
        if rest:
            groups.append({"params": rest})
        return cls(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_chunk_numel=max_chunk_numel
        )

    @classmethod
    def _normalise_projection_keys(cls, group: dict[str, Any], where: str) -> dict[str, Any]:
        """Subclass hook for key aliases (Fira's ``scale`` → ``alpha``)."""
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if isinstance(group.get("params"), torch.Tensor):
            group["params"] = [group["params"]]
        group["params"] = list(group["params"])
        where = f"{type(self).__name__} param group {len(self.param_groups)}"
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: params must be tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(f"{where}: complex parameters are not supported")
        if "rank" in group:
            group = self._normalise_projection_keys(group, where)
            for key, value in self.projection_defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"{where}: a projected group (it has 'rank') holds only 2-D weights; got a "
                        f"parameter of shape {tuple(p.shape)} (put it in a group without 'rank' for AdamW)"
                    )
            self._check_projection_group(group, where)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        _check_number(group, "lr", where, 0.0)
        _check_number(group, "eps", where, 0.0)
        _check_number(group, "weight_decay", where, 0.0)
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"{where}: betas must be two values in [0, 1), got {betas}")
        self._chunk_key = None
        super().add_param_group(group)

    def _check_projection_group(self, group: dict[str, Any], where: str) -> None:
        _check_number(group, "rank", where, 1, integer=True)
        _check_number(group, "update_proj_gap", where, 1, integer=True)
        _check_number(group, "svd_iters", where, 1, integer=True)
        _check_number(group, self._scale_key, where, 0.0)
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{where}: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
        if group["svd"] not in SVD_METHODS:
            raise ValueError(f"{where}: svd must be one of {SVD_METHODS}, got {group['svd']!r}")
        if not isinstance(group["reset_moments"], bool):
            raise ValueError(f"{where}: reset_moments must be True or False, got {group['reset_moments']!r}")

    #: the group key of the back-projection scale α (Fira calls it ``alpha``)
    _scale_key: ClassVar[str] = "scale"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_chunk_numel", 2**26)
        self._chunks, self._chunk_key = [], None

    # ------------------------------------------------------------------ state layout
    def _projector(self, group: dict[str, Any], shape: torch.Size) -> LowRankProjector:
        return LowRankProjector(
            (shape[0], shape[1]), group["rank"], group["proj_type"], group["svd"], group["svd_iters"]
        )

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        projector = self._projector(group, p.shape)
        dtype = compute_dtype(p.dtype)
        state = {"step": torch.zeros((), dtype=torch.float32)}
        state["exp_avg"] = torch.zeros(projector.moment_shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(projector.moment_shape, dtype=dtype, device=p.device)
        for key, basis in projector.new_bases(1, p.device, dtype).items():
            state[key] = basis[0]
        state.update(self._extra_state(p, dtype))
        return state

    def _extra_state(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Subclass hook: more per-parameter state (Fira's limiter norm)."""
        return {}

    def _prepare_chunks(self) -> list[_Chunk]:
        """The stacked chunks of this step's projected parameters (with grads); rebuilt only when the set of
        parameters with gradients changes or the state was replaced (``load_state_dict``)."""
        key = tuple(
            (index, tuple(id(p) for p in group["params"] if p.grad is not None))
            for index, group in enumerate(self.param_groups)
            if "rank" in group
        )
        if key == self._chunk_key and all(
            self.state.get(c.params[0], {}).get("exp_avg") is c.marker for c in self._chunks
        ):
            return self._chunks
        chunks: list[_Chunk] = []
        for index, group in enumerate(self.param_groups):
            if "rank" not in group:
                continue
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__}: sparse gradients are not supported")
                if not self.state.get(p):
                    self.state[p] = self._init_state(p, group)
                bucket = (tuple(p.shape), p.dtype, p.device, int(self.state[p]["step"]))
                buckets.setdefault(bucket, []).append(p)
            for (shape, *_), params in buckets.items():
                per_chunk = max(1, self.max_chunk_numel // max(1, shape[0] * shape[1]))
                per_chunk = math.ceil(len(params) / math.ceil(len(params) / per_chunk))  # even sizes
                for start in range(0, len(params), per_chunk):
                    chunks.append(self._make_chunk(group, index, params[start : start + per_chunk]))
        self._chunks, self._chunk_key = chunks, key
        return chunks

    def _make_chunk(self, group: dict[str, Any], index: int, params: list[torch.Tensor]) -> _Chunk:
        projector = self._projector(group, params[0].shape)
        expected = {"exp_avg": projector.moment_shape, "exp_avg_sq": projector.moment_shape}
        expected.update(projector.basis_shapes)
        names = list(self.state[params[0]])
        for p in params:
            state = self.state[p]
            if list(state) != names:
                raise ValueError(f"param group {index}: inconsistent optimizer state keys {sorted(state)}")
            for key, shape in expected.items():
                if key not in state or tuple(state[key].shape) != tuple(shape):
                    found = tuple(state[key].shape) if key in state else "missing"
                    raise ValueError(
                        f"param group {index}: state {key!r} of a {tuple(p.shape)} weight is {found}, but "
                        f"rank={group['rank']}, proj_type={group['proj_type']!r} need {tuple(shape)} "
                        "(was the checkpoint saved with other projection settings?)"
                    )
        storage = {name: torch.stack([self.state[p][name] for p in params]) for name in names}
        for i, p in enumerate(params):
            self.state[p] = {name: storage[name][i] for name in names}
        marker = self.state[params[0]]["exp_avg"]
        return _Chunk(group=group, params=params, projector=projector, storage=storage, marker=marker)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for chunk in self._prepare_chunks():
            self._step_chunk(chunk)
        for group in self.param_groups:
            if "rank" not in group:
                self._step_adamw(group)
        return loss

    def _step_chunk(self, chunk: _Chunk) -> None:
        group, storage, projector = chunk.group, chunk.storage, chunk.projector
        t = int(storage["step"][0])  # a CPU tensor: no device synchronisation
        dtype = storage["exp_avg"].dtype
        G = torch.stack([p.grad for p in chunk.params])  # our own copy: Fira overwrites it in place
        if G.dtype != dtype:
            G = G.to(dtype)
        if t % int(group["update_proj_gap"]) == 0:
            projector.refresh(G, chunk.bases, first=t == 0, seed=t)
            if group["reset_moments"] and t > 0:
                storage["exp_avg"].zero_()
                storage["exp_avg_sq"].zero_()
        storage["step"].add_(1)
        R = projector.project(G, chunk.bases)
        direction, step_size = self._inner_rule(group, storage, R, t + 1)
        update = self._update(chunk, G, R, direction, step_size)
        self._apply(chunk.params, update, group)

    def _inner_rule(
        self, group: dict[str, Any], storage: dict[str, torch.Tensor], R: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Adam on the projected gradient: returns ``N = M/(√V + ε)`` and ``η_t = lr·√(1−β2^t)/(1−β1^t)``.

        The optimizer's inner rule; the tests replace it by the identity (GaLore + SGD = SGD at full rank).
        """
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = storage["exp_avg"], storage["exp_avg_sq"]
        exp_avg.lerp_(R, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        direction = exp_avg_sq.sqrt().add_(group["eps"])
        torch.div(exp_avg, direction, out=direction)
        step_size = group["lr"] * (math.sqrt(1 - beta2**t) / (1 - beta1**t))
        return direction, step_size

    def _update(
        self,
        chunk: _Chunk,
        G: torch.Tensor,
        R: torch.Tensor,
        direction: torch.Tensor,
        step_size: float | torch.Tensor,
    ) -> torch.Tensor:
        """The ``(B, m, n)`` stack subtracted from the weights: ``η_t·α·P N``."""
        direction.mul_(step_size * chunk.group["scale"])
        return chunk.projector.project_back(direction, chunk.bases)

    @staticmethod
    def _apply(params: list[torch.Tensor], update: torch.Tensor, group: dict[str, Any]) -> None:
        if update.dtype != params[0].dtype:
            update = update.to(params[0].dtype)
        torch._foreach_sub_(params, list(update.unbind(0)))
        if group["weight_decay"]:
            decay = 1 - group["lr"] * group["weight_decay"]
            if isinstance(decay, torch.Tensor):
                decay = decay.to(params[0].device)
            torch._foreach_mul_(params, decay)

    def _step_adamw(self, group: dict[str, Any]) -> None:
        """Groups without ``rank``: torch's own AdamW (fused on CUDA)."""
        adamw_group_step(self.state, group, type(self).__name__)

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep projected state in fp32 (at least) and its step counts on the CPU.

        torch casts floating state to the parameter's dtype (bf16 weights would get bf16 moments and
        bases); projected state is restored in ``promote_types(param.dtype, float32)``, as a copy (as
        :meth:`lorite.optim._base.PairOptimizer.load_state_dict`: never sharing the given tensors).
        """
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        self._chunks, self._chunk_key = [], None
        for group, saved_group in zip(self.param_groups, saved_groups):
            if "rank" not in group:
                continue
            for saved_id, p in zip(saved_group["params"], group["params"]):
                saved = saved_state.get(saved_id)
                if not saved:
                    continue
                dtype = compute_dtype(p.dtype)
                self.state[p] = {
                    key: value.to(device="cpu", dtype=torch.float32, copy=True)
                    if key == "step"
                    else value.to(device=p.device, dtype=dtype, copy=True)
                    for key, value in saved.items()
                }
