"""FedEP: federated learning as expectation propagation (Guo, Greengard, Wang, Gelman, Kim, Xing,
"Federated Learning as Variational Inference: A Scalable Expectation Propagation Approach", ICLR 2023,
arXiv 2302.04228).

The global posterior p(θ | D) ∝ Π_k p(D_k | θ) is approximated by q(θ) = Π_k q_k(θ), every factor a
diagonal Gaussian in natural parameters (η = Λ μ, Λ the diagonal precision): products add (η, Λ),
quotients subtract, powers scale. One round for a sampled client k with n_k of the N examples:

* cavity  — ``ep``: q_{−k} = q / q_k (stored site); ``sep`` (stateless, FedSEP): q_{−k} = q^{1 − n_k/N};
  ``adf``: q_{−k} = q;
* tilted  — p̂_k(θ) ∝ p(D_k | θ) · q_{−k}(θ) · N(θ; 0, (wd·n_k)⁻¹ I), i.e. the local objective
  ``[Σ_i NLL_i(θ) + ½ θᵀΛ_p θ − η_pᵀ θ] / n_k`` with (η_p, Λ_p) = (η_{−k}, Λ_{−k} + wd·n_k);
* project — q̂_k = N(μ̂, diag Λ̂⁻¹) ≈ p̂_k: μ̂ is the running mean of the final iterates of the local
  SGD epochs started at the server mean (iterate-averaged SGD, a cheap SG-MCMC), and
  Λ̂ = Λ_{−k} + Λ_local with Λ_local from one of the estimators below;
* delta   — Δ_k = q̂_k / q = (η̂ − η, Λ̂ − Λ), clipped by global norm (optional), damped: Δ_k ← δ·Δ_k
  (δ = 1/K by default, or a decay 0.5 → 1/K);
* client  — ``ep``: q_k ← ClientOpt(q_k, Δ_k) (SGD lr 1: q_k·Δ_k);
* server  — q ← ServerOpt(q, Σ_k Δ_k); with SGD lr 1, no momentum, this is exact damped EP and keeps
  q = Π_k q_k.

Local precision estimators (``estimator``), each rescaled as Λ_local = scale · (Λ_tilted − Λ_{−k}):

* ``identity`` (the paper's recommended default): Λ_local = scale · (wd + initial_precision_scale) · n_k,
  no data-dependent curvature;
* ``laplace``: Λ_local = scale · (F + wd·n_k), F = Σ_i (∇NLL_i(μ̂))² the exact diagonal empirical Fisher
  at μ̂ (per-example gradients with ``torch.func``), clipped to mean ± clip_ratio · std;
* ``mcmc``: Σ = ρ + (1 − ρ)·s², s² the sample variance of the iterates, ρ = ``shrinkage``; 1/Σ clipped
  to mean ± clip_ratio · std and rescaled to the Frobenius norm of the identity estimator's Λ_local.

The server starts from the initial (or FedAvg warm-start) parameters x₀ with Σ = c/N,
c = 1/((initial_precision_scale + wd) · scale) (spec §6); a client's site is created on its first
round as its share q^{n_k/N} of the current q — the reference's Σ_k = c/n_k when that is round one.
Precisions that a quotient or a step drives below ``min_precision`` are floored there, keeping the
mean, and counted in the round's metrics (``cavity_floored``, ``server_floored``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from .core import (
    Algorithm,
    ClientData,
    ClientUpdate,
    LocalSGDConfig,
    ModelSpec,
    OptimizerConfig,
    ServerState,
    TensorDict,
    Welford,
    clip_by_global_norm,
    global_norm,
    load_parameters,
    local_sgd,
    optimizer_step,
    parameters_of,
)

MODES = ("ep", "sep", "adf")
ESTIMATORS = ("identity", "laplace", "mcmc")


# ------------------------------------------------------------------------------------ Gaussian algebra
@dataclass
class DiagGaussianNat:
    """A diagonal Gaussian per parameter tensor in natural parameters: ``eta`` = Λμ, ``lam`` = Λ."""

    eta: TensorDict
    lam: TensorDict

    @classmethod
    def from_mean(
        cls, mean: Mapping[str, torch.Tensor], precision: Mapping[str, torch.Tensor]
    ) -> DiagGaussianNat:
        return cls({k: precision[k] * mean[k] for k in mean}, {k: precision[k].clone() for k in mean})

    def __mul__(self, other: DiagGaussianNat) -> DiagGaussianNat:
        """The product of two Gaussian densities (normalised): natural parameters add."""
        return DiagGaussianNat(
            {k: v + other.eta[k] for k, v in self.eta.items()},
            {k: v + other.lam[k] for k, v in self.lam.items()},
        )

    def __truediv__(self, other: DiagGaussianNat) -> DiagGaussianNat:
        """The quotient: natural parameters subtract (the precision may become ≤ 0: see :meth:`floored`)."""
        return DiagGaussianNat(
            {k: v - other.eta[k] for k, v in self.eta.items()},
            {k: v - other.lam[k] for k, v in self.lam.items()},
        )

    def power(self, exponent: float) -> DiagGaussianNat:
        """q^a: both natural parameters times a (used for damping and the SEP site q^{n_k/N})."""
        return DiagGaussianNat(
            {k: v * exponent for k, v in self.eta.items()}, {k: v * exponent for k, v in self.lam.items()}
        )

    def mean(self, min_precision: float = 0.0) -> TensorDict:
        """μ = η / Λ (Λ floored at ``min_precision`` to stay finite)."""
        return {k: v / self.lam[k].clamp_min(min_precision) for k, v in self.eta.items()}

    def floored(
        self, min_precision: float, fallback_mean: Mapping[str, torch.Tensor]
    ) -> tuple[DiagGaussianNat, int]:
        """Λ < min_precision → Λ = min_precision and η = min_precision · fallback mean; returns the count."""
        eta, lam, count = {}, {}, 0
        for k, v in self.lam.items():
            bad = v < min_precision
            count += int(bad.sum())
            lam[k] = torch.where(bad, torch.full_like(v, min_precision), v)
            eta[k] = torch.where(bad, min_precision * fallback_mean[k], self.eta[k])
        return DiagGaussianNat(eta, lam), count

    def numel(self) -> int:
        return sum(v.numel() for v in self.lam.values())

    def flat(self) -> TensorDict:
        """``{"eta/<name>": η, "lam/<name>": Λ}`` — how the statistics travel and are stored."""
        return {
            **{f"eta/{k}": v for k, v in self.eta.items()},
            **{f"lam/{k}": v for k, v in self.lam.items()},
        }

    @classmethod
    def from_flat(cls, tensors: Mapping[str, torch.Tensor]) -> DiagGaussianNat:
        eta = {k[4:]: v for k, v in tensors.items() if k.startswith("eta/")}
        lam = {k[4:]: v for k, v in tensors.items() if k.startswith("lam/")}
        if set(eta) != set(lam) or not eta:
            raise ValueError("natural parameters need matching 'eta/<name>' and 'lam/<name>' tensors")
        return cls(eta, lam)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class FedEPConfig:
    """FedEP settings (spec §2–§6; defaults follow the reference's global defaults where it has them).

    ``local``: the SGD that draws the iterates (``epochs`` = number of samples, ``lr`` = sample learning
    rate, ``weight_decay`` = wd). ``server``/``client``: optimizers on natural parameters (SGD lr 1, no
    momentum = exact damped EP). ``damping``: δ (None → 1/K); ``damping_schedule`` ``"decay"`` goes
    linearly from 0.5 to δ over ``damping_decay_rounds`` rounds. ``max_delta_norm``: global-norm clip of
    each Δ_k (None: off)."""

    clients_per_round: int = 10
    local: LocalSGDConfig = field(default_factory=LocalSGDConfig)
    mode: str = "ep"
    estimator: str = "identity"
    scale: float = 1.0
    initial_precision_scale: float = 0.0
    shrinkage: float = 1e-4
    clip_ratio: float = 2.0
    max_delta_norm: float | None = None
    damping: float | None = None
    damping_schedule: str = "constant"
    damping_decay_rounds: int = 10
    server: OptimizerConfig = field(default_factory=OptimizerConfig)
    client: OptimizerConfig = field(default_factory=OptimizerConfig)
    min_precision: float = 1e-8

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be ≥ 1, got {self.clients_per_round}")
        if self.mode not in MODES:
            raise ValueError(f"FedEP mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"FedEP estimator {self.estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.local.weight_decay + self.initial_precision_scale <= 0:
            raise ValueError(
                "FedEP needs weight_decay > 0 or initial_precision_scale > 0: the initial covariance "
                "c = 1/((initial_precision_scale + wd)·scale) and the identity precision are degenerate otherwise"
            )
        if self.estimator == "mcmc" and self.local.epochs < 2:
            raise ValueError("the mcmc estimator needs ≥ 2 local epochs (a sample variance)")
        if not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.clip_ratio <= 0:
            raise ValueError(f"clip_ratio must be > 0, got {self.clip_ratio}")
        if self.damping is not None and not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.damping_schedule not in ("constant", "decay"):
            raise ValueError(f"damping_schedule {self.damping_schedule!r}: use constant or decay")
        if self.max_delta_norm is not None and not self.max_delta_norm > 0:
            raise ValueError(f"max_delta_norm must be > 0, got {self.max_delta_norm}")
        if not self.min_precision > 0:
            raise ValueError(f"min_precision must be > 0, got {self.min_precision}")


@dataclass
class TiltedProblem:
    """What local inference sees: the model, the shard, the tilted objective's (Λ_p, η_p), the start
    point (server mean) and the batch generator."""

    model: ModelSpec
    data: ClientData
    prior_precision: TensorDict
    prior_shift: TensorDict
    cavity: DiagGaussianNat
    start: TensorDict
    generator: torch.Generator


# (mean μ̂, local precision Λ_local, last-epoch loss)
LocalInference = Callable[[TiltedProblem], tuple[TensorDict, TensorDict, float]]


def _clip_to_band(values: TensorDict, ratio: float) -> TensorDict:
    """Clip every entry to mean ± ratio·std, the statistics taken over all entries together."""
    flat = torch.cat([v.flatten().double() for v in values.values()])
    mean, std = float(flat.mean()), float(flat.std()) if flat.numel() > 1 else 0.0
    return {k: v.clamp(mean - ratio * std, mean + ratio * std) for k, v in values.items()}


def empirical_fisher_diagonal(
    model: ModelSpec, params: TensorDict, data: ClientData, chunk: int = 256
) -> TensorDict:
    """F = Σ_i (∇_θ NLL_i(θ))², exact, from per-example gradients (``torch.func.vmap(grad(·))``)."""
    net = model.build()
    load_parameters(net, params)
    frozen = {k: v.detach() for k, v in net.named_parameters() if k not in params}
    buffers = dict(net.named_buffers())

    def nll(p, x, y):
        out = functional_call(net, ({**p, **frozen}, buffers), (x.unsqueeze(0),))
        return model.loss(out, y.unsqueeze(0)).sum()

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, len(data), chunk):
        grads = per_example(params, data.inputs[start : start + chunk], data.targets[start : start + chunk])
        for k in fisher:
            fisher[k] += grads[k].pow(2).sum(0)
    return fisher


class FedEP(Algorithm):
    """FedEP / FedSEP / ADF with diagonal Gaussians: see the module docstring for the math.

    ``local_inference`` replaces the SGD-iterate inference (for tests with exact local posteriors); it is
    an in-process option only (a Flower client builds the algorithm from its config)."""

    name = "fedep"

    def __init__(
        self, config: FedEPConfig | None = None, local_inference: LocalInference | None = None
    ) -> None:
        super().__init__(config or FedEPConfig())
        self.stateful_clients = self.config.mode == "ep"
        self.local_inference = local_inference or self._sgd_inference

    # ---------------------------------------------------------------- server side
    def initial_precision(self, examples: int) -> float:
        """n / c with c = 1/((initial_precision_scale + wd)·scale): the precision of Σ = c/n (spec §6)."""
        cfg = self.config
        return examples * (cfg.initial_precision_scale + cfg.local.weight_decay) * cfg.scale

    def init_state(self, params: TensorDict, client_sizes: list[int]) -> ServerState:
        initial = {k: v.detach().float().clone() for k, v in params.items()}
        lam = {k: torch.full_like(v, self.initial_precision(sum(client_sizes))) for k, v in initial.items()}
        q = DiagGaussianNat.from_mean(initial, lam)
        extra = {}
        if self.config.mode == "ep":  # x₀ for the sites of clients not seen yet, and who has been seen
            extra = {**{f"init/{k}": v for k, v in initial.items()}, "seen": torch.zeros(len(client_sizes))}
        return ServerState(q.flat(), extra=extra)

    def broadcast(self, state: ServerState) -> TensorDict:
        return state.tensors

    def client_payload(self, state: ServerState, client: int) -> TensorDict:
        """The broadcast, plus x₀ (``init/<name>``) for a client that has no site yet (EP): its site starts
        as q₀^{n_k/N}, the reference's Σ_k = c/n_k around x₀, so that q = Π_k q_k holds from the start."""
        if self.config.mode != "ep" or bool(state.extra["seen"][client]):
            return state.tensors
        return {**state.tensors, **{k: v for k, v in state.extra.items() if k.startswith("init/")}}

    def after_round(self, state: ServerState, participants: list[int]) -> None:
        if self.config.mode == "ep":
            state.extra["seen"][participants] = 1.0

    def damping(self, round_: int) -> float:
        cfg = self.config
        final = cfg.damping if cfg.damping is not None else 1.0 / cfg.clients_per_round
        if cfg.damping_schedule == "constant":
            return final
        progress = min(1.0, max(0, round_ - 1) / max(1, cfg.damping_decay_rounds))
        return max(final, 0.5 + (final - 0.5) * progress) if final < 0.5 else final

    def round_config(
        self, state: ServerState, round_: int, total_examples: int
    ) -> dict[str, float | int | str]:
        return {"round": round_, "total-examples": total_examples, "damping": self.damping(round_)}

    def aggregate(
        self, state: ServerState, updates: list[ClientUpdate], round_: int
    ) -> tuple[ServerState, dict[str, float]]:
        q = DiagGaussianNat.from_flat(state.tensors)
        old_mean = q.mean(self.config.min_precision)
        total = {k: torch.zeros_like(v) for k, v in state.tensors.items()}
        for u in updates:  # the product of the damped deltas: natural parameters add
            for k, v in u.arrays.items():
                total[k] += v
        stepped, opt_state = optimizer_step(self.config.server, state.tensors, total, state.optimizer)
        new_q, floored = DiagGaussianNat.from_flat(stepped).floored(self.config.min_precision, old_mean)
        metrics = {
            "delta_norm": global_norm(total),
            "server_floored": floored / q.numel(),
            "cavity_floored": sum(u.metrics.get("cavity_floored", 0.0) for u in updates) / len(updates),
        }
        return ServerState(new_q.flat(), opt_state, state.extra), metrics

    def model_parameters(self, state: ServerState) -> TensorDict:
        return DiagGaussianNat.from_flat(state.tensors).mean(self.config.min_precision)

    # ---------------------------------------------------------------- client side
    def cavity(
        self,
        q: DiagGaussianNat,
        site: DiagGaussianNat | None,
        n: int,
        total: int,
        initial_mean: TensorDict | None = None,
    ) -> tuple[DiagGaussianNat, DiagGaussianNat | None]:
        """(cavity, site used) for the configured mode. A client without a site starts from q₀^{n_k/N}
        (``initial_mean`` = x₀ given) or, if the server did not send x₀ (it believes the client has a
        site that was lost), from its share q^{n_k/N} of the current approximation."""
        mode = self.config.mode
        if mode == "adf":
            return q, None
        if mode == "sep":
            return q.power(1.0 - n / total), None
        if site is None and initial_mean:
            precision = self.initial_precision(n)
            site = DiagGaussianNat.from_mean(
                initial_mean, {k: torch.full_like(v, precision) for k, v in initial_mean.items()}
            )
        elif site is None:
            site = q.power(n / total)
        return q / site, site

    def client_update(
        self,
        model: ModelSpec,
        data: ClientData,
        broadcast: TensorDict,
        config: Mapping[str, Any],
        site: TensorDict | None,
        generator: torch.Generator,
    ) -> ClientUpdate:
        cfg = self.config
        n, total = len(data), int(config["total-examples"])
        if not 0 < n <= total:
            raise ValueError(f"client has {n} examples but the federation reports {total} in all")
        q = DiagGaussianNat.from_flat({k: v for k, v in broadcast.items() if not k.startswith("init/")})
        initial_mean = {k[5:]: v for k, v in broadcast.items() if k.startswith("init/")}
        server_mean = q.mean(cfg.min_precision)
        site_q = DiagGaussianNat.from_flat(_site_part(site)) if site else None
        cavity, site_q = self.cavity(q, site_q, n, total, initial_mean)
        cavity, floored = cavity.floored(cfg.min_precision, server_mean)
        problem = TiltedProblem(
            model=model,
            data=data,
            prior_precision={k: v + cfg.local.weight_decay * n for k, v in cavity.lam.items()},
            prior_shift=cavity.eta,
            cavity=cavity,
            start=server_mean,
            generator=generator,
        )
        mean_hat, local_precision, loss = self.local_inference(problem)
        lam_hat = {k: cavity.lam[k] + local_precision[k].to(cavity.lam[k].dtype) for k in cavity.lam}
        q_hat = DiagGaussianNat.from_mean({k: v.to(lam_hat[k].dtype) for k, v in mean_hat.items()}, lam_hat)
        delta = (q_hat / q).flat()
        delta, norm = clip_by_global_norm(delta, cfg.max_delta_norm)
        damping = float(config["damping"])
        delta = {k: damping * v for k, v in delta.items()}
        metrics = {"local_loss": loss, "cavity_floored": floored / q.numel(), "delta_norm": norm}
        new_site = None
        if cfg.mode == "ep":
            opt_state = {k[4:]: v for k, v in (site or {}).items() if k.startswith("opt:")}
            stepped, opt_state = optimizer_step(cfg.client, site_q.flat(), delta, opt_state)
            new_site = {**stepped, **{f"opt:{k}": v for k, v in opt_state.items()}}
        return ClientUpdate(delta, n, metrics, new_site)

    def _sgd_inference(self, problem: TiltedProblem) -> tuple[TensorDict, TensorDict, float]:
        """μ̂ from iterate-averaged SGD on the tilted objective, Λ_local from the configured estimator."""
        cfg = self.config
        net = problem.model.build()
        load_parameters(net, problem.start)
        samples = Welford()
        loss = local_sgd(
            net,
            problem.data,
            problem.model.loss,
            cfg.local,
            problem.generator,
            prior_precision=problem.prior_precision,
            prior_shift=problem.prior_shift,
            on_epoch_end=lambda module: samples.add(parameters_of(module)),
        )
        mean = {k: v.float() for k, v in samples.mean.items()}
        n = len(problem.data)
        identity = cfg.scale * (cfg.local.weight_decay + cfg.initial_precision_scale) * n
        if cfg.estimator == "identity":
            local = {k: torch.full_like(v, identity) for k, v in mean.items()}
        elif cfg.estimator == "laplace":
            fisher = _clip_to_band(
                empirical_fisher_diagonal(problem.model, mean, problem.data), cfg.clip_ratio
            )
            local = {
                k: cfg.scale * (v.clamp_min(0.0) + cfg.local.weight_decay * n) for k, v in fisher.items()
            }
        else:  # mcmc: shrunk sample variance of the iterates, rescaled to the identity estimator's norm
            variance = samples.variance()
            rho = cfg.shrinkage
            precision = {k: 1.0 / (rho + (1 - rho) * v).clamp_min(1e-12) for k, v in variance.items()}
            precision = {k: v.clamp_min(0.0) for k, v in _clip_to_band(precision, cfg.clip_ratio).items()}
            norm = global_norm(precision)
            target = identity * sum(v.numel() for v in precision.values()) ** 0.5
            if norm > 0:
                local = {k: (v * (target / norm)).float() for k, v in precision.items()}
            else:  # all-zero after clipping (cannot happen with finite iterates): fall back to identity
                local = {k: torch.full_like(v, identity) for k, v in mean.items()}
        return mean, local, loss


def _site_part(site: Mapping[str, torch.Tensor]) -> TensorDict:
    return {k: v for k, v in site.items() if k.startswith(("eta/", "lam/"))}
