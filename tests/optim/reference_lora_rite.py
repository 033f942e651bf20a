"""An independent, readable LoRA-RITE written from ../shared/specs/lora-rite.md (§2, §3) — per pair, per
factor, plain loops, no batching. The tests hold lorite's batched optimizer to this trajectory.

Orientation (PEFT): A is r×n, B is m×r, W = W0 + s·B·A. For each factor X with partner Y we use X's tall
view X̄ (A → Aᵀ, n×r; B → B, m×r); the unmagnified gradient is ḡ_X = ∇X̄ · pinv(R_Y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FactorState:
    M: torch.Tensor  # rows × r
    V: torch.Tensor  # r × r
    rho: float = 0.0
    Q_prev: torch.Tensor | None = None  # this factor's own basis at its last update (zeros at start)


@dataclass
class PairState:
    k: int = 0
    A: FactorState | None = None
    B: FactorState | None = None


@dataclass
class ReferenceLoRARite:
    """Options mirror LoRARite's; ``pairs`` is a list of (A, B) parameters updated in place."""

    pairs: list
    lr: float
    betas: tuple = (0.9, 0.999)
    eps: float = 0.0
    eps_root: float = 1e-12
    escape_mass: bool = True
    normalize_rows: bool = False
    clip_unmagnified_grad: float = 0.0
    update_skipping: float = 0.0
    update_capping: float = 0.0
    weight_decay: float = 0.0
    states: list = field(default_factory=list)

    def __post_init__(self):
        self.states = [PairState() for _ in self.pairs]

    @staticmethod
    def _tall(t, is_A):
        return t.reshape(t.shape[0], -1).T if is_A else t.reshape(t.shape[0], t.shape[1])

    @torch.no_grad()
    def step(self):
        # pass 1: QR of every factor, unmagnified gradients, skipping, global norm
        work = []
        total_sq = 0.0
        for A, B in self.pairs:
            if A.grad is None or B.grad is None:
                work.append(None)
                continue
            dt = torch.promote_types(A.dtype, torch.float32)
            Abar, Bbar = self._tall(A, True).to(dt), self._tall(B, False).to(dt)
            gA, gB = self._tall(A.grad, True).to(dt), self._tall(B.grad, False).to(dt)
            QA, RA = torch.linalg.qr(Abar)
            QB, RB = torch.linalg.qr(Bbar)
            gbar_A = gA @ torch.linalg.pinv(RB)
            gbar_B = gB @ torch.linalg.pinv(RA)
            if not (torch.isfinite(gA).all() and torch.isfinite(gB).all()):
                work.append(None)
                continue
            if self.update_skipping > 0:
                if gbar_A.pow(2).mean().sqrt() > self.update_skipping:
                    gbar_A = torch.zeros_like(gbar_A)
                if gbar_B.pow(2).mean().sqrt() > self.update_skipping:
                    gbar_B = torch.zeros_like(gbar_B)
            total_sq += float(gbar_A.pow(2).sum() + gbar_B.pow(2).sum())
            work.append(dict(Abar=Abar, Bbar=Bbar, QA=QA, RA=RA, QB=QB, RB=RB, gA=gbar_A, gB=gbar_B))
        gnorm = total_sq**0.5
        # pass 2: per pair, per factor
        for (A, B), st, w in zip(self.pairs, self.states, work):
            if w is None:
                continue
            if self.clip_unmagnified_grad > 0 and gnorm > self.clip_unmagnified_grad:
                w["gA"] = w["gA"] * (self.clip_unmagnified_grad / gnorm)
                w["gB"] = w["gB"] * (self.clip_unmagnified_grad / gnorm)
            k = st.k
            b1, b2 = self.betas
            b1h = b1 * (1 - b1**k) / (1 - b1 ** (k + 1))
            b2h = b2 * (1 - b2**k) / (1 - b2 ** (k + 1))
            new = {}
            for name, Xbar, gbar, Q_own, Q_partner, R_partner, partner in (
                ("A", w["Abar"], w["gA"], w["QA"], w["QB"], w["RB"], "B"),
                ("B", w["Bbar"], w["gB"], w["QB"], w["QA"], w["RA"], "A"),
            ):
                rows, r = Xbar.shape
                fs = getattr(st, name)
                if fs is None:
                    fs = FactorState(
                        M=torch.zeros(rows, r, dtype=Xbar.dtype), V=torch.zeros(r, r, dtype=Xbar.dtype)
                    )
                partner_state = getattr(st, partner)
                Q_partner_prev = (
                    torch.zeros_like(Q_partner)
                    if partner_state is None or partner_state.Q_prev is None
                    else partner_state.Q_prev
                )
                P = Q_partner.T @ Q_partner_prev
                V_rot = P @ fs.V @ P.T
                V_rot = (V_rot + V_rot.T) / 2
                if self.escape_mass:
                    lam_old = torch.linalg.eigvalsh(fs.V)
                    lam_new = torch.linalg.eigvalsh(V_rot)
                    d = float((lam_old - lam_new).abs().max())
                    rho = b2h * (fs.rho + d)
                else:
                    rho = 0.0
                gram = gbar.T @ gbar
                if self.normalize_rows:
                    gram = gram / rows
                V = b2h * V_rot + (1 - b2h) * gram
                V = (V + V.T) / 2
                lam, E = torch.linalg.eigh(V)
                K = E @ torch.diag(1.0 / ((lam.clamp(min=0) + rho + self.eps_root).sqrt() + self.eps)) @ E.T
                S = gbar @ K
                M = b1h * fs.M @ P.T + (1 - b1h) * S
                if self.update_capping > 0:
                    M = M / max(1.0, float(M.pow(2).mean().sqrt()) / self.update_capping)
                Xnew = Xbar - self.lr * (M @ torch.linalg.pinv(R_partner).T + self.weight_decay * Xbar)
                new[name] = (Xnew, FactorState(M=M, V=V, rho=rho, Q_prev=Q_own))
            A.copy_(new["A"][0].T.reshape(A.shape))
            B.copy_(new["B"][0].reshape(B.shape))
            st.A, st.B = new["A"][1], new["B"][1]
            st.k += 1
