"""Small federated set-ups shared by the federated tests: a conjugate Gaussian model and tiny digits runs."""

from __future__ import annotations

import torch
from torch import nn

from lorite.federated.core import ClientData, ModelSpec, config_to_dict
from lorite.federated.data import DataSpec, FederatedTask
from lorite.federated.runner import run_inprocess
from lorite.federated.server import FederatedServer, RunSpec


class GaussianMean(nn.Module):
    """y ~ N(θ, diag σ²): the model's output is θ for every example."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def gaussian_task(
    sizes: list[int], dim: int = 3, seed: int = 0, unit_sample_variance: bool = False
) -> tuple[FederatedTask, torch.Tensor]:
    """Clients with Gaussian samples; returns the task and σ² (per coordinate).

    With ``unit_sample_variance`` every client's samples are standardised to sample variance σ² = 1 (ML,
    denominator n) around their own mean, so the empirical Fisher at the client's MLE equals the Hessian."""
    gen = torch.Generator().manual_seed(seed)
    sigma2 = torch.ones(dim) if unit_sample_variance else 0.5 + torch.rand(dim, generator=gen)
    clients = []
    for k, n in enumerate(sizes):
        center = torch.randn(dim, generator=gen) + k
        y = center + sigma2.sqrt() * torch.randn(n, dim, generator=gen)
        if unit_sample_variance:
            y = (y - y.mean(0)) / y.std(0, unbiased=False) + y.mean(0)
        clients.append(ClientData(torch.zeros(n, 1), y))
    loss = lambda out, y: 0.5 * ((y - out) ** 2 / sigma2).sum(-1)  # noqa: E731
    task = FederatedTask(
        spec=DataSpec(clients=len(sizes)),
        clients=clients,
        test=clients[0],
        model_spec=ModelSpec(build=lambda: GaussianMean(dim), loss=loss),
    )
    return task, sigma2


def exact_posterior(task: FederatedTask, sigma2: torch.Tensor, prior_precision_per_example: float = 0.0):
    """(mean, precision) of p(θ | all data) ∝ Π_i N(y_i; θ, σ²) · N(θ; 0, (wd·N)⁻¹)."""
    y = torch.cat([c.targets for c in task.clients]).double()
    n = y.shape[0]
    precision = n / sigma2.double() + prior_precision_per_example * n
    return (y.sum(0) / sigma2.double()) / precision, precision


def run_custom(task: FederatedTask, algorithm, rounds: int, seed: int = 0, out=None, reply_hook=None):
    """Run ``algorithm`` in process on ``task``; returns the server."""
    spec = RunSpec(
        algorithm=algorithm.name,
        algorithm_config=config_to_dict(algorithm.config),
        data=DataSpec(clients=len(task.clients)),
        rounds=rounds,
        seed=seed,
    )
    server = FederatedServer(spec, out, task=task, algorithm=algorithm, progress=None)
    run_inprocess(server, reply_hook=reply_hook)
    return server


def digits_spec(
    algorithm: str = "fedep", rounds: int = 3, clients: int = 4, per_round: int = 2, **extra
) -> RunSpec:
    """A tiny digits run (2 local epochs of batch 32) for fast end-to-end tests."""
    config = {"clients_per_round": per_round, "local": {"epochs": 2, "batch_size": 32, "lr": 0.05}}
    config.update(extra.pop("algorithm_config", {}))
    return RunSpec(
        algorithm=algorithm,
        algorithm_config=config,
        data=DataSpec(clients=clients, alpha=extra.pop("alpha", 1.0), hidden=16),
        rounds=rounds,
        **extra,
    )
