"""LoRA-RITE (Yen et al., arXiv 2410.20625, ICLR 2025): the transformation-invariant LoRA optimizer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import _linalg
from ._base import PairOptimizer, PairOptimizerFactory

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
# The learning rate each variant takes when none is given, inside its "--lrs auto" grid of lorite compare:
# the paper variant's best rate in docs/results.md (1e-2 on social_iqa and strategyqa at r = 16); the
# reference variant's rows-normalised update is ~√rows larger per unit lr (its best there: 3e-4).
VARIANT_LR: dict[str, float] = {"paper": 1e-2, "reference": 1e-3}


_BIG_STATE = ("first_moment",)  # (r, rows) per factor: one buffer per bucket
# one buffer per plan; basis_overlap (r × r, float64) in place of the previous basis Q' (r × rows)
_SMALL_STATE = ("step", "second_moment", "eigenvalues", "escaped_mass", "eigenvectors", "basis_overlap")


@dataclass
class _Bucket:
    """Factors of one kind (A or B) with equal shape and dtype: stacked together every step.

    Everything with a row per row of the factor's tall view is held *wide*, ``(r, rows)``: A as it is
    (``r × n``), B transposed (``Bᵀ``, ``r × m``). The products are then ``(r × r)·(r × rows)``, which
    cuBLAS runs at memory speed; ``(rows × r)·(r × r)`` with r = 16 falls on slow small-N kernels.
    """

    is_A: bool
    params: list[torch.Tensor]
    positions: slice  # where these factors sit in the plan's factor order
    rows: int  # rows of the tall view
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # first_moment: (N, r, rows)

    @property
    def matrices(self) -> list[torch.Tensor]:
        """2-D views of the params, what the update is written into: A ``(r, n)``, B ``(m, r)``. Made when
        asked, not kept: torch.compile refuses a view kept from an earlier step whose base has since been
        updated in place."""
        return [p.view(p.shape[0], -1) if self.is_A else p.view(p.shape[0], p.shape[1]) for p in self.params]

    def wide(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (the params or their gradients) stacked wide, ``(N, r, rows)``: A as it is, B
        transposed (a copy either way)."""
        stacked = torch.stack(tensors)
        if self.is_A:
            return stacked.reshape(len(tensors), stacked.shape[1], -1)
        return stacked.reshape(len(tensors), stacked.shape[1], stacked.shape[2]).mT.contiguous()


@dataclass
class _Plan:
    """The layout of one step's work for the pairs of one param group with one rank, dtype and device."""

    key: tuple
    group: dict[str, Any]
    params: list[torch.Tensor]  # factor order: the buckets, concatenated
    buckets: list[_Bucket]
    partner: torch.Tensor  # (F,) position of every factor's partner
    rows: torch.Tensor  # (F,) rows of every factor's tall view
    dtype: torch.dtype
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # _SMALL_STATE, stacked over factors
    views: list[torch.Tensor] = field(default_factory=list)  # state[p]["first_moment"] as this plan set it


@dataclass
class _CapturedStep:
    """The pair step of a set of plans, captured once in a CUDA graph and replayed every step.

    ``signature`` says what the graph baked in (the plans, the parameters' addresses, every
    hyperparameter but the learning rate); ``grads`` and ``lrs`` are its static inputs: each step copies
    the gradients and learning rates into them before the replay."""

    signature: tuple
    graph: Any
    grads: list[torch.Tensor]
    lrs: list[torch.Tensor]


_WARM_START_CONDITIONING = 1e-3
"""A warm basis ``W = PE`` is used when ``min/max |R_ii|`` of its Cholesky QR exceeds this (cond(W) ≲ 1e3;
orthonormalised in float64, so it is orthogonal to fp32 roundoff). A ``W`` that ill conditioned says the
factor's basis turned sharply, and such a start would not save sweeps anyway."""

