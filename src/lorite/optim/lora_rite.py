"""LoRA-RITE (Yen et al., arXiv 2410.20625, ICLR 2025): the transformation-invariant LoRA optimizer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import _linalg
from ._base import PairOptimizer, PairOptimizerFactory
from .pairs import tall_view

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {
        "escape_mass": True,
        "normalize_rows": False,
        "eps": 0.0,
        "eps_root": 1e-12,
        "clip_unmagnified_grad": 0.0,
        "update_skipping": 0.0,
        "update_capping": 0.0,
    },
    "reference": {
        "escape_mass": False,
        "normalize_rows": True,
        "eps": 1e-6,
        "eps_root": 0.0,
        "clip_unmagnified_grad": 1.0,
        "update_skipping": 1.0,
        "update_capping": 0.0,
    },
}


@dataclass
class _Side:
    """One factor of every pair in a bucket, stacked as tall ``rows × r`` matrices.

    For A the tall view is ``Aᵀ`` (``n × r``), for B it is ``B`` (``m × r``). Filled phase by phase.
    """

    params: list[torch.Tensor]
    is_A: bool
    X: torch.Tensor  # (nb, rows, r) factor values, compute dtype
    G: torch.Tensor  # (nb, rows, r) gradients
    Q: torch.Tensor | None = None  # orthonormal basis of the factor's column space
    R: torch.Tensor | None = None  # (nb, r, r)
    R_pinv: torch.Tensor | None = None
    g_bar: torch.Tensor | None = None  # unmagnified gradient, in the partner's basis
    finite: torch.Tensor | None = None  # (nb,) gradient is finite
    P: torch.Tensor | None = None  # basis change of the partner, (nb, r, r)
    V_rotated: torch.Tensor | None = None
    rho: torch.Tensor | None = None
    V: torch.Tensor | None = None
    K: torch.Tensor | None = None  # (V + ρI)^{-1/2}
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # stacked previous state

    @property
    def rows(self) -> int:
        return self.X.shape[1]


@dataclass
class _Bucket:
    """Pairs of one param group with identical factor shapes, dtypes and device."""

    group: dict[str, Any]
    A: _Side
    B: _Side
    ok: torch.Tensor | None = None  # (nb,) pair's gradients are finite
    beta1_hat: torch.Tensor | None = None
    beta2_hat: torch.Tensor | None = None
    skipped_factors: torch.Tensor | None = None  # how many factors update skipping zeroed

    @property
    def sides(self) -> tuple[tuple[_Side, _Side], tuple[_Side, _Side]]:
        """``(side, partner)`` for both factors."""
        return ((self.A, self.B), (self.B, self.A))


_STATE_KEYS = ("step", "first_moment", "second_moment", "escaped_mass", "basis")


class LoRARite(PairOptimizer):
    r"""LoRA-RITE: Robust Invariant Transformation Equilibration for LoRA (Yen et al., arXiv 2410.20625,
    ICLR 2025).

    For a LoRA pair ``W = W0 + s·B·A`` (``A = lora_A.weight`` is ``r × n``, ``B = lora_B.weight`` is
    ``m × r``) LoRA-RITE preconditions each factor with an ``r × r`` matrix expressed in an orthonormal basis
    of the *other* factor, so that the change of ``B·A`` does not depend on how the product is factored:
    ``(A, B)`` and ``(T⁻¹A, B·T)`` — for any invertible ``T``, a scalar included — follow the same trajectory
    of ``W``.

    Math, for factor ``A`` (B is symmetric: swap A↔B, n↔m). ``Ā = Aᵀ`` is A's ``n × r`` tall view, ``∇A``
    its gradient, ``k`` the pair's step count (from 0), ``t`` the step:

    .. math::
        B &= Q_B R_B \qquad \bar A = Q_A R_A \qquad\text{(thin QR, every step)} \\
        \bar g_A &= (\nabla A)^\top R_B^{+}                      && \text{unmagnified gradient, } n\times r \\
        \hat\beta_i &= \beta_i (1-\beta_i^{k}) / (1-\beta_i^{k+1}) && \text{bias-corrected decay; 0 at } k=0 \\
        P_A &= Q_B^\top Q_B^{(t-1)}                              && \text{basis change, } r\times r \\
        \tilde V_A &= P_A V_A P_A^\top \\
        \rho_A &\leftarrow \hat\beta_2 \big(\rho_A + d_\lambda(V_A, \tilde V_A)\big)
            && d_\lambda = \max_i |\lambda^\uparrow_i(V_A) - \lambda^\uparrow_i(\tilde V_A)| \text{ (escaped mass)} \\
        V_A &\leftarrow \hat\beta_2 \tilde V_A + (1-\hat\beta_2)\, \bar g_A^\top \bar g_A / c \\
        S_A &= \bar g_A \big(\max(V_A, 0) + (\rho_A + \epsilon_{root}) I\big)^{-1/2}
            && \text{with } \epsilon \text{ added to each } \sqrt{\lambda} \\
        M_A &\leftarrow \hat\beta_1 M_A P_A^\top + (1-\hat\beta_1) S_A \\
        A &\leftarrow A - \eta\,\big(R_B^{+} M_A^\top + \lambda_{wd} A\big)

    Symbols and arguments: ``η`` = ``lr``; ``(β1, β2)`` = ``betas``; ``ε`` = ``eps`` (outside the square
    root); ``ε_root`` = ``eps_root`` (inside); ``λ_wd`` = ``weight_decay`` (decoupled); ``ρ`` is on with
    ``escape_mass=True``, else 0; ``c`` = the number of rows of the factor's tall view when
    ``normalize_rows=True``, else 1. ``R⁺`` is the pseudo-inverse, so peft's ``B = 0`` initialisation works:
    at the first step ``R_B = 0`` gives ``ḡ_A = 0`` and **only B moves**; A joins from step 2.

    Stabilisers from the authors' code, all transformation invariant because they act on unmagnified
    quantities: ``clip_unmagnified_grad`` (scale every ``ḡ`` so that their global norm over all pairs is at
    most this), ``update_skipping`` (zero a factor's ``ḡ`` when its RMS exceeds this), ``update_capping``
    (divide ``M`` by ``max(1, RMS(M)/cap)``). 0 turns each off. Raw-gradient clipping before the optimizer
    (the HF Trainer's ``max_grad_norm``) is *not* invariant: set it to 0.

    Variants (each argument left as ``None`` takes the variant's default):

    ============================  ===========================  ===============================
    argument                      ``variant="paper"``          ``variant="reference"``
    ============================  ===========================  ===============================
    ``escape_mass``               True (Algorithm 1)           False
    ``normalize_rows``            False                        True (``ḡᵀḡ / rows``)
    ``eps`` / ``eps_root``        0 / 1e-12 (inside the √)     1e-6 (outside the √) / 0
    ``clip_unmagnified_grad``     0 (off)                      1.0 (global)
    ``update_skipping``           0 (off)                      1.0
    ============================  ===========================  ===============================

    ``"reference"`` reproduces the authors' PyTorch code (github gkevinyen5418/LoRA-RITE) except for its
    defects: eigenvalues are clamped at 0 instead of being turned into NaN and then silently zeroed. Because
    ``S`` is scale-free in ``ḡ``, the update of ``B·A`` does not depend on ``s = α/r``; ``δW ∝ s``, so ``lr``
    and ``α/r`` are interchangeable knobs. Without row normalisation (``"paper"``) the entries of ``S`` are
    ``≈ 1/√rows``, so its best ``lr`` is larger than Adam's (the paper reports about 20×).

    All linear algebra and state are in ``promote_types(param.dtype, float32)``; only the final update is
    cast to the parameter dtype. A pair whose gradient holds inf/nan keeps its parameters and state; such
    skips are counted in :attr:`nonfinite_skips` and warned about once. Pairs without gradients are skipped.

    Implementation: pairs of equal shapes form buckets whose factors are stacked, so each phase is a few
    batched calls (``qr``, ``bmm``) per bucket and one batched ``pinv``/``eigh`` over all ``r × r`` matrices.
    """

    transformation_invariant: ClassVar[bool] = True
    pair_defaults: ClassVar[dict[str, Any]] = {
        "variant": "paper",
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
        **VARIANT_DEFAULTS["paper"],
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        *,
        variant: str = "paper",
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        escape_mass: bool | None = None,
        normalize_rows: bool | None = None,
        eps: float | None = None,
        eps_root: float | None = None,
        clip_unmagnified_grad: float | None = None,
        update_skipping: float | None = None,
        update_capping: float | None = None,
        **fallback: Any,
    ) -> None:
        """Args:
        params: ``(A, B)`` tuples, or param-group dicts ``{"params": [A0, B0, A1, B1, …], …}`` (an
            ``"role": "adamw"`` group holds unpaired parameters). Prefer :meth:`from_model`.
        lr: learning rate η (float or 0-d tensor).
        variant: ``"paper"`` (Algorithm 1 with escaped mass) or ``"reference"`` (the authors' code).
        betas: (β1, β2), decays of the first moment M and second moment V.
        weight_decay: decoupled weight decay λ_wd.
        escape_mass, normalize_rows, eps, eps_root, clip_unmagnified_grad, update_skipping,
            update_capping: see the class docstring; ``None`` takes the variant's default.
        **fallback: ``fallback_lr``, ``fallback_betas``, ``fallback_eps``, ``fallback_weight_decay`` for
            the AdamW group of unpaired parameters.
        """
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"LoRARite: variant must be one of {sorted(VARIANT_DEFAULTS)}, got {variant!r}")
        chosen = {
            "escape_mass": escape_mass,
            "normalize_rows": normalize_rows,
            "eps": eps,
            "eps_root": eps_root,
            "clip_unmagnified_grad": clip_unmagnified_grad,
            "update_skipping": update_skipping,
            "update_capping": update_capping,
        }
        hparams = {
            key: VARIANT_DEFAULTS[variant][key] if value is None else value for key, value in chosen.items()
        }
        hparams.update(variant=variant, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(params, lr, hparams, **fallback)

    def _validate_pair_group(self, group: dict[str, Any], where: str) -> None:
        super()._validate_pair_group(group, where)
        params = group["params"]
        for j in range(0, len(params), 2):
            A, B = params[j], params[j + 1]
            rank, n, m = A.shape[0], A[0].numel(), B.shape[0]
            if rank > min(n, m):
                raise ValueError(
                    f"{where}, pair {j // 2}: rank {rank} exceeds the layer's dimensions ({m} × {n}); "
                    "LoRA-RITE needs r <= min(in, out)"
                )

    def _check_pair_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        for key in ("eps", "eps_root", "clip_unmagnified_grad", "update_skipping", "update_capping"):
            if not float(group[key]) >= 0.0:
                raise ValueError(f"{where}: {key} must be >= 0, got {group[key]}")
        if float(group["eps"]) + float(group["eps_root"]) <= 0.0:
            raise ValueError(
                f"{where}: eps + eps_root must be > 0 — with both 0 a zero gradient (the B = 0 start, or the "
                "zero-grad step of distributed checkpoint loading) gives 0·∞ = NaN"
            )

    # ------------------------------------------------------------------ step, in phases
    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        buckets = [bucket for group in groups for bucket in self._gather(group)]
        if not buckets:
            return
        self._factorize(buckets)
        self._unmagnify(buckets)
        self._clip(buckets)
        self._second_moment(buckets)
        self._update(buckets)

    def _gather(self, group: dict[str, Any]) -> list[_Bucket]:
        """Phase 0: stack the pairs with gradients into buckets of equal shapes; create missing state."""
        by_key: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for A, B in self.pairs_with_grads(group):
            by_key[(A.shape, B.shape, A.dtype, B.dtype, A.device)].append((A, B))
        buckets = []
        for (_, _, dtype_A, dtype_B, _), pairs in by_key.items():
            dtype = _linalg.compute_dtype(torch.promote_types(dtype_A, dtype_B))
            sides = []
            for is_A, params in ((True, [a for a, _ in pairs]), (False, [b for _, b in pairs])):
                X = torch.stack([tall_view(p, is_A) for p in params]).to(dtype)
                G = torch.stack([tall_view(p.grad, is_A) for p in params]).to(dtype)
                for p, x in zip(params, X):
                    if not self.state[p]:
                        self._init_state(p, x)
                state = {key: torch.stack([self.state[p][key] for p in params]) for key in _STATE_KEYS}
                sides.append(_Side(params, is_A, X, G, state=state))
            buckets.append(_Bucket(group, *sides))
        return buckets

    def _init_state(self, param: torch.Tensor, tall: torch.Tensor) -> None:
        rows, rank = tall.shape
        zeros = dict(dtype=tall.dtype, device=tall.device)
        self.state[param].update(
            step=torch.zeros((), dtype=torch.float32, device=tall.device),
            first_moment=torch.zeros(rows, rank, **zeros),  # M, in the partner's basis
            second_moment=torch.zeros(rank, rank, **zeros),  # V, r × r
            escaped_mass=torch.zeros((), **zeros),  # ρ
            basis=torch.zeros(rows, rank, **zeros),  # Q of this factor at its last update
        )

    def _factorize(self, buckets: list[_Bucket]) -> None:
        """Phase 1: thin QR of every factor, and the pseudo-inverses of the R's (one batched call)."""
        sides = [side for bucket in buckets for side in (bucket.A, bucket.B)]
        for side in sides:
            side.Q, side.R = torch.linalg.qr(side.X)
        for key_sides in _by_rank_key(sides).values():
            pinvs = _linalg.concat_apply(_linalg.pinv, [s.R for s in key_sides])
            for side, R_pinv in zip(key_sides, pinvs):
                side.R_pinv = R_pinv

    def _unmagnify(self, buckets: list[_Bucket]) -> None:
        """Phase 2: ``ḡ_A = ∇Aᵀ R_B⁺`` (and ``ḡ_B = ∇B R_A⁺``); non-finite pairs and skipping zero ḡ."""
        for bucket in buckets:
            for side, partner in bucket.sides:
                side.g_bar = side.G @ partner.R_pinv
                side.finite = torch.isfinite(side.G).flatten(1).all(dim=1)
            bucket.ok = bucket.A.finite & bucket.B.finite
            skip = float(bucket.group["update_skipping"])
            skipped = []
            for side, _ in bucket.sides:
                side.g_bar = torch.where(bucket.ok[:, None, None], side.g_bar, 0.0)
                if skip > 0:
                    too_large = _rms(side.g_bar) > skip
                    side.g_bar = torch.where(too_large[:, None, None], 0.0, side.g_bar)
                    skipped.append(too_large.sum())
            bucket.skipped_factors = sum(skipped) if skipped else None
        nonfinite = torch.stack([(~bucket.ok).sum() for bucket in buckets]).sum()
        self._record_nonfinite(nonfinite)
        self.diagnostics["nonfinite_pairs"] = nonfinite
        counts = [b.skipped_factors for b in buckets if b.skipped_factors is not None]
        self.diagnostics["skipped_factors"] = torch.stack(counts).sum() if counts else torch.zeros(())

    def _clip(self, buckets: list[_Bucket]) -> None:
        """Phase 3: global norm of all unmagnified gradients; groups with a threshold scale theirs."""
        sq = [side.g_bar.square().sum() for bucket in buckets for side in (bucket.A, bucket.B)]
        norm = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
        self.diagnostics["unmagnified_grad_norm"] = norm
        for bucket in buckets:
            clip = float(bucket.group["clip_unmagnified_grad"])
            if clip > 0:
                coefficient = (clip / norm.to(bucket.A.g_bar.device)).clamp(max=1.0)
                self.diagnostics["clip_coefficient"] = coefficient
                for side in (bucket.A, bucket.B):
                    side.g_bar = side.g_bar * coefficient

    def _second_moment(self, buckets: list[_Bucket]) -> None:
        """Phase 4: re-base V into the partner's new basis, escaped mass ρ, EMA of ḡᵀḡ, and (V + ρI)^{-1/2}."""
        for bucket in buckets:
            beta1, beta2 = bucket.group["betas"]
            step = bucket.A.state["step"].to(bucket.A.X.dtype)
            bucket.beta1_hat = _decay(beta1, step)
            bucket.beta2_hat = _decay(beta2, step)
            for side, partner in bucket.sides:
                side.P = partner.Q.mT @ partner.state["basis"]
                side.V_rotated = _linalg.symmetrize(side.P @ side.state["second_moment"] @ side.P.mT)
        all_sides = [side for bucket in buckets for side in (bucket.A, bucket.B)]
        escaping = [s for b in buckets if b.group["escape_mass"] for s in (b.A, b.B)]
        for key_sides in _by_rank_key(escaping).values():
            shifts = _linalg.concat_apply(
                _linalg.eigenvalue_shift,
                [s.state["second_moment"] for s in key_sides],
                [s.V_rotated for s in key_sides],
            )
            for side, shift in zip(key_sides, shifts):
                side.rho = shift
        for bucket in buckets:
            b2 = bucket.beta2_hat[:, None, None]
            for side, _ in bucket.sides:
                if side.rho is None:
                    side.rho = torch.zeros_like(bucket.beta2_hat)
                else:
                    side.rho = bucket.beta2_hat * (side.state["escaped_mass"] + side.rho)
                gram = side.g_bar.mT @ side.g_bar
                if bucket.group["normalize_rows"]:
                    gram = gram / side.rows
                side.V = _linalg.symmetrize(b2 * side.V_rotated + (1 - b2) * gram)
        for key_sides in _by_rank_key(all_sides).values():
            decompositions = _linalg.concat_apply(torch.linalg.eigh, [s.V for s in key_sides])
            for side, (eigenvalues, eigenvectors) in zip(key_sides, decompositions):
                side.K = (eigenvalues, eigenvectors)
        for bucket in buckets:
            eps, eps_root = float(bucket.group["eps"]), float(bucket.group["eps_root"])
            for side, _ in bucket.sides:
                side.K = _linalg.inverse_sqrt_from_eigh(*side.K, side.rho, eps_root, eps)

    def _update(self, buckets: list[_Bucket]) -> None:
        """Phase 5: ``S = ḡK``, first moment, capping, re-magnify by the partner's R⁺, write back."""
        for bucket in buckets:
            group = bucket.group
            ok = bucket.ok[:, None, None]
            b1 = bucket.beta1_hat[:, None, None]
            cap = float(group["update_capping"])
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = lr.to(device=bucket.A.X.device, dtype=bucket.A.X.dtype)
            step_size = bucket.ok.to(bucket.A.X.dtype)[:, None, None] * lr
            new_states = []
            for side, partner in bucket.sides:
                S = side.g_bar @ side.K
                M = b1 * (side.state["first_moment"] @ side.P.mT) + (1 - b1) * S
                if cap > 0:
                    M = M / (_rms(M) / cap).clamp(min=1.0)[:, None, None]
                direction = M @ partner.R_pinv.mT + group["weight_decay"] * side.X
                X_new = side.X - step_size * direction
                torch._foreach_copy_([tall_view(p, side.is_A) for p in side.params], list(X_new.unbind(0)))
                new_states.append(
                    (
                        side,
                        {
                            "step": side.state["step"] + bucket.ok.to(torch.float32),
                            "first_moment": torch.where(ok, M, side.state["first_moment"]),
                            "second_moment": torch.where(ok, side.V, side.state["second_moment"]),
                            "escaped_mass": torch.where(bucket.ok, side.rho, side.state["escaped_mass"]),
                            "basis": torch.where(ok, side.Q, side.state["basis"]),
                        },
                    )
                )
            for side, values in new_states:
                for key, stacked in values.items():
                    targets = [self.state[p][key] for p in side.params]
                    torch._foreach_copy_(targets, list(stacked.unbind(0)))


def _rms(X: torch.Tensor) -> torch.Tensor:
    """Root mean square of each matrix in a stack, shape ``(N,)``."""
    return X.square().flatten(1).mean(dim=1).sqrt()


def _decay(beta: float, step: torch.Tensor) -> torch.Tensor:
    """Bias-corrected decay ``β̂ = β(1 − β^k)/(1 − β^{k+1})`` for step counts ``k`` (0 at k = 0)."""
    return beta * (1 - beta**step) / (1 - beta ** (step + 1))


def _by_rank_key(sides: list[_Side]) -> dict[tuple, list[_Side]]:
    """Sides whose ``r × r`` matrices can be concatenated into one batched call."""
    out: dict[tuple, list[_Side]] = defaultdict(list)
    for side in sides:
        out[(side.X.shape[-1], side.X.dtype, side.X.device)].append(side)
    return out


class LoRARiteFactory(PairOptimizerFactory):
    """HF Trainer factory: ``Trainer(optimizer_cls_and_kwargs=(LoRARiteFactory, {"lr": 2e-4}))``.

    Set ``TrainingArguments(max_grad_norm=0)``: raw-gradient clipping breaks invariance (a warning says so
    when it is not 0); LoRA-RITE clips its unmagnified gradient itself (``clip_unmagnified_grad``).
    """

    optimizer_cls = LoRARite
