"""Gradient low-rank projection shared by GaLore (arXiv 2403.03507) and Fira (arXiv 2410.01623), and the
norm-growth limiter (Fira §4).

:class:`LowRankProjector` works on *stacks* of same-shape gradients ``G`` of shape ``(B, m, n)`` so that
one library call serves every matrix of a shape. It holds no tensors itself: the bases live in the
optimizer's state as plain tensors (``proj``; ``proj_right`` for ``"full"``), so ``state_dict()`` loads
with ``torch.load(weights_only=True)`` and the bases follow the parameters' device.

Sides (rank ``r``, fixed per shape):

* ``left``  — ``P ∈ R^{m×r}`` with orthonormal columns; ``R = PᵀG`` (``r×n``); back-projection ``P N``;
* ``right`` — ``Q ∈ R^{n×r}`` stored with orthonormal columns (GaLore's ``r×n`` projector is ``Qᵀ``);
  ``R = (G Q)ᵀ`` (``r×m``), back-projection ``(Q N)ᵀ``;
* ``full``  — both: ``R = PᵀGQ`` (``r×r``), back-projection ``P N Qᵀ``.

``R`` is always kept as ``r × (kept dimension)``: for ``proj_type="std"`` (compress the smaller
dimension) that is ``r × max(m, n)`` for wide and tall matrices alike. ``"reverse_std"`` swaps the side;
``"left"``/``"right"`` force it. The side is decided from the matrix shape, never from the projected
gradient's shape (GaLore's ``project_back`` pitfall). ``r = min(rank, m, n)``.

Refresh (every ``update_proj_gap`` steps) computes the top-``r`` singular subspace of ``G`` (fp32):

* ``"exact"`` — ``torch.linalg.svd``; on failure retried with the ``gesvd`` driver (CUDA), then with
  tiny jitter, then a randomized SVD, else the previous basis is kept. Each new singular vector's sign is flipped to agree with
  the previous basis's column of the same index (an SVD's signs are arbitrary; this keeps the Adam
  moments' coordinates as consistent across refreshes as the SVD allows).
* ``"subspace"`` (default) — block power (orthogonal/subspace) iteration warm-started from the previous
  basis: ``Z = orth(GᵀP)``, ``P = orth(G Z)``, ``svd_iters`` times. Only GEMMs and fp64
  Cholesky-QR of ``k × r`` blocks: batched, no host synchronisation. When the subspace is stable the basis
  keeps its coordinates (if ``P`` holds the exact singular vectors, one iteration returns ``P``
  itself, signs included), so the moments stay aligned. The very first refresh has no basis to start from
  and is exact.
* ``"lowrank"`` — ``torch.svd_lowrank`` (Halko et al.'s randomized SVD, ``niter=svd_iters``, 8
  oversampling columns), seeded by the step for reproducible resumes.

A basis that comes out non-finite (a NaN/inf gradient) is discarded and the previous one kept.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "subspace", "lowrank")
Side = Literal["left", "right", "full"]


def projection_side(shape: tuple[int, int], proj_type: str) -> Side:
    """Which side a ``(m, n)`` matrix is projected on: ``std`` compresses the smaller dimension."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type  # type: ignore[return-value]
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


