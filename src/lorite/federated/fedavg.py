"""FedAvg (McMahan et al., arXiv 1602.05629) with a server optimizer (FedOpt: Reddi et al., arXiv 2003.00295).

Round t, sampled clients S_t (|S_t| = K), client k holding n_k examples:

* client: from x_t, ``local.epochs`` epochs of SGD with momentum on the mean NLL plus the weight-decay
  prior, ``f_k(θ) = (1/n_k) Σ_i NLL_i(θ) + (wd/2)‖θ‖²``; reply ``Δ_k = x_t − θ_k`` (final iterate);
* server: pseudo-gradient ``g_t = Σ_k n_k Δ_k / Σ_k n_k`` and ``x_{t+1} = ServerOpt(x_t, g_t)``;
  with SGD, lr 1, no momentum, ``x_{t+1}`` is the n_k-weighted mean of the client iterates (plain FedAvg).

With one local full-batch step (batch ≥ n_k, epochs 1, no client momentum) and all clients sampled,
``g_t = lr_client · ∇ (1/N) Σ_i NLL_i(x_t) + lr_client · wd · x_t``: one step of centralised gradient
descent on the pooled data, as the tests check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .core import (
    Algorithm,
    ClientData,
    ClientUpdate,
    LocalSGDConfig,
    ModelSpec,
    OptimizerConfig,
    ServerState,
    TensorDict,
    load_parameters,
    local_sgd,
    optimizer_step,
    parameters_of,
)


@dataclass
class FedAvgConfig:
    """FedAvg settings: K = ``clients_per_round``; ``local`` client SGD; ``server`` optimizer applied to the
    weighted mean delta (spec §7: SGD, momentum 0.9 in the FedEP paper's baselines)."""

    clients_per_round: int = 10
    local: LocalSGDConfig = field(default_factory=LocalSGDConfig)
    server: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be ≥ 1, got {self.clients_per_round}")


def weighted_mean(updates: list[ClientUpdate]) -> TensorDict:
    """``Σ_k n_k a_k / Σ_k n_k`` over the clients' arrays."""
    total = sum(u.num_examples for u in updates)
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in updates[0].arrays.items()}
    for u in updates:
        for k, v in u.arrays.items():
            out[k] += v.double() * (u.num_examples / total)
    return {k: v.to(updates[0].arrays[k].dtype) for k, v in out.items()}


class FedAvg(Algorithm):
    """FedAvg: see the module docstring for the math."""

    name = "fedavg"

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        super().__init__(config or FedAvgConfig())

    def init_state(self, params: TensorDict, client_sizes: list[int]) -> ServerState:
        return ServerState({k: v.detach().clone().float() for k, v in params.items()})

    def broadcast(self, state: ServerState) -> TensorDict:
        return state.tensors

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
        n = len(data)
        loss = local_sgd(net, data, model.loss, local, generator, prior_precision=local.weight_decay * n)
        final = parameters_of(net)
        delta = {k: broadcast[k] - final[k] for k in broadcast}
        return ClientUpdate(delta, n, {"local_loss": loss})

    def aggregate(
        self, state: ServerState, updates: list[ClientUpdate], round_: int
    ) -> tuple[ServerState, dict[str, float]]:
        pseudo_gradient = weighted_mean(updates)
        # ServerOpt steps along −gradient; optimizer_step takes the update direction, so pass −g.
        params, opt_state = optimizer_step(
            self.config.server, state.tensors, {k: -v for k, v in pseudo_gradient.items()}, state.optimizer
        )
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in pseudo_gradient.values())))
        return ServerState(params, opt_state, state.extra), {"update_norm": norm}

    def model_parameters(self, state: ServerState) -> TensorDict:
        return state.tensors
