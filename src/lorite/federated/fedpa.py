"""FedPA: federated posterior averaging (Al-Shedivat, Gillenwater, Xing, Rostamizadeh, arXiv 2010.05273).

Each client approximates its local posterior by a Gaussian N(μ_k, Σ̂_k) from SGD iterates (iterate-
averaged SGD as cheap SG-MCMC: the final iterate of each local epoch after ``burn_in_epochs`` is one
sample, ℓ samples in all) and replies

    Δ_k = Σ̂_k⁻¹ (x_t − μ_k),      Σ̂_k = ρ̂ I + (1 − ρ̂) S_k,   ρ̂ = 1 / (1 + (ℓ − 1) ρ)

with S_k the sample covariance of the ℓ samples and ρ = ``shrinkage``. The server averages the Δ_k
(weighted by n_k) and applies its optimizer as FedAvg does. With ρ = 0 (Σ̂ = I) this is FedAvg with
iterate averaging.

Σ̂_k⁻¹ v is computed without forming Σ̂_k (d × d): with U the d × ℓ matrix of centred samples and
a = (1 − ρ̂)/(ℓ − 1), Woodbury's identity gives

    Σ̂_k⁻¹ v = (1/ρ̂) [ v − U (ρ̂/a · I_ℓ + UᵀU)⁻¹ Uᵀ v ],

O(ℓ² d) like the paper's dynamic-programming recursion (its Algorithm 2), and exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .core import (
    ClientData,
    ClientUpdate,
    ModelSpec,
    TensorDict,
    load_parameters,
    local_sgd,
    parameters_of,
)
from .fedavg import FedAvg, FedAvgConfig


@dataclass
class FedPAConfig(FedAvgConfig):
    """FedAvg's settings plus ``local.epochs − burn_in_epochs`` samples per client and ``shrinkage`` ρ ≥ 0."""

    burn_in_epochs: int = 1
    shrinkage: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.burn_in_epochs < self.local.epochs:
            raise ValueError("burn_in_epochs must be ≥ 0 and smaller than the local epochs")
        if self.shrinkage < 0:
            raise ValueError(f"shrinkage must be ≥ 0, got {self.shrinkage}")


def shrunk_inverse_times(samples: torch.Tensor, vector: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Σ̂⁻¹ v for Σ̂ = ρ̂ I + (1 − ρ̂) S, S the sample covariance of the rows of ``samples`` (ℓ × d)."""
    count = samples.shape[0]
    rho_hat = 1.0 / (1.0 + (count - 1) * shrinkage)
    if count < 2 or rho_hat == 1.0:
        return vector.clone()
    centred = (samples - samples.mean(0, keepdim=True)).T  # d × ℓ
    a = (1.0 - rho_hat) / (count - 1)
    small = (rho_hat / a) * torch.eye(count, dtype=samples.dtype) + centred.T @ centred
    return (vector - centred @ torch.linalg.solve(small, centred.T @ vector)) / rho_hat


class FedPA(FedAvg):
    """FedPA: see the module docstring for the math. The server is FedAvg's (state, broadcast and the
    server-optimizer step on the weighted mean of the clients' deltas); only the client's delta differs."""

    name = "fedpa"

    def __init__(self, config: FedPAConfig | None = None) -> None:
        super().__init__(config or FedPAConfig())

    def client_update(
        self,
        model: ModelSpec,
        data: ClientData,
        broadcast: TensorDict,
        config: Mapping[str, Any],
        site: TensorDict | None,
        generator: torch.Generator,
    ) -> ClientUpdate:
        local = self.config.local
        net = model.build()
        load_parameters(net, broadcast)
        names = list(broadcast)
        samples: list[torch.Tensor] = []
        epoch = [0]

        def collect(module) -> None:
            epoch[0] += 1
            if epoch[0] > self.config.burn_in_epochs:
                params = parameters_of(module)
                samples.append(torch.cat([params[k].double().flatten() for k in names]))

        n = len(data)
        loss = local_sgd(
            net,
            data,
            model.loss,
            local,
            generator,
            prior_precision=local.weight_decay * n,
            on_epoch_end=collect,
        )
        stacked = torch.stack(samples)
        x = torch.cat([broadcast[k].double().flatten() for k in names])
        delta_flat = shrunk_inverse_times(stacked, x - stacked.mean(0), self.config.shrinkage)
        delta, offset = {}, 0
        for k in names:
            size = broadcast[k].numel()
            delta[k] = delta_flat[offset : offset + size].reshape(broadcast[k].shape).to(broadcast[k].dtype)
            offset += size
        return ClientUpdate(delta, n, {"local_loss": loss})
