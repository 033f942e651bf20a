"""FedAvg equals centralised gradient descent in the IID single-step case; FedPA's shrinkage inverse."""

from __future__ import annotations

import math

import torch
from fed_helpers import run_custom

from lorite.federated.core import LocalSGDConfig, OptimizerConfig, load_parameters, parameters_of
from lorite.federated.data import DataSpec, evaluate, initial_parameters, load_federated
from lorite.federated.fedavg import FedAvg, FedAvgConfig
from lorite.federated.fedpa import FedPA, FedPAConfig, shrunk_inverse_times


def test_fedavg_with_one_full_batch_step_equals_centralised_gradient_descent():
    task = load_federated(DataSpec(clients=4, alpha=math.inf, hidden=16))  # IID split
    lr, wd, rounds = 0.3, 1e-2, 5
    local = LocalSGDConfig(epochs=1, batch_size=10_000, lr=lr, momentum=0.0, weight_decay=wd)
    algorithm = FedAvg(FedAvgConfig(clients_per_round=4, local=local, server=OptimizerConfig(lr=1.0)))
    server = run_custom(task, algorithm, rounds=rounds, seed=0)

    # the same steps on the pooled data: mean NLL over all N examples plus wd/2·‖θ‖²
    model = task.model.build()
    load_parameters(model, initial_parameters(task, 0))
    inputs = torch.cat([c.inputs for c in task.clients])
    targets = torch.cat([c.targets for c in task.clients])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(rounds):
        loss = task.model.loss(model(inputs), targets).mean()
        loss = loss + 0.5 * wd * sum((p * p).sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    central = parameters_of(model)
    federated = server.state.tensors
    for name in central:
        assert torch.allclose(federated[name], central[name], atol=2e-6), name
    before, after = evaluate(task, initial_parameters(task, 0)), evaluate(task, federated)
    assert after["nll"] < before["nll"] - 0.05  # it learned something in 5 steps


def test_fedavg_server_momentum_and_weighting_differ_from_plain_averaging():
    task = load_federated(DataSpec(clients=4, alpha=0.3, hidden=16))
    local = LocalSGDConfig(epochs=1, batch_size=16, lr=0.1)
    plain = run_custom(task, FedAvg(FedAvgConfig(clients_per_round=4, local=local)), rounds=2).state.tensors
    config = FedAvgConfig(clients_per_round=4, local=local, server=OptimizerConfig(lr=1.0, momentum=0.9))
    momentum = run_custom(task, FedAvg(config), rounds=2)
    assert "momentum_buffer/0.weight" in momentum.state.optimizer
    assert not torch.allclose(plain["0.weight"], momentum.state.tensors["0.weight"])


def test_shrunk_inverse_matches_the_dense_inverse():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    vector = torch.randn(7, generator=gen, dtype=torch.float64)
    for rho in (0.0, 0.1, 2.0):
        count = samples.shape[0]
        rho_hat = 1 / (1 + (count - 1) * rho)
        dense = rho_hat * torch.eye(7, dtype=torch.float64) + (1 - rho_hat) * torch.cov(samples.T)
        expected = torch.linalg.solve(dense, vector)
        assert torch.allclose(shrunk_inverse_times(samples, vector, rho), expected, atol=1e-10)


def test_fedpa_without_shrinkage_is_fedavg_of_the_iterate_means():
    task = load_federated(DataSpec(clients=4, alpha=1.0, hidden=16))
    local = LocalSGDConfig(epochs=3, batch_size=32, lr=0.05)
    fedpa = FedPA(FedPAConfig(clients_per_round=2, local=local, burn_in_epochs=0, shrinkage=0.0))
    shrunk = FedPA(FedPAConfig(clients_per_round=2, local=local, burn_in_epochs=0, shrinkage=0.5))
    generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    x = initial_parameters(task, 0)
    config = {"round": 1, "total-examples": 100}
    plain = fedpa.client_update(task.model, task.clients[0], x, config, None, generator())
    # the iterate mean, by hand: the final iterate of each of the 3 epochs
    net, means = task.model.build(), []
    load_parameters(net, x)
    from lorite.federated.core import local_sgd

    local_sgd(net, task.clients[0], task.model.loss, local, generator(), local.weight_decay * len(task.clients[0]),
              on_epoch_end=lambda m: means.append(parameters_of(m)))  # fmt: skip
    for name in x:
        mean = torch.stack([m[name] for m in means]).mean(0)
        assert torch.allclose(plain.arrays[name], x[name] - mean, atol=1e-6)
    other = shrunk.client_update(task.model, task.clients[0], x, config, None, generator())
    assert not torch.allclose(other.arrays["0.weight"], plain.arrays["0.weight"])
