"""Fira-AdamW: GaLore plus the scaled out-of-subspace residual and the norm-growth limiter
(Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
arXiv 2410.01623, §4 and Algorithm 1).

With GaLore's projection ``R_t = PᵀG_t`` (one-sided; ``k × r`` basis ``P``), Adam's ``N_t = M_t/(√V_t+ε)``
and step size ``η_t = lr·√(1−β2^t)/(1−β1^t)`` (see :mod:`lorite.optim.galore`):

.. math::
    \\varphi_i = \\frac{\\lVert N_t[:, i]\\rVert}{\\lVert R_t[:, i]\\rVert + 10^{-8}} \\quad
    (\\text{one factor per kept row/column; ``scaling="matrix"``: one per matrix})

    S_t = \\varphi \\odot (G_t - \\beta\\,P R_t) \\qquad
    S_t \\leftarrow S_t\\cdot\\frac{\\gamma}{\\max(\\lVert S_t\\rVert / (\\lVert S_{t-1}\\rVert + 10^{-8}),\\ \\gamma)}

    W_t = W_{t-1} - \\eta_t\\,(\\alpha\\,P N_t + \\kappa\\,S_t), \\qquad
    W_t \\leftarrow W_t - \\mathrm{lr}\\cdot\\lambda\\,W_t

``variant`` selects the two documented differences between the official code (``fira==1.0.2``,
``optimizer_torch/fira_adamw.py``) and the paper:

=============  =====================================  ===========================================
variant        residual ``β``                         residual weight ``κ``
=============  =====================================  ===========================================
``official``   ``α`` (S keeps ``(1−α)`` of the        ``1`` (the code applies ``α·P N + S``)
               in-subspace part when ``α < 1``)
``paper``      ``1`` (``(I − PPᵀ)G``)                 ``α`` (``α·(P N + S)``)
=============  =====================================  ===========================================

Both compute ``φ`` from the un-bias-corrected ``N`` and let ``η_t`` carry the bias correction (the code's
way; it equals the paper's bias-corrected ``φ`` in the update up to ``ε``). Consequently the limiter
compares norms without the bias-correction factor in both variants; the paper's Algorithm 1 would see
that factor too, which grows by up to ~1.5 %/step around steps 15–30 (β = (0.9, 0.999)) and so could
trip γ = 1.01 there. ``‖S_{t−1}‖`` is the norm after limiting; the first step only records it.
The limiter is :func:`lorite.optim._lowrank.limit_norm_growth` (also usable alone, :class:`NormGrowthLimiter`).

Group keys: ``alpha`` (``scale`` is accepted as an alias, GaLore's name), ``gamma=1.01``,
``scaling="column"|"matrix"``, ``variant="official"|"paper"`` besides GaLore's. ``proj_type="full"``
needs ``scaling="matrix"`` (column factors are defined for one-sided projections). Extra state per
projected parameter: ``limiter_norm`` (one scalar; −1 until the first step).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ._lowrank import limit_norm_growth
from .galore import GaLoreAdamW, _check_number, _Chunk

FIRA_VARIANTS = ("official", "paper")
FIRA_SCALINGS = ("column", "matrix")
#: the ε of φ's denominator and of the limiter's ratio (1e-8 in the official code)
FIRA_EPS = 1e-8


class FiraAdamW(GaLoreAdamW):
    """Fira (arXiv 2410.01623), see the module docstring. Arguments as :class:`GaLoreAdamW`; the projected
    groups' defaults are ``rank=128``, ``update_proj_gap=200``, ``alpha=0.25``, ``proj_type="std"``,
    ``svd="subspace"``, ``svd_iters=2``, ``reset_moments=False``, ``gamma=1.01``, ``scaling="column"``,
    ``variant="official"`` (the pre-training scripts' rank/gap/α for 60M–350M; the code's variant).
    """

    projection_defaults: ClassVar[dict[str, Any]] = {
        "rank": 128,
        "update_proj_gap": 200,
        "alpha": 0.25,
        "proj_type": "std",
        "svd": "subspace",
        "svd_iters": 2,
        "reset_moments": False,
        "gamma": 1.01,
        "scaling": "column",
        "variant": "official",
    }
    _scale_key: ClassVar[str] = "alpha"

    @classmethod
    def _normalise_projection_keys(cls, group: dict[str, Any], where: str) -> dict[str, Any]:
        if "scale" in group:
            scale = group.pop("scale")
            if "alpha" in group and group["alpha"] != scale:
                raise ValueError(
                    f"{where}: scale={scale} and alpha={group['alpha']} disagree (scale is an alias)"
                )
            group["alpha"] = scale
        return group

    def _check_projection_group(self, group: dict[str, Any], where: str) -> None:
        super()._check_projection_group(group, where)
        _check_number(group, "gamma", where, 1.0)
        if group["variant"] not in FIRA_VARIANTS:
            raise ValueError(f"{where}: variant must be one of {FIRA_VARIANTS}, got {group['variant']!r}")
        if group["scaling"] not in FIRA_SCALINGS:
            raise ValueError(f"{where}: scaling must be one of {FIRA_SCALINGS}, got {group['scaling']!r}")
        if group["proj_type"] == "full" and group["scaling"] == "column":
            raise ValueError(
                f"{where}: proj_type='full' needs scaling='matrix' (column factors are one-sided)"
            )

    def _extra_state(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"limiter_norm": torch.full((), -1.0, dtype=dtype, device=p.device)}

    def _update(
        self,
        chunk: _Chunk,
        G: torch.Tensor,
        R: torch.Tensor,
        direction: torch.Tensor,
        step_size: float | torch.Tensor,
    ) -> torch.Tensor:
        """``η_t·(α·P N + κ·c·φ⊙(G − βPR))``, built in place in ``G`` (the step's own stacked copy).

        ``φ`` scales along the kept axis, so it commutes with the back-projection: with ``a = η_t·κ·c``
        the update is ``(aφ)⊙G + back(η_t·α·N − a·β·φ⊙R)`` — one back-projection GEMM, not two. The
        residual's norm needs no ``m × n`` pass either: for orthonormal ``P`` and ``R = PᵀG``, column
        ``j`` has ``‖G_j − βPR_j‖² = ‖G_j‖² − (2β − β²)‖R_j‖²`` (no cancellation for the official
        ``β = α < 1``; for ``β = 1`` it loses precision only where the residual is below ~1e-7 of the
        gradient, where the limited term is negligible anyway).
        """
        group, projector, bases = chunk.group, chunk.projector, chunk.bases
        alpha = group["alpha"]
        beta, kappa = (alpha, 1.0) if group["variant"] == "official" else (1.0, alpha)
        removed = 2 * beta - beta * beta  # ‖G − βPR‖² = ‖G‖² − (2β − β²)‖R‖²
        if group["scaling"] == "column":  # norms over the rank axis: one factor per kept row/column of G
            R_sq = R.square().sum(dim=-2)
            phi = torch.linalg.vector_norm(direction, dim=-2) / (R_sq.sqrt() + FIRA_EPS)
            residual_sq = (projector.kept_norms(G).square() - removed * R_sq).clamp_(min=0)
            residual_norm = (phi.square() * residual_sq).sum(dim=-1).sqrt()
        else:
            R_sq = R.square().sum(dim=(-2, -1))
            phi = torch.linalg.vector_norm(direction, dim=(-2, -1)) / (R_sq.sqrt() + FIRA_EPS)
            residual_sq = (torch.linalg.vector_norm(G, dim=(-2, -1)).square() - removed * R_sq).clamp_(min=0)
            residual_norm = phi * residual_sq.sqrt()
        limiter_norm = chunk.storage["limiter_norm"]
        factor, limited = limit_norm_growth(residual_norm, limiter_norm, group["gamma"], FIRA_EPS)
        limiter_norm.copy_(limited)
        scale = factor * (kappa * step_size)  # a = η_t·κ·c per matrix, (B,)
        if group["scaling"] == "column":
            scaled_phi = phi * scale[:, None]  # (B, kept)
            small = direction.mul_(step_size * alpha).sub_(R * (scaled_phi * beta)[:, None, :])
            projector.scale_kept_(G, scaled_phi)
        else:
            scaled_phi = phi * scale  # (B,)
            small = direction.mul_(step_size * alpha).sub_(R * (scaled_phi * beta)[:, None, None])
            G.mul_(scaled_phi[:, None, None])
        return projector.add_project_back_(G, small, bases)