@functools.lru_cache(maxsize=128)
def _fixed_gaussian(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A seeded Gaussian ``rows × cols`` (float64), drawn on ``device`` (a host-to-device copy would
    synchronise): the same on every run on that kind of device, so refreshes are reproducible."""
    generator = torch.Generator(device=device).manual_seed(rows * 1_000_003 + cols)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64, device=device)


def orthonormalize(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal columns spanning ``Y`` (``(B, k, r)``, ``r ≤ k``), and per-matrix success ``(B,)``.

    Shifted Cholesky-QR3 in float64 (Fukaya et al., arXiv 1809.11085): three passes of ``Y ← Y R⁻¹``
    with ``RᵀR = YᵀY (+ sI``, ``s = 11(kr + r(r+1))·u·‖Y‖²`` in the first pass, which makes any ``Y``
    factorisable). Only GEMMs, an ``r × r`` Cholesky and a triangular solve: batched, and no host
    synchronisation (``cholesky_ex``). ``Y`` is first scaled to unit norm and perturbed by a fixed Gaussian
    matrix at ``1e-3·√s`` (below fp32 resolution), so rank-deficient inputs — a zero gradient, a rank-2
    gradient asked for rank 4 — get orthonormal extra directions instead of a singular Gram matrix.
    Every pass's ``R`` is upper triangular with a positive diagonal, so an orthonormal ``Y`` comes back
    unchanged (columns, order and signs): warm-started refreshes keep the moments' coordinates.
    """
    k, r = Y.shape[-2:]
    X = Y.to(torch.float64)
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + 1e-300)
    shift = 11 * (k * r + r * (r + 1)) * torch.finfo(torch.float64).eps / 2
    X = X + _fixed_gaussian(k, r, Y.device) * (1e-3 * math.sqrt(shift / (k * r)))
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    ok = torch.ones(X.shape[:-2], dtype=torch.bool, device=X.device)
    for pass_shift in (shift, 0.0, 0.0):
        gram = X.mT @ X
        if pass_shift:
            gram = gram + pass_shift * eye
        L, info = torch.linalg.cholesky_ex(gram)
        ok &= info == 0
        X = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
    ok &= torch.isfinite(X).all(dim=-1).all(dim=-1)
    return X.to(Y.dtype), ok


