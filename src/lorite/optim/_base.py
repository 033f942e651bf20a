"""What every LoRA pair optimizer in lorite shares: param groups that hold pairs, the AdamW fallback
group, model discovery, the HF Trainer factory, fp32 state across ``load_state_dict``, and the
non-finite-gradient bookkeeping.

Param-group layout (everything lives *inside* ``param_groups``, so LR schedulers, ``state_dict`` and
accelerate's parameter swapping all see it):

* ``role="lora_pairs"``: ``params`` alternates factors ``[A0, B0, A1, B1, …]``; ``pair_names`` (optional)
  names each pair. The pairing is structural — it was established by module in :mod:`.pairs` or given
  explicitly as ``(A, B)`` tuples — and is validated (ranks, dimensions) when the group is added.
* ``role="adamw"``: parameters that belong to no pair (DoRA magnitudes, ``modules_to_save``, biases…),
  updated by torch's own AdamW (``torch.optim.adam.adam`` with decoupled weight decay).
"""

from __future__ import annotations

import abc
import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ._adam import adamw_group_step
from ._linalg import compute_dtype
from .pairs import find_lora_pairs, validate_pair

PAIRS = "lora_pairs"
ADAMW = "adamw"


def _is_pair_tuple(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item)


def as_param_groups(params: Any, optimizer_name: str) -> list[dict[str, Any]]:
    """Normalise the ``params`` argument of a pair optimizer into param-group dicts.

    Accepts an iterable of ``(A, B)`` tuples (one group) or of group dicts. A flat iterable of tensors —
    e.g. ``model.parameters()`` — is refused: pairing by order is exactly the bug this library avoids.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{optimizer_name}: params must be an iterable of (A, B) pairs, got a single tensor")
    items = list(params)
    if not items:
        raise ValueError(f"{optimizer_name} got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        return [dict(item) for item in items]
    if all(_is_pair_tuple(item) for item in items):
        flat: list[torch.Tensor] = []
        for index, item in enumerate(items):
            if len(item) != 2:
                raise ValueError(
                    f"{optimizer_name}: pair {index} has {len(item)} factors; each pair is exactly (A, B)"
                )
            flat.extend(item)
        return [{"params": flat}]
    if all(isinstance(item, torch.Tensor) for item in items):
        raise TypeError(
            f"{optimizer_name} got a flat list of {len(items)} tensors; it needs LoRA pairs. Use "
            f"{optimizer_name}.from_model(model, ...) (pairs found by module) or pass [(A, B), ...]"
        )
    raise TypeError(
        f"{optimizer_name}: params must be an iterable of (A, B) tuples or of param-group dicts, "
        f"got items of types {sorted({type(i).__name__ for i in items})}"
    )


def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
    lr = group["lr"]
    lr_value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
    if not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"{where}: invalid learning rate lr={lr_value}")
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}: a tensor lr must hold one value, got shape {tuple(lr.shape)}")
    betas = group.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"{where}: betas must be two values in [0, 1), got {betas}")
    for key in ("weight_decay", "eps"):
        if key in group and not float(group[key]) >= 0.0:
            raise ValueError(f"{where}: {key} must be >= 0, got {group[key]}")


class PairOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class of lorite's LoRA pair optimizers (see the module docstring for the group layout).

    Subclasses set :attr:`pair_defaults` (the hyperparameters of pair groups besides ``lr``) and implement
    :meth:`_step_pairs`. Bad input raises at construction, naming the group and pair.
    """

    #: Hyperparameters of ``lora_pairs`` groups besides ``lr``; subclasses override.
    pair_defaults: ClassVar[dict[str, Any]] = {}
    #: Whether the update is invariant to (A, B) -> (T⁻¹A, BT); such optimizers warn about raw clipping.
    transformation_invariant: ClassVar[bool] = False
    #: Pair-group state keys held in float64 whatever the parameter's dtype (load_state_dict keeps them so).
    float64_state_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor,
        pair_hparams: dict[str, Any],
        *,
        fallback_lr: float | torch.Tensor | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        fallback_weight_decay: float = 0.0,
    ) -> None:
        name = type(self).__name__
        unknown = set(pair_hparams) - set(self.pair_defaults)
        if unknown:
            raise TypeError(f"{name} got unknown hyperparameters {sorted(unknown)}")
        self._role_defaults = {
            PAIRS: {"lr": lr, **self.pair_defaults, **pair_hparams},
            ADAMW: {
                "lr": lr if fallback_lr is None else fallback_lr,
                "betas": tuple(fallback_betas),
                "eps": fallback_eps,
                "weight_decay": fallback_weight_decay,
            },
        }
        self._nonfinite_count: torch.Tensor | None = None
        self._nonfinite_warned = False
        self._nonfinite_probe: tuple[torch.Tensor, Any] | None = None
        #: Tensors describing the last step (e.g. the unmagnified gradient norm); read them only when
        #: needed — reading a CUDA tensor synchronises.
        self.diagnostics: dict[str, torch.Tensor] = {}
        super().__init__(as_param_groups(params, name), {"lr": lr})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        lr: float | torch.Tensor | None = None,
        *,
        strict: bool = False,
        adapter_names: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> PairOptimizer:
        """Build the optimizer over every trainable LoRA pair of ``model`` (a peft model).

        ``lr=None`` takes the optimizer's own default rate (its constructor's). Pairs are found by module
        (:func:`lorite.optim.pairs.find_lora_pairs`). Trainable parameters that belong to no pair go to an
        AdamW group in the same optimizer (``fallback_lr``, default ``lr``; ``fallback_betas``,
        ``fallback_eps``, ``fallback_weight_decay``), or raise when ``strict=True``.
        """
        scan = find_lora_pairs(model, adapter_names)
        if not scan.pairs:
            message = (
                f"{cls.__name__}.from_model: the model has no trainable LoRA pairs (is it a peft model?)"
            )
            if strict or not scan.unpaired:
                raise ValueError(message)
            warnings.warn(message + "; every trainable parameter goes to the AdamW fallback", stacklevel=2)
        if strict and scan.unpaired:
            listed = ", ".join(f"{u.name} ({u.reason})" for u in scan.unpaired[:5])
            more = f" and {len(scan.unpaired) - 5} more" if len(scan.unpaired) > 5 else ""
            raise ValueError(
                f"{cls.__name__}.from_model(strict=True): trainable parameters outside any LoRA pair: "
                f"{listed}{more}"
            )
        groups: list[dict[str, Any]] = []
        if scan.pairs:
            groups.append(
                {
                    "params": [t for pair in scan.pairs for t in (pair.A, pair.B)],
                    "pair_names": [pair.name for pair in scan.pairs],
                    "role": PAIRS,
                }
            )
        if scan.unpaired:
            groups.append({"params": [u.param for u in scan.unpaired], "role": ADAMW})
        if lr is not None:
            kwargs["lr"] = lr
        return cls(groups, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if isinstance(group.get("params"), torch.Tensor):
            group["params"] = [group["params"]]
        group["params"] = list(group["params"])
        role = group.setdefault("role", PAIRS)
        if role not in self._role_defaults:
            raise ValueError(f"param group role must be {PAIRS!r} or {ADAMW!r}, got {role!r}")
        for key, value in self._role_defaults[role].items():
            group.setdefault(key, value)
        index = len(self.param_groups)
        where = f"{type(self).__name__} param group {index}"
        if role == PAIRS:
            self._validate_pair_group(group, where)
        else:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{where}: complex parameters are not supported")
        _check_hyperparameters(group, where)
        if role == PAIRS:
            self._check_pair_hyperparameters(group, where)
        super().add_param_group(group)

    def _validate_pair_group(self, group: dict[str, Any], where: str) -> None:
        params = group["params"]
        if len(params) % 2:
            raise ValueError(
                f"{where}: {len(params)} factors is an odd number; a pair group lists A0, B0, A1, B1, …"
            )
        names = group.get("pair_names")
        if names is not None and len(names) != len(params) // 2:
            raise ValueError(f"{where}: {len(names)} pair_names for {len(params) // 2} pairs")
        seen: set[int] = set()
        for j in range(0, len(params), 2):
            label = f"{where}, pair {j // 2}" + (f" ({names[j // 2]})" if names else "")
            validate_pair(params[j], params[j + 1], label)
            for t in (params[j], params[j + 1]):
                if id(t) in seen:
                    raise ValueError(f"{label}: a factor appears in more than one pair")
                seen.add(id(t))

    def _check_pair_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Subclass hook for method-specific checks of a group's hyperparameters."""

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pair_groups = [g for g in self.param_groups if g["role"] == PAIRS]
        if pair_groups:
            if any(_is_dtensor(p) for group in pair_groups for p in group["params"]):
                self._step_pairs_gathered(pair_groups)
            else:
                self._step_pairs(pair_groups)
        for group in self.param_groups:
            if group["role"] == ADAMW:
                self._step_adamw(group)
        return loss

    @abc.abstractmethod
    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        """Update every pair of ``groups`` (the ``lora_pairs`` groups); each optimizer implements this."""

    def _step_pairs_gathered(self, groups: list[dict[str, Any]]) -> None:
        """FSDP2: gather, compute, keep the local shard.

        Under ``fully_shard`` every factor is a DTensor sharded on dim 0 (A's rank axis is split, and with
        more ranks than the rank r some shards are empty), so no rank holds a whole pair. Each rank
        all-gathers the factors, their gradients and the factor-shaped state, runs the ordinary pair
        update on the full tensors (every rank computes the same numbers), then keeps its own shard of the
        new factors and of the factor-shaped state (first moments stay DTensors with the parameter's
        placements); r×r state is small and kept whole on every rank (replicated). The gathers are
        collectives, so every rank steps the same groups in the same order — as FSDP2 itself requires.
        """
        # lazy: only under FSDP2 (lorite.optim needs no more than torch's core)
        from torch.distributed.tensor import DTensor

        proxies: list[tuple[torch.Tensor, torch.Tensor]] = []
        full_groups = []
        for group in groups:
            params = []
            for p in group["params"]:
                if not isinstance(p, DTensor):
                    params.append(p)
                    continue
                full = p.detach().full_tensor()
                if p.grad is not None:
                    full.grad = p.grad.full_tensor()
                saved = self.state.pop(p, None)
                if saved:
                    self.state[full] = {
                        key: value.full_tensor() if isinstance(value, DTensor) else value
                        for key, value in saved.items()
                    }
                proxies.append((p, full))
                params.append(full)
            full_groups.append({**group, "params": params})
        try:
            self._step_pairs(full_groups)
        finally:
            for group, full_group in zip(groups, full_groups):  # group-level counters (e.g. Shampoo's)
                group.update({key: value for key, value in full_group.items() if key != "params"})
            for p, full in proxies:
                p.to_local().copy_(_local_shard(full, p.device_mesh, p.placements))
                state = self.state.pop(full, None)
                if state:
                    self.state[p] = {key: _shard_like(value, p) for key, value in state.items()}

    @staticmethod
    def pairs_with_grads(group: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The group's ``(A, B)`` pairs whose two gradients exist; pairs with a missing grad are skipped."""
        params = group["params"]
        out = []
        for A, B in zip(params[0::2], params[1::2]):
            if A.grad is None or B.grad is None:
                continue
            for t in (A, B):
                if t.grad.is_sparse:
                    raise TypeError("pair optimizers do not support sparse gradients (use dense LoRA grads)")
            out.append((A, B))
        return out

    def _step_adamw(self, group: dict[str, Any]) -> None:
        """The fallback group: torch's own AdamW (functional form, so its state lives in this optimizer)."""
        adamw_group_step(self.state, group, type(self).__name__)

    # ------------------------------------------------------------------ non-finite gradients
    @property
    def nonfinite_skips(self) -> int:
        """How many pair updates were skipped because a gradient held inf/nan (reading it synchronises)."""
        return 0 if self._nonfinite_count is None else int(self._nonfinite_count)

    def _record_nonfinite(self, skipped_pairs: torch.Tensor) -> None:
        """Add this step's count of skipped pairs, and warn once — without a host sync on CUDA.

        On CUDA the count is copied to pinned memory asynchronously and looked at on a later step once the
        copy has completed, so the warning may come a step late but the step never waits for the GPU.
        """
        counter = self._nonfinite_count
        if counter is None or counter.device != skipped_pairs.device:
            counter = self._nonfinite_count = torch.zeros((), dtype=torch.int64, device=skipped_pairs.device)
        # in place, not `+=` on the attribute: torch.compile (2.11) refuses rebinding the optimizer's
        # attributes inside a traced step
        counter.add_(skipped_pairs.to(torch.int64))
        # a traced step (torch.compile) keeps counting but leaves the host-side probe to eager steps
        if torch.compiler.is_compiling():
            return
        if skipped_pairs.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            self._probe_nonfinite()

    def _probe_nonfinite(self) -> None:
        """Warn (once) if pairs were skipped: at once on CPU; on CUDA from a pinned copy of the counter made
        on an earlier step, once the event after it has completed — the step never waits for the GPU."""
        if self._nonfinite_warned or self._nonfinite_count is None:
            return
        if self._nonfinite_count.device.type != "cuda":
            self._warn_nonfinite_if(int(self._nonfinite_count))
            return
        if self._nonfinite_probe is not None and self._nonfinite_probe[1].query():
            self._warn_nonfinite_if(int(self._nonfinite_probe[0]))
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(self._nonfinite_count, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._nonfinite_probe = (host, event)

    def _warn_nonfinite_if(self, count: int) -> None:
        if count > 0 and not self._nonfinite_warned:
            self._nonfinite_warned = True
            warnings.warn(
                f"{type(self).__name__}: skipped {count} LoRA pair update(s) whose gradients held inf/nan; "
                "those parameters and their state were left unchanged (see .nonfinite_skips)",
                RuntimeWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep pair-group state in its full precision.

        torch casts every floating state tensor to its parameter's dtype, which would turn the fp32
        moments of bf16 LoRA factors into bf16. Pair-group state is restored in
        ``promote_types(param.dtype, float32)`` (float64 for :attr:`float64_state_keys`) on the parameter's
        device, and always as a copy: torch keeps
        the given tensors where no cast is needed, so an optimizer loaded from another live one's
        ``state_dict()`` would share its state and see that optimizer's later steps (with LoRA-RITE, the
        twin of a 3-step run drifted by 5e-3 after 5 more steps; ``test_loaded_state_is_a_copy``).
        """
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, saved_groups):
            if group["role"] != PAIRS:
                continue
            for saved_id, p in zip(saved_group["params"], group["params"]):
                saved = saved_state.get(saved_id)
                if not saved:
                    continue
                dtype = compute_dtype(p.dtype)
                self.state[p] = {
                    key: value.to(
                        device=p.device,
                        dtype=torch.float64 if key in self.float64_state_keys else dtype,
                        copy=True,
                    )
                    if isinstance(value, torch.Tensor) and value.is_floating_point()
                    else value.clone()
                    if isinstance(value, torch.Tensor)
                    else value
                    for key, value in saved.items()
                }


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # no torch.distributed import unless one is there


def _local_shard(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's part of ``full`` laid out by ``placements`` on ``mesh`` (no communication: every rank
    holds the same ``full``)."""
    from torch.distributed.tensor import distribute_tensor  # lazy: only under FSDP2

    return distribute_tensor(full.detach(), mesh, placements, src_data_rank=None).to_local()


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """Optimizer state of a DTensor factor: factor-shaped tensors (first moments, in the factor's layout
    or transposed) become DTensors sharded like the factor; everything else (r×r statistics, step
    counters) stays a plain tensor, identical on every rank."""
    from torch.distributed.tensor import DTensor, Shard  # lazy: only under FSDP2

    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.numel() != param.numel():
        return value
    placements = param.placements
    if tuple(value.shape) != tuple(param.shape):
        if tuple(value.shape) != tuple(param.shape)[::-1] or param.dim() != 2:
            return value
        placements = tuple(Shard(1 - pl.dim) if isinstance(pl, Shard) else pl for pl in placements)
    local = _local_shard(value, param.device_mesh, placements).clone()  # not a view of the full tensor
    return DTensor.from_local(local, param.device_mesh, placements, shape=value.shape, stride=value.stride())


def _calling_trainer() -> Any | None:
    """The HF ``Trainer`` whose ``create_optimizer`` is calling a factory, if any: found by walking up the
    call stack (transformers hands a factory the model and the optimizer kwargs, not its arguments), so
    :mod:`lorite.optim` needs no transformers import."""
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        args = getattr(owner, "args", None)
        if "Trainer" in type(owner).__name__ and hasattr(args, "max_grad_norm"):
            return owner
    return None


#: ``TrainingArguments`` fields and the optimizer keyword each becomes (betas from the two Adam betas).
TRAINER_ARGUMENTS = {
    "lr": ("learning_rate",),
    "weight_decay": ("weight_decay",),
    "betas": ("adam_beta1", "adam_beta2"),
    "eps": ("adam_epsilon",),
    "fallback_betas": ("adam_beta1", "adam_beta2"),
    "fallback_eps": ("adam_epsilon",),
}


class PairOptimizerFactory:
    """HF Trainer factory: ``Trainer(optimizer_cls_and_kwargs=(Factory, {...}))``.

    transformers >= 5 calls ``Factory()(model, **kwargs)`` for classes that are not ``torch.optim.Optimizer``
    subclasses; this builds ``optimizer_cls.from_model(model, **kwargs)``. Like the Trainer's own
    optimizers, the hyperparameters come from its ``TrainingArguments`` unless ``kwargs`` gives them:
    ``learning_rate`` → ``lr``, ``weight_decay`` → ``weight_decay``, ``(adam_beta1, adam_beta2)`` →
    ``betas`` and ``adam_epsilon`` → ``eps`` where the optimizer has them (:attr:`trainer_keywords`), and
    the two Adam settings also → ``fallback_betas`` / ``fallback_eps`` of the AdamW group of unpaired
    parameters. That group keeps ``fallback_weight_decay=0`` (the Trainer does not decay biases and norms
    either). For transformation-invariant optimizers it warns when the Trainer clips raw gradients
    (``max_grad_norm`` must be 0).
    """

    optimizer_cls: ClassVar[type[PairOptimizer]]
    #: The optimizer keywords filled from ``TrainingArguments`` (see :data:`TRAINER_ARGUMENTS`); only those
    #: the optimizer takes (``lr``, the fallback's, and its :attr:`PairOptimizer.pair_defaults`) are used.
    trainer_keywords: ClassVar[tuple[str, ...]] = tuple(TRAINER_ARGUMENTS)

    def trainer_kwargs(self, args: Any) -> dict[str, Any]:
        """The optimizer keywords that ``args`` (a ``TrainingArguments``) gives this optimizer."""
        takes = {"lr", "fallback_betas", "fallback_eps", *self.optimizer_cls.pair_defaults}
        out = {}
        for keyword in self.trainer_keywords:
            fields = TRAINER_ARGUMENTS[keyword]
            if keyword in takes and all(hasattr(args, name) for name in fields):
                values = tuple(getattr(args, name) for name in fields)
                out[keyword] = values if len(values) > 1 else values[0]
        return out

    def __call__(self, model: nn.Module, **kwargs: Any) -> PairOptimizer:
        trainer = _calling_trainer()
        if trainer is not None:
            kwargs = {**self.trainer_kwargs(trainer.args), **kwargs}  # explicit kwargs win
            max_grad_norm = trainer.args.max_grad_norm
            if self.optimizer_cls.transformation_invariant and max_grad_norm:
                warnings.warn(
                    f"Trainer max_grad_norm={max_grad_norm}: clipping raw gradients breaks "
                    f"{self.optimizer_cls.__name__}'s transformation invariance. Set max_grad_norm=0 in "
                    "TrainingArguments; the optimizer clips its unmagnified gradient itself "
                    "(clip_unmagnified_grad).",
                    UserWarning,
                    stacklevel=2,
                )
        return self.optimizer_cls.from_model(model, **kwargs)