_EAGER_STEPS_BEFORE_CAPTURE = 2  # the first steps compile the Triton kernels and build every buffer


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
    ``lr`` (when not given)       1e-2                         1e-3
    ============================  ===========================  ===============================

    ``"reference"`` reproduces the authors' PyTorch code (github gkevinyen5418/LoRA-RITE) except for its
    defects: eigenvalues are clamped at 0 instead of being turned into NaN and then silently zeroed. Because
    ``S`` is scale-free in ``ḡ``, the update of ``B·A`` does not depend on ``s = α/r``; ``δW ∝ s``, so ``lr``
    and ``α/r`` are interchangeable knobs. Without row normalisation (``"paper"``) the entries of ``S`` are
    ``≈ 1/√rows``, so its best ``lr`` is larger than Adam's (the paper reports about 20×).

    All linear algebra and state are in ``promote_types(param.dtype, float32)``; only the final update is
    cast to the parameter dtype. A pair whose gradient holds inf/nan keeps its parameters and state; such
    skips are counted in :attr:`nonfinite_skips` and warned about once. Pairs without gradients are skipped.

    Implementation (``benchmarks/speed/optimizer_step.py``): factors of equal shape form buckets whose state
    lives in persistent stacked buffers (the per-parameter state entries are views into them), so each
    phase is a few batched calls per bucket plus one batched call over all ``r × r`` matrices. No ``Q`` is
    formed at the start of a step: ``R`` comes from a float64 Cholesky of ``X̄ᵀX̄`` (``torch.linalg.qr``
    loops over the batch on CUDA), and the basis change as ``QᵀQ' = R⁻ᵀ(X̄ᵀQ')``. The overlap ``X̄ᵀQ'`` of
    the factor with its previous basis ``Q' = X̄'R'⁻¹`` is formed by the previous step, right after it
    wrote ``X̄``, and kept (``r × r``, float64): keeping ``Q'`` itself would cost ``r × rows``, the size of
    the factor, and put the state ``r/rows`` above AdamW's (+18 % on SmolLM2 at r = 128, whose k/v
    projections have 192 rows); this way it is below AdamW's at every rank (one ``r × rows`` moment against
    AdamW's two). So the factors must change only through this optimizer between its steps (a checkpoint
    loads them with the state that matches them); after writing other values into them, build a new
    optimizer: its moments describe the old factors anyway. Row-sized data is
    held as ``r × rows`` so that every big product is ``(r × r)·(r × rows)``. The ``r × r``
    eigendecompositions use lorite's Triton Jacobi kernels on CUDA at every rank (``torch.linalg.eigh``
    synchronises with the host; see ``_linalg.eigh_small``), so ``step()`` reads no tensor value on the
    host (``tests/gpu`` checks it with ``torch.cuda.set_sync_debug_mode("error")``) and overlaps the
    backward pass instead of waiting for it. There the eigenproblems are warm started: the previous
    step's eigenvectors ``E`` of ``V`` (kept in the state, ``r × r`` per factor), carried into the new basis
    as ``PE`` and orthonormalised, nearly diagonalise both ``PVPᵀ`` and the new ``V``, so the Jacobi
    kernels' early exit stops after a sweep or two (``_eigenbasis``; :attr:`warm_start` turns it on or
    off anywhere, by default on where the Jacobi kernels run).

    CUDA graphs: the step is a few hundred small kernels, so at low rank it is bound by their launches,
    not by the GPU. With ``cuda_graph=True`` (CUDA only; ignored on CPU) the optimizer captures its pair
    step once, after two eager steps, and replays it: each step copies the gradients and the learning
    rates into the graph's static inputs (so ``zero_grad(set_to_none=True)``, lr schedules and
    gradient accumulation work as usual) and launches one graph. It is captured again when the
    parameters move in memory, the set of pairs with gradients changes, the state is loaded, or a
    hyperparameter other than ``lr`` changes; replays are bit-identical to eager steps
    (``benchmarks/speed/graph_check.py``). A device-tensor ``lr`` updated in place, as torch's
    ``capturable`` optimizers take it, reaches the step without a host read, so the step can also be
    captured from outside (``tests/gpu``). The fallback AdamW group steps eagerly. The graph keeps the
    step's temporaries in its own memory pool. ``torch.compile(optimizer.step)`` traces the eager step into
    one graph with no break (tests/optim/test_contract.py, on CPU; benchmarks/speed/compile_check.py).

    Rank guard (not in the paper): a factor whose Cholesky fails or whose ``R`` is rank deficient is
    treated like ``B = 0``: ``R⁺ = 0``, so its partner does not move that step. Deficient means
    ``min|R_ii| ≤ tol·max|R_ii|`` with ``tol = max(r·ε, rank_tolerance)`` (``r·ε`` = 1.9e-6 at r = 16 in
    fp32: numerically singular). Why a relative threshold: the invariance is first order. The update of
    ``A`` is scaled by ``R_B⁻¹``, so right after the ``B = 0`` start, while ``B`` is small and can be ill
    conditioned, the second-order term ``δB·δA`` grows like ``η²/σ_min(B)``. Seen at r = 64 on strategyqa
    (one-token answers), where a few of the 420 factors reach ``min/max |R_ii| ≈ 5e-4``: with
    ``rank_tolerance=0`` (Algorithm 1 as published) the loss jumped from 8.6 to 20–40 at step 3 at every
    learning rate on the GPU and stayed there (on CPU at lr 1e-2: 5.2 → 45). The default 3e-3 (those few
    factors wait a step or two) trained normally there (loss 0.34 at lr 1e-3–1e-2). On the paper table's
    r = 16 setting it never fired on three of the five tasks (bit-identical runs) and moved the other
    two within noise (docs/results.md, rank ablation). The ratio is unchanged by a scalar
    rescaling of the pair; it bounds the factor's conditioning (``σ_min/σ_max ≤ min/max |R_ii|``).
    """

    transformation_invariant: ClassVar[bool] = True
    float64_state_keys: ClassVar[frozenset[str]] = frozenset({"basis_overlap"})
    pair_defaults: ClassVar[dict[str, Any]] = {
        "variant": "paper",
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
        "rank_tolerance": 3e-3,
        **VARIANT_DEFAULTS["paper"],
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor | None = None,
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
        rank_tolerance: float = 3e-3,
        cuda_graph: bool = False,
        **fallback: Any,
    ) -> None:
        """Args:
        params: ``(A, B)`` tuples, or param-group dicts ``{"params": [A0, B0, A1, B1, …], …}`` (an
            ``"role": "adamw"`` group holds unpaired parameters). Prefer :meth:`from_model`.
        lr: learning rate η (float or 0-d tensor); ``None`` takes the variant's (:data:`VARIANT_LR`).
        variant: ``"paper"`` (Algorithm 1 with escaped mass) or ``"reference"`` (the authors' code).
        betas: (β1, β2), decays of the first moment M and second moment V.
        weight_decay: decoupled weight decay λ_wd.
        escape_mass, normalize_rows, eps, eps_root, clip_unmagnified_grad, update_skipping,
            update_capping: see the class docstring; ``None`` takes the variant's default.
        rank_tolerance: treat a factor with ``min|R_ii| ≤ rank_tolerance·max|R_ii|`` as rank deficient
            (its partner waits), on top of the numerical test; 0 is Algorithm 1 as published. See "Rank
            guard" in the class docstring.
        cuda_graph: capture the pair step in a CUDA graph and replay it (see "CUDA graphs" above).
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
        hparams.update(
            variant=variant, betas=tuple(betas), weight_decay=weight_decay, rank_tolerance=rank_tolerance
        )
        self._plans: dict[tuple, _Plan] = {}
        self.cuda_graph = bool(cuda_graph)
        self._captured: _CapturedStep | None = None
        self._eager_steps = 0  # eager steps since the captured graph last stopped matching
        # warm-started eigendecompositions (see _eigenbasis): None = where the Jacobi kernels run (CUDA),
        # whose early exit makes a nearly diagonal matrix cheap; LAPACK's cost does not depend on it
        self.warm_start: bool | None = None
        super().__init__(params, VARIANT_LR[variant] if lr is None else lr, hparams, **fallback)

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
        tolerance = float(group.get("rank_tolerance", 0.0))
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"{where}: rank_tolerance must be in [0, 1), got {group.get('rank_tolerance')}")

    # ------------------------------------------------------------------ state layout
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            inverse = state.pop("basis_inverse", None)
            if inverse is not None and "basis" in state:  # saved before the basis Q' itself was kept: the
                state["basis"] = inverse.mT @ state["basis"]  # factor X̄'ᵀ and its R'⁻¹, so Q'ᵀ = R'⁻ᵀX̄'ᵀ
            # a "basis" Q'ᵀ (saved before the overlap X̄ᵀQ' was kept in its place) becomes the overlap when
            # the next step stacks the state (_build_plan), against the factor as that step finds it
        self._plans = {}  # loaded state tensors are not views of any buffer: restack them on the next step
        self._captured = None

    def _plans_for(self, position: int, group: dict[str, Any]) -> list[_Plan]:
        """The plans for this step's pairs (those with gradients) of the ``position``-th pair group, built
        once and reused while valid."""
        families: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for A, B in self.pairs_with_grads(group):
            dtype = _linalg.compute_dtype(torch.promote_types(A.dtype, B.dtype))
            families[(A.shape[0], dtype, A.device)].append((A, B))
        plans = []
        for (_, dtype, device), pairs in families.items():
            # the group by position, not id(): torch.compile (2.11) cannot trace id() of a dict
            key = (position, dtype, device, tuple(id(t) for pair in pairs for t in pair))
            plan = self._plans.get(key)
            if plan is None or plan.group is not group or not self._still_valid(plan):
                plan = self._build_plan(key, group, pairs, dtype, device)
                self._plans[key] = plan
            plans.append(plan)
        return plans

    def _still_valid(self, plan: _Plan) -> bool:
        """True while every factor's state is still the view this plan created (a load, or another plan
        over an overlapping set of pairs, replaces them)."""
        state = self.state
        return all(state[p].get("first_moment") is view for p, view in zip(plan.params, plan.views))

    def _build_plan(self, key, group, pairs, dtype, device) -> _Plan:
        """Bucket the factors, stack their state (zeros where new) into buffers, point the state at them."""
        kinds: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for A, B in pairs:
            kinds[(True, A.shape, A.dtype)].append(A)
            kinds[(False, B.shape, B.dtype)].append(B)
        buckets, params, start = [], [], 0
        for (is_A, _, _), members in kinds.items():
            rows = members[0][0].numel() if is_A else members[0].shape[0]
            buckets.append(_Bucket(is_A, members, slice(start, start + len(members)), rows))
            params += members
            start += len(members)
        position = {id(p): i for i, p in enumerate(params)}
        partner = [0] * len(params)
        for A, B in pairs:
            partner[position[id(A)]], partner[position[id(B)]] = position[id(B)], position[id(A)]
        rank = pairs[0][0].shape[0]
        plan = _Plan(
            key, group, params, buckets,
            partner=torch.tensor(partner, dtype=torch.long, device=device),
            rows=torch.tensor([b.rows for b in buckets for _ in b.params], dtype=dtype, device=device),
            dtype=dtype,
        )  # fmt: skip
        zeros = dict(dtype=dtype, device=device)
        fresh = {
            "step": lambda rows: torch.zeros((), dtype=torch.float32, device=device),
            "second_moment": lambda rows: torch.zeros(rank, rank, **zeros),  # V, r × r
            "eigenvalues": lambda rows: torch.zeros(rank, **zeros),  # of V, for the next escaped mass
            "escaped_mass": lambda rows: torch.zeros((), **zeros),  # ρ
            # of V: the next step's warm start (0 = none yet: that step starts cold)
            "eigenvectors": lambda rows: torch.zeros(rank, rank, **zeros),
            # X̄ᵀQ': the factor against its basis Q' at its last update (0 = none yet: the first P is 0)
            "basis_overlap": lambda rows: torch.zeros(rank, rank, dtype=torch.float64, device=device),
            "first_moment": lambda rows: torch.zeros(rank, rows, **zeros),  # Mᵀ, in the partner's basis
        }
        for bucket in buckets:
            for p in bucket.params:
                basis = self.state[p].pop("basis", None) if p in self.state else None
                if basis is not None:  # a checkpoint that kept Q'ᵀ (wide, r × rows): X̄ᵀQ' from the factor now
                    X = bucket.wide([p.detach()]).to(device=device, dtype=torch.float64)
                    self.state[p]["basis_overlap"] = (X @ basis.to(X).mT)[0]

        def stacked(key, members, rows):
            return torch.stack(
                [self.state[p][key] if key in self.state[p] else fresh[key](rows) for p in members]
            )

        for bucket in buckets:
            bucket.buffers = {key: stacked(key, bucket.params, bucket.rows) for key in _BIG_STATE}
        plan.buffers = {key: stacked(key, params, None) for key in _SMALL_STATE}
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                f = bucket.positions.start + i
                state = {key: plan.buffers[key][f] for key in _SMALL_STATE}
                state.update({key: bucket.buffers[key][i] for key in _BIG_STATE})
                self.state[p] = state
        plan.views = [self.state[p]["first_moment"] for p in params]
        return plan

    # ------------------------------------------------------------------ step, in phases
    def _step_pairs(self, groups: list[dict[str, Any]]) -> None:
        plans = [plan for position, group in enumerate(groups) for plan in self._plans_for(position, group)]
        # keep only this step's plans: a plan holds buffers, and other subsets of pairs may come and go
        # (in place: torch.compile follows a dict's mutation, where older releases refuse rebinding an
        # attribute of the optimizer inside a traced step)
        self._plans.clear()
        self._plans.update((plan.key, plan) for plan in plans)
        if not plans:
            return
        if self.cuda_graph and all(plan.partner.is_cuda for plan in plans):
            self._replay(plans)
        else:
            self._compute(plans)

    # ------------------------------------------------------------------ CUDA graph
    def _replay(self, plans: list[_Plan]) -> None:
        """The step through a captured CUDA graph: capture it (after warm-up) if it does not match these
        plans, then copy this step's gradients and learning rates into its inputs and replay it."""
        signature = tuple(
            (id(plan), tuple(p.data_ptr() for p in plan.params), _graph_hyperparameters(plan.group))
            for plan in plans
        )
        captured = self._captured
        if captured is None or captured.signature != signature:
            self._captured = None
            if self._eager_steps < _EAGER_STEPS_BEFORE_CAPTURE or torch.cuda.is_current_stream_capturing():
                self._eager_steps += 1
                self._compute(plans)
                return
            captured = self._captured = self._capture(plans, signature)
        self._eager_steps = 0
        torch._foreach_copy_(captured.grads, [p.grad for plan in plans for p in plan.params])
        for lr, plan in zip(captured.lrs, plans):
            rate = plan.group["lr"]
            if isinstance(rate, torch.Tensor):
                lr.copy_(rate)
            else:
                lr.fill_(rate)
        captured.graph.replay()
        self._probe_nonfinite()

    def _capture(self, plans: list[_Plan], signature: tuple) -> _CapturedStep:
        """Record :meth:`_compute` for ``plans`` in a CUDA graph (nothing runs: the caller replays it).
        While recording, the gradients are the graph's static copies and each group's ``lr`` a device
        tensor; both are put back afterwards."""
        params = [p for plan in plans for p in plan.params]
        given_grads = [p.grad for p in params]
        given_lrs = [plan.group["lr"] for plan in plans]
        grads = [g.detach().clone() for g in given_grads]
        lrs = [torch.zeros((), dtype=plan.dtype, device=plan.partner.device) for plan in plans]
        graph = torch.cuda.CUDAGraph()
        try:
            for p, g in zip(params, grads):
                p.grad = g
            for plan, lr in zip(plans, lrs):
                plan.group["lr"] = lr
            with torch.cuda.graph(graph):
                self._compute(plans)
        finally:
            for p, g in zip(params, given_grads):
                p.grad = g
            for plan, lr in zip(plans, given_lrs):
                plan.group["lr"] = lr
        return _CapturedStep(signature, graph, grads, lrs)

    def _compute(self, plans: list[_Plan]) -> None:
        work = [self._unmagnify(plan) for plan in plans]
        coefficients = self._clip(plans, work)
        for plan, items, coefficient in zip(plans, work, coefficients):
            self._update(plan, items, coefficient)

    def _unmagnify(self, plan: _Plan) -> dict[str, Any]:
        """Phases 1–2: each factor's ``R`` (``X̄ = QR``), the basis change, and the Gram matrix of ``ḡ``.

        No ``Q`` is formed. ``R`` is the Cholesky factor of the Gram matrix ``X̄ᵀX̄``, computed in float64
        (exact for the fp32 data, well conditioned up to cond(X̄) ~ 1e7). With ``Q = X̄R⁻¹`` and the
        overlap ``X̄ᵀQ'`` with the previous basis, kept by the last step: ``QᵀQ' = R⁻ᵀ (X̄ᵀQ')``;
        ``ḡ = ∇X̄ R⁺_partner``
        has Gram matrix ``R⁺ᵀ (∇X̄ᵀ∇X̄) R⁺``, its squared norm is that matrix's trace, and ``S = ḡK`` is
        formed later as ``∇X̄ (R⁺K)``. Non-finite pairs (either factor's gradient) and skipped factors get
        ``ḡ = 0``. A factor whose Cholesky fails or whose ``R`` is numerically singular gets ``R⁺ = 0``
        (the ``pinv(0) = 0`` of peft's ``B = 0`` start).
        """
        wide, grads, grams, gradient_grams = [], [], [], []
        for bucket in plan.buckets:
            X = bucket.wide(bucket.params).to(plan.dtype)
            G = bucket.wide([p.grad for p in bucket.params]).to(plan.dtype)
            X64 = X.double()
            grams.append(X64 @ X64.mT)  # X̄ᵀX̄, r × r
            wide.append(X)
            grads.append(G)
            gradient_grams.append(G @ G.mT)  # ∇X̄ᵀ∇X̄
        R, full = _linalg.cholesky_factor(
            torch.cat(grams),
            tolerance_dtype=plan.dtype,
            # a group from a checkpoint older than the option ran without it
            relative_tolerance=float(plan.group.get("rank_tolerance", 0.0)),
        )
        R_inv64 = _linalg.triangular_inverse(R, full)
        basis_change = R_inv64.mT @ plan.buffers["basis_overlap"]  # QᵀQ' = R⁻ᵀ(X̄ᵀQ')
        R_inv = R_inv64.to(plan.dtype)
        R_inv_partner = R_inv.index_select(0, plan.partner)
        gram = R_inv_partner.mT @ torch.cat(gradient_grams) @ R_inv_partner  # ḡᵀḡ
        squares = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)  # ‖ḡ‖²
        finite = torch.isfinite(squares)
        ok = finite & finite.index_select(0, plan.partner)  # the whole pair is skipped if either is bad
        keep = ok
        skip = float(plan.group["update_skipping"])
        if skip > 0:  # zero ḡ of factors whose RMS exceeds the threshold (invariant: ḡ is consistent)
            rms = (squares / (plan.rows * R_inv.shape[-1])).sqrt()
            keep = ok & (rms <= skip)
        for i, bucket in enumerate(plan.buckets):  # inf/nan gradients must not reach S or M
            grads[i] = _linalg.masked(ok[bucket.positions], grads[i], 0.0)
        return {
            "wide": wide, "grads": grads, "R_inv": R_inv, "R_inv_partner": R_inv_partner,
            "basis_change": basis_change.to(plan.dtype), "ok": ok, "keep": keep,
            "gram": _linalg.masked(keep, gram, 0.0), "squares": torch.where(keep, squares, 0.0),
            "skipped": (ok & ~keep).sum(),
        }  # fmt: skip

    def _clip(self, plans: list[_Plan], work: list[dict[str, Any]]) -> list[torch.Tensor | None]:
        """Phase 3: the global norm of all unmagnified gradients; per group, the factor that clips it."""
        device = work[0]["squares"].device
        norm = torch.stack([items["squares"].sum().to(device) for items in work]).sum().sqrt()
        self.diagnostics["unmagnified_grad_norm"] = norm
        self.diagnostics["skipped_factors"] = torch.stack(
            [items["skipped"].to(device) for items in work]
        ).sum()
        nonfinite = torch.stack([(~items["ok"]).sum().to(device) for items in work]).sum() // 2
        self.diagnostics["nonfinite_pairs"] = nonfinite
        self._record_nonfinite(nonfinite)
        coefficients = []
        for plan in plans:
            clip = float(plan.group["clip_unmagnified_grad"])
            if clip > 0:
                coefficient = (clip / norm.to(plan.partner.device)).clamp(max=1.0)
                self.diagnostics["clip_coefficient"] = coefficient
                coefficients.append(coefficient)
            else:
                coefficients.append(None)
        return coefficients

    def _update(self, plan: _Plan, items: dict[str, Any], coefficient: torch.Tensor | None) -> None:
        """Phases 4–5: basis change, escaped mass, second moment, (V + ρI)^{-1/2}, first moment, update.

        In the wide layout (``Mᵂ = Mᵀ``, ``Xᵂ = X̄ᵀ``): ``Mᵂ ← β̂1 P Mᵂ + (1 − β̂1)(R⁺K)ᵀ∇Xᵂ`` and
        ``Xᵂ ← Xᵂ − η R⁺_partner Mᵂ``.
        """
        group, dtype, buffers = plan.group, plan.dtype, plan.buffers
        ok, keep = items["ok"], items["keep"]
        beta1, beta2 = group["betas"]
        step = buffers["step"].to(dtype)
        # a skipped pair keeps its state exactly: β̂ = 1 and P = I turn every update below into the identity
        b1 = torch.where(ok, _decay(beta1, step), 1.0)
        b2 = torch.where(ok, _decay(beta2, step), 1.0)
        rank = buffers["second_moment"].shape[-1]
        eye = torch.eye(rank, dtype=dtype, device=ok.device)

        P = items["basis_change"].index_select(0, plan.partner)  # A's state lives in B's basis, and back
        P = _linalg.masked(ok, P, eye)
        scale = 1 - b2  # (1 − β̂2) · clip² / rows, one per-factor scalar
        if coefficient is not None:
            scale = scale * coefficient.square()
        if group["normalize_rows"]:
            scale = scale / plan.rows

        V_rotated = _linalg.symmetrize(P @ buffers["second_moment"] @ P.mT)
        V = _linalg.symmetrize(b2[:, None, None] * V_rotated + scale[:, None, None] * items["gram"])
        basis = self._eigenbasis(P, buffers["eigenvectors"], V)
        if basis is None:
            eigenvalues, eigenvectors = _linalg.eigh_small(V)
        else:  # V in the warm basis is nearly diagonal: a sweep or two of Jacobi
            eigenvalues, rotation_in_basis = _linalg.eigh_small(_linalg.symmetrize(basis.mT @ V @ basis))
            eigenvectors = basis @ rotation_in_basis
        if group["escape_mass"]:  # the eigenvalues of the previous V are kept from its own decomposition
            rotated = V_rotated if basis is None else _linalg.symmetrize(basis.mT @ V_rotated @ basis)
            shift = _linalg.eigenvalue_shift(buffers["eigenvalues"], _linalg.eigvalsh_small(rotated))
            rho = torch.where(ok, b2 * (buffers["escaped_mass"] + shift), buffers["escaped_mass"])
        else:
            rho = torch.zeros_like(b2)
        K = _linalg.inverse_sqrt_from_eigh(
            eigenvalues, eigenvectors, rho, float(group["eps_root"]), float(group["eps"])
        )
        # (1 − β̂1)·S = ∇X̄ R⁺ K (1 − β̂1) — with the clip factor, and 0 for skipped factors
        factor = (1 - b1) * keep.to(dtype)
        if coefficient is not None:
            factor = factor * coefficient
        gradient_map = (items["R_inv_partner"] @ (K * factor[:, None, None])).mT
        rotation = b1[:, None, None] * P

        lr = group["lr"]
        if isinstance(
            lr, torch.Tensor
        ):  # a CPU lr is read on the host (no device sync); a device lr stays there
            lr = float(lr) if lr.device.type == "cpu" else lr.to(dtype)
        step_size = ok.to(dtype) * lr
        remagnify = step_size[:, None, None] * items["R_inv_partner"]  # η R⁺_partner
        cap = float(group["update_capping"])
        weight_decay = float(group["weight_decay"])
        overlaps = []  # X̄ᵀQ' of the next step, per bucket
        for bucket, X, G in zip(plan.buckets, items["wide"], items["grads"]):
            at = bucket.positions
            M = torch.baddbmm(gradient_map[at] @ G, rotation[at], bucket.buffers["first_moment"])
            if cap > 0:
                M = M / (_rms(M) / cap).clamp(min=1.0)[:, None, None]
            current = X * (1 - weight_decay * step_size[at])[:, None, None] if weight_decay else X
            new = torch.baddbmm(current, remagnify[at], M, alpha=-1)
            if bucket.is_A:
                torch._foreach_copy_(bucket.matrices, list(new.unbind(0)))
            else:
                torch._foreach_copy_(bucket.matrices, list(new.mT.contiguous().unbind(0)))
            self._store(bucket, M)
            basis = items["R_inv"][at].mT @ X  # this step's basis Qᵀ = R⁻ᵀX̄ᵀ, the next step's Q'ᵀ
            param_dtype = bucket.params[0].dtype
            if param_dtype != dtype:  # the factor as the next step will read it: rounded to its dtype
                new = new.to(param_dtype).to(dtype)
            overlaps.append(new.double() @ basis.double().mT)
        # in place: torch.compile (2.11) refuses rebinding an attribute of a plan built before the trace
        plan.views[:] = [self.state[p]["first_moment"] for p in plan.params]
        # a skipped pair's factor did not move: its overlap stays right
        buffers["basis_overlap"].copy_(_linalg.masked(ok, torch.cat(overlaps), buffers["basis_overlap"]))
        buffers["second_moment"].copy_(V)
        buffers["eigenvalues"].copy_(_linalg.masked(ok, eigenvalues, buffers["eigenvalues"]))
        buffers["eigenvectors"].copy_(_linalg.masked(ok, eigenvectors, buffers["eigenvectors"]))
        buffers["escaped_mass"].copy_(rho)
        buffers["step"].add_(ok.to(torch.float32))

    def _eigenbasis(self, P: torch.Tensor, previous: torch.Tensor, V: torch.Tensor) -> torch.Tensor | None:
        """The warm start of this step's eigendecompositions, or None (cold: where :attr:`warm_start` is
        off, by default everywhere but the Jacobi kernels' CUDA route).

        The previous ``V = E Λ Eᵀ`` moves to the new basis as ``P V Pᵀ``, whose eigenvectors are ``PE``
        (exactly when ``P`` is orthogonal; ``P = QᵀQ'`` is close to it while the factor turns slowly), and
        ``β̂2`` close to 1 changes ``V`` little more. So ``W = PE``, orthonormalised (``W R⁻¹`` with
        ``RᵀR = WᵀW``, the Cholesky QR of ``_linalg``), nearly diagonalises both ``PVPᵀ`` and the new ``V``:
        their decompositions in that basis take the Jacobi kernels one or two sweeps instead of ten
        (their early exit, ``_jacobi``). The eigenvalues are those of ``V`` itself (the basis is
        orthonormal) and the eigenvectors are ``W`` times those of ``WᵀVW``. Where ``W`` is not well
        conditioned (the first step, with no ``E`` yet; a factor that turned sharply) the basis is the
        identity: a cold start for that matrix."""
        warm = self.warm_start
        if warm is None:
            warm = _linalg.eigh_route(V) == "jacobi"
        if not warm:
            return None
        W = (P @ previous).double()  # float64: the orthonormalised basis is orthogonal to the data's roundoff
        R, ok = _linalg.cholesky_factor(
            W.mT @ W, tolerance_dtype=V.dtype, relative_tolerance=_WARM_START_CONDITIONING
        )
        orthonormal = (W @ _linalg.triangular_inverse(R, ok)).to(V.dtype)
        return _linalg.masked(ok, orthonormal, torch.eye(W.shape[-1], dtype=V.dtype, device=V.device))

    def _store(self, bucket: _Bucket, M: torch.Tensor) -> None:
        """Keep the new first moment. On CUDA it is copied into the persistent buffer, so that a captured
        CUDA graph finds it at a fixed address; on CPU, where copying every factor's moment costs more than
        the step's arithmetic, the new tensor becomes the buffer and the state views follow."""
        if M.is_cuda:
            bucket.buffers["first_moment"].copy_(M)
            return
        bucket.buffers["first_moment"] = M
        for p, moment in zip(bucket.params, M.unbind(0)):
            self.state[p]["first_moment"] = moment