class LowRankProjector:
    """Project stacks of ``(m, n)`` gradients onto a rank-``r`` subspace and back (see the module docstring).

    Args:
        shape: ``(m, n)`` of the weight matrices.
        rank: requested rank; the projector uses ``r = min(rank, m, n)``.
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"``, ``"right"``, ``"full"``.
        svd: refresh method, ``"subspace"`` (default), ``"exact"``, ``"lowrank"``.
        svd_iters: iterations per refresh for ``"subspace"`` / ``niter`` for ``"lowrank"``.

    Every method takes the bases as a dict of tensors (``{"proj": (B, k, r)}`` plus ``"proj_right"``
    ``(B, n, r)`` for ``"full"``) — the optimizer's state — and stacks ``(B, m, n)``.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        rank: int,
        proj_type: str = "std",
        svd: str = "subspace",
        svd_iters: int = 2,
    ) -> None:
        if len(shape) != 2:
            raise ValueError(f"low-rank projection needs a 2-D weight, got shape {tuple(shape)}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if int(rank) < 1 or int(svd_iters) < 1:
            raise ValueError(f"rank and svd_iters must be >= 1, got rank={rank}, svd_iters={svd_iters}")
        self.m, self.n = (int(s) for s in shape)
        self.side: Side = projection_side((self.m, self.n), proj_type)
        self.rank = min(int(rank), self.m, self.n)
        self.svd = svd
        self.svd_iters = int(svd_iters)
        self._warned = False

    # ------------------------------------------------------------------ shapes
    @property
    def kept_dim(self) -> int:
        """The dimension that is not compressed (``n`` for left, ``m`` for right; ``r`` for full)."""
        return {"left": self.n, "right": self.m, "full": self.rank}[self.side]

    @property
    def moment_shape(self) -> tuple[int, int]:
        """Shape of ``R`` and of Adam's moments: ``(r, kept_dim)``."""
        return (self.rank, self.kept_dim)

    @property
    def basis_shapes(self) -> dict[str, tuple[int, int]]:
        r = self.rank
        if self.side == "full":
            return {"proj": (self.m, r), "proj_right": (self.n, r)}
        return {"proj": ((self.m if self.side == "left" else self.n), r)}

    def new_bases(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zero bases (filled by the first refresh)."""
        return {k: torch.zeros((batch, *s), device=device, dtype=dtype) for k, s in self.basis_shapes.items()}

    # ------------------------------------------------------------------ projection
    def project(self, G: torch.Tensor, bases: dict[str, torch.Tensor]) -> torch.Tensor:
        """``R`` of shape ``(B, r, kept_dim)``."""
        P = bases["proj"]
        if self.side == "left":
            return torch.bmm(P.mT, G)
        if self.side == "right":
            return torch.bmm(P.mT, G.mT)  # (G Q)ᵀ; cuBLAS reads both transposes in place
        return torch.bmm(torch.bmm(P.mT, G), bases["proj_right"])

    def project_back(self, N: torch.Tensor, bases: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, m, n)`` back-projection of ``N`` (``(B, r, kept_dim)``)."""
        P = bases["proj"]
        if self.side == "left":
            return torch.bmm(P, N)
        if self.side == "right":
            return torch.bmm(N.mT, P.mT)
        return torch.bmm(torch.bmm(P, N), bases["proj_right"].mT)

    def add_project_back_(
        self, out: torch.Tensor, N: torch.Tensor, bases: dict[str, torch.Tensor], alpha: float = 1.0
    ) -> torch.Tensor:
        """``out += alpha · back(N)`` in place (one ``baddbmm``)."""
        P = bases["proj"]
        if self.side == "left":
            return out.baddbmm_(P, N, alpha=alpha)
        if self.side == "right":
            return out.baddbmm_(N.mT, P.mT, alpha=alpha)
        return out.baddbmm_(torch.bmm(P, N), bases["proj_right"].mT, alpha=alpha)

    def kept_norms(self, X: torch.Tensor) -> torch.Tensor:
        """Norms of a ``(B, m, n)`` stack along the projected axis: one per kept index, ``(B, kept_dim)``."""
        if self.side == "full":
            raise ValueError("column-wise quantities need a one-sided projector (proj_type != 'full')")
        return torch.linalg.vector_norm(X, dim=-2 if self.side == "left" else -1)

    def scale_kept_(self, X: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``X`` (``(B, m, n)``) times ``factors`` (``(B, kept_dim)``) broadcast along the projected axis."""
        if self.side == "full":
            raise ValueError("column-wise quantities need a one-sided projector (proj_type != 'full')")
        return X.mul_(factors[:, None, :] if self.side == "left" else factors[:, :, None])

    # ------------------------------------------------------------------ refresh
    def refresh(self, G: torch.Tensor, bases: dict[str, torch.Tensor], first: bool, seed: int = 0) -> None:
        """Recompute ``bases`` in place from the gradient stack ``G`` (``(B, m, n)``, fp32 at least).

        ``first``: there is no previous basis (the exact SVD is used whatever ``svd`` says, except for
        ``"lowrank"``). ``seed`` makes ``"lowrank"`` reproducible.
        """
        X = G if self.side != "right" else G.mT  # (B, k, other): the left factor of X is wanted
        if self.svd == "lowrank":
            new = self._lowrank(X, seed)
        elif self.svd == "exact" or first:
            new = self._exact(X)
        else:
            new = self._subspace(X, bases)
        if new is None:
            return
        from_svd = self.svd != "subspace" or first
        for key, basis in new.items():
            old = bases[key]
            basis = basis.to(old.dtype)
            if from_svd:
                # an SVD's signs are arbitrary: agree with the previous basis (no-op against zeros)
                agree = (basis * old).sum(dim=-2, keepdim=True)
                basis = torch.where(agree < 0, -basis, basis)
            finite = torch.isfinite(basis).all(dim=-1).all(dim=-1)
            old.copy_(torch.where(finite[:, None, None], basis, old))

    def _exact(self, X: torch.Tensor) -> dict[str, torch.Tensor] | None:
        r = self.rank
        attempts = [dict(), dict(driver="gesvd")] if X.is_cuda else [dict()]
        X32 = X if X.dtype == torch.float64 else X.float()  # fp32 SVD (fp64 weights keep fp64)
        for jitter in (False, True):
            source = X32
            if jitter:
                size = torch.linalg.vector_norm(X32, dim=(-2, -1), keepdim=True)
                noise = _fixed_gaussian(*X32.shape[-2:], X32.device).to(X32.dtype)
                source = X32 + noise * (size * 1e-6 / math.sqrt(X32.shape[-1] * X32.shape[-2]))
            for options in attempts:
                try:
                    U, _, Vh = torch.linalg.svd(source, full_matrices=False, **options)
                except RuntimeError:  # torch.linalg.LinAlgError: did not converge
                    continue
                out = {"proj": U[..., :r]}
                if self.side == "full":
                    out["proj_right"] = Vh[..., :r, :].mT
                return out
        # Last resort, before keeping the previous basis (all zeros at the first refresh, which would freeze
        # the matrix until the next refresh): a randomized SVD needs only GEMMs, a QR and a small SVD, so it
        # works where the full SVD did not converge or did not fit in memory.
        try:
            U, _, V = torch.svd_lowrank(X32, q=min(r + 8, *X32.shape[-2:]), niter=4)
            out = {"proj": U[..., :r]}
            if self.side == "full":
                out["proj_right"] = V[..., :r]
            if bool(torch.isfinite(out["proj"]).all()):  # a host sync, on this failure path only
                warnings.warn(
                    f"low-rank projector {self.m}x{self.n}: SVD failed even with jitter; used a randomized "
                    "SVD instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return out
        except RuntimeError:
            pass
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"low-rank projector {self.m}x{self.n}: SVD failed even with jitter; keeping the previous "
                "basis",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    def _subspace(self, X: torch.Tensor, bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        P = bases["proj"].to(X.dtype)
        ok = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
        for _ in range(self.svd_iters):
            Z, ok_z = orthonormalize(torch.bmm(X.mT, P))
            P, ok_p = orthonormalize(torch.bmm(X, Z))
            ok &= ok_z & ok_p
        out = {"proj": P}
        if self.side == "full":
            Q, ok_q = orthonormalize(torch.bmm(X.mT, P))
            ok &= ok_q
            out["proj_right"] = Q
        # a failed factorisation becomes non-finite, which refresh() replaces by the previous basis
        return {k: torch.where(ok[:, None, None], v, float("nan")) for k, v in out.items()}

    def _lowrank(self, X: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        r = self.rank
        q = min(r + 8, *X.shape[-2:])
        devices = [X.device] if X.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, _, V = torch.svd_lowrank(
                X if X.dtype == torch.float64 else X.float(), q=q, niter=self.svd_iters
            )
        out = {"proj": U[..., :r]}
        if self.side == "full":
            out["proj_right"] = V[..., :r]
        return out


# ---------------------------------------------------------------------- norm-growth limiter
def limit_norm_growth(
    norms: torch.Tensor, previous: torch.Tensor, gamma: float = 1.01, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter, batched and branch-free (no host synchronisation).

    .. math::
        c_t = \\frac{\\gamma}{\\max(\\lVert S_t\\rVert / (\\lVert S_{t-1}\\rVert + \\epsilon),\\ \\gamma)}

    ``norms`` are ``‖S_t‖`` (any shape), ``previous`` the stored ``‖S_{t−1}‖`` *after* limiting, or a
    negative value where there is none yet (the first call passes ``c = 1`` and only records the norm).
    Only growth beyond ``γ`` per step is limited; shrinking or constant norms pass unchanged.
    Returns ``(c, new_previous)`` with ``new_previous = c·‖S_t‖``.
    """
    ratio = norms / (previous + eps)
    factor = gamma / torch.clamp(ratio, min=gamma)
    factor = torch.where(previous < 0, torch.ones_like(factor), factor)
    return factor, factor * norms


class NormGrowthLimiter:
    """The norm-growth limiter as a reusable component: ``S ← S·c_t`` (see :func:`limit_norm_growth`).

    One scalar of state per tensor (``state["limiter_norm"]``, the previous limited norm), kept in any
    dict the caller owns (an optimizer's per-parameter state). Fira (arXiv 2410.01623, §4.2) uses
    ``gamma = 1.01``.
    """

    def __init__(self, gamma: float = 1.01, eps: float = 1e-8) -> None:
        if not gamma >= 1.0:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.gamma = float(gamma)
        self.eps = float(eps)

    def __call__(self, update: torch.Tensor, state: dict) -> torch.Tensor:
        """Scale ``update`` in place by ``c_t`` and record its limited norm in ``state``; returns it."""
        if "limiter_norm" not in state:
            state["limiter_norm"] = torch.full((), -1.0, dtype=torch.float32, device=update.device)
        norm = torch.linalg.vector_norm(update.float())
        factor, new = limit_norm_growth(norm, state["limiter_norm"], self.gamma, self.eps)
        state["limiter_norm"].copy_(new)
        return update.mul_(factor.to(update.dtype))