def _graph_hyperparameters(group: dict[str, Any]) -> tuple:
    """Everything a captured step bakes in from its param group: all hyperparameters but ``lr``."""
    return tuple(sorted((key, repr(value)) for key, value in group.items() if key not in ("params", "lr")))


def _rms(X: torch.Tensor) -> torch.Tensor:
    """Root mean square of each matrix in a stack, shape ``(N,)``."""
    return X.square().flatten(1).mean(dim=1).sqrt()


def _decay(beta: float, step: torch.Tensor) -> torch.Tensor:
    """Bias-corrected decay ``β̂ = β(1 − β^k)/(1 − β^{k+1})`` for step counts ``k`` (0 at k = 0)."""
    return beta * (1 - beta**step) / (1 - beta ** (step + 1))


class LoRARiteFactory(PairOptimizerFactory):
    """HF Trainer factory: ``Trainer(optimizer_cls_and_kwargs=(LoRARiteFactory, {"lr": 2e-4}))``.

    Set ``TrainingArguments(max_grad_norm=0)``: raw-gradient clipping breaks invariance (a warning says so
    when it is not 0); LoRA-RITE clips its unmagnified gradient itself (``clip_unmagnified_grad``).
    ``learning_rate``, ``weight_decay`` and the Adam betas come from ``TrainingArguments`` (see
    :class:`~lorite.optim.PairOptimizerFactory`), but not ``adam_epsilon``: LoRA-RITE's ``eps`` belongs to
    its variant (0 in the paper's, 1e-6 in the authors' code) and the Trainer's default 1e-8 would silently
    change both; pass ``eps`` in the kwargs to set it. ``adam_epsilon`` still sets the AdamW fallback's.
    """

    optimizer_cls = LoRARite
    trainer_keywords = ("lr", "weight_decay", "betas", "fallback_betas", "fallback_eps")
