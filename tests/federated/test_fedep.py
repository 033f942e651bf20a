"""FedEP: Gaussian algebra, exactness on conjugate Gaussian models, damping fixed point, SEP vs EP, the
q = Π q_k invariant, the estimators and the positivity guards."""

from __future__ import annotations

import pytest
import torch
from fed_helpers import exact_posterior, gaussian_task, run_custom

from lorite.federated.core import ClientUpdate, LocalSGDConfig, ServerState
from lorite.federated.data import DataSpec, load_federated
from lorite.federated.fedep import DiagGaussianNat, FedEP, FedEPConfig, TiltedProblem


def _q(seed: int, shape=(3,)) -> DiagGaussianNat:
    gen = torch.Generator().manual_seed(seed)
    mean, lam = torch.randn(shape, generator=gen), 0.5 + torch.rand(shape, generator=gen)
    return DiagGaussianNat.from_mean({"w": mean}, {"w": lam})


def test_gaussian_algebra():
    a, b = _q(0), _q(1)
    product = a * b
    # the product of two Gaussian densities: precisions add, mean is precision-weighted
    expected_mean = (a.lam["w"] * a.mean()["w"] + b.lam["w"] * b.mean()["w"]) / (a.lam["w"] + b.lam["w"])
    assert torch.allclose(product.mean()["w"], expected_mean)
    back = product / b
    assert torch.allclose(back.eta["w"], a.eta["w"]) and torch.allclose(back.lam["w"], a.lam["w"])
    half = a.power(0.5)
    assert torch.allclose((half * half).lam["w"], a.lam["w"]) and torch.allclose(
        half.mean()["w"], a.mean()["w"]
    )
    assert DiagGaussianNat.from_flat(a.flat()).lam["w"].equal(a.lam["w"])
    negative = a / a.power(2.0)  # precision −Λ
    floored, count = negative.floored(1e-3, {"w": torch.full((3,), 7.0)})
    assert count == 3 and torch.allclose(floored.mean()["w"], torch.full((3,), 7.0))


def exact_inference(sigma2: torch.Tensor):
    """Exact local posterior of the Gaussian model: the tilted distribution is Gaussian."""

    def infer(problem: TiltedProblem):
        y = problem.data.targets
        n = y.shape[0]
        precision = problem.prior_precision["theta"] + n / sigma2
        mean = (problem.prior_shift["theta"] + y.sum(0) / sigma2) / precision
        return {"theta": mean}, {"theta": precision - problem.cavity.lam["theta"]}, 0.0

    return infer


def _exact_config(k: int, damping: float | None, mode: str = "ep") -> FedEPConfig:
    # flat prior (wd = 0); the initial covariance comes from initial_precision_scale
    local = LocalSGDConfig(weight_decay=0.0)
    return FedEPConfig(
        clients_per_round=k, local=local, initial_precision_scale=0.5, damping=damping, mode=mode
    )


def _server_posterior(server) -> tuple[torch.Tensor, torch.Tensor]:
    q = DiagGaussianNat.from_flat(server.state.tensors)
    return q.mean()["theta"].double(), q.lam["theta"].double()


def test_one_sweep_of_undamped_ep_with_exact_local_inference_is_the_exact_posterior():
    task, sigma2 = gaussian_task([7, 12, 20])
    algorithm = FedEP(_exact_config(3, damping=1.0), local_inference=exact_inference(sigma2))
    server = run_custom(task, algorithm, rounds=1)
    mean, precision = _server_posterior(server)
    true_mean, true_precision = exact_posterior(task, sigma2)
    assert torch.allclose(precision, true_precision, rtol=1e-5)
    assert torch.allclose(mean, true_mean, rtol=1e-5, atol=1e-5)


def test_damped_ep_converges_to_the_same_fixed_point_and_keeps_q_the_product_of_sites():
    task, sigma2 = gaussian_task([7, 12, 20, 9])
    algorithm = FedEP(_exact_config(2, damping=None), local_inference=exact_inference(sigma2))  # δ = 1/K
    server = run_custom(task, algorithm, rounds=60, seed=3)
    mean, precision = _server_posterior(server)
    true_mean, true_precision = exact_posterior(task, sigma2)
    assert torch.allclose(precision, true_precision, rtol=1e-3)
    assert torch.allclose(mean, true_mean, rtol=1e-3, atol=1e-3)
    # with server and client SGD at lr 1 and no momentum, q stays the product of the sites
    sites = [
        DiagGaussianNat.from_flat({k: v for k, v in s.items() if not k.startswith("opt:")})
        for s in server.sites.values()
    ]
    assert len(sites) == 4
    total = sum(s.lam["theta"].double() for s in sites)
    assert torch.allclose(total, precision, rtol=1e-5)


def test_one_client_fedep_with_sgd_iterates_and_laplace_recovers_the_exact_posterior():
    # one client, flat prior, σ² = the sample variance: the empirical Fisher at the MLE is the Hessian n/σ²
    task, sigma2 = gaussian_task([50], unit_sample_variance=True, seed=1)
    local = LocalSGDConfig(epochs=40, batch_size=50, lr=0.7, momentum=0.0, weight_decay=0.0)
    config = FedEPConfig(
        clients_per_round=1, local=local, estimator="laplace", initial_precision_scale=0.1, clip_ratio=10.0
    )
    server = run_custom(task, FedEP(config), rounds=4)
    mean, precision = _server_posterior(server)
    true_mean, true_precision = exact_posterior(task, sigma2)
    assert torch.allclose(mean, true_mean, atol=1e-4)
    assert torch.allclose(precision, true_precision, rtol=1e-3)
    # and the identity estimator (wd > 0 prior) recovers the exact posterior mean
    local = LocalSGDConfig(epochs=40, batch_size=50, lr=0.5, momentum=0.0, weight_decay=0.2)
    server = run_custom(task, FedEP(FedEPConfig(clients_per_round=1, local=local)), rounds=4)
    mean, _ = _server_posterior(server)
    assert torch.allclose(mean, exact_posterior(task, sigma2, 0.2)[0], atol=1e-4)


def test_sep_equals_ep_while_the_sites_are_the_shares_of_q():
    task, sigma2 = gaussian_task([7, 12, 20])
    results = {}
    for mode in ("ep", "sep"):
        algorithm = FedEP(_exact_config(3, damping=0.5, mode=mode), local_inference=exact_inference(sigma2))
        results[mode] = run_custom(task, algorithm, rounds=1).state.tensors
    for key in results["ep"]:
        assert torch.allclose(results["ep"][key], results["sep"][key], rtol=1e-6)


def test_delta_is_the_site_change_and_the_guard_floors_negative_precisions():
    task, sigma2 = gaussian_task([5, 5])
    algorithm = FedEP(_exact_config(2, damping=1.0), local_inference=exact_inference(sigma2))
    state = algorithm.init_state({"theta": torch.ones(3)}, [5, 5])
    config = algorithm.round_config(state, 1, 10)
    payload = algorithm.client_payload(state, 0)  # first round: q and x₀
    assert set(payload) == {"eta/theta", "lam/theta", "init/theta"}
    update = algorithm.client_update(task.model, task.clients[0], payload, config, None, torch.Generator())
    old_site = DiagGaussianNat.from_flat(state.tensors).power(0.5)
    new_site = DiagGaussianNat.from_flat({k: v for k, v in update.site.items() if not k.startswith("opt:")})
    change = new_site / old_site
    assert torch.allclose(change.lam["theta"], update.arrays["lam/theta"])
    assert torch.allclose(change.eta["theta"], update.arrays["eta/theta"])
    # a delta that drives the precision negative: floored, counted, the old mean kept
    q = DiagGaussianNat.from_flat(state.tensors)
    harmful = ClientUpdate({"eta/theta": torch.zeros(3), "lam/theta": -2 * q.lam["theta"]}, 5)
    new_state, metrics = algorithm.aggregate(ServerState(dict(state.tensors)), [harmful], 1)
    assert metrics["server_floored"] == 1.0
    new_q = DiagGaussianNat.from_flat(new_state.tensors)
    assert bool((new_q.lam["theta"] > 0).all())
    assert torch.allclose(new_q.mean()["theta"], q.mean()["theta"])


@pytest.mark.parametrize("estimator", ["laplace", "mcmc"])
def test_estimators_on_digits(estimator):
    task = load_federated(DataSpec(clients=4, alpha=1.0, hidden=8))
    local = LocalSGDConfig(epochs=3, batch_size=32, lr=0.05)
    config = FedEPConfig(clients_per_round=2, local=local, estimator=estimator, scale=2.0)
    algorithm = FedEP(config)
    from lorite.federated.data import initial_parameters

    state = algorithm.init_state(initial_parameters(task, 0), task.client_sizes)
    q = DiagGaussianNat.from_flat(state.tensors)
    n = len(task.clients[0])
    problem = TiltedProblem(
        model=task.model, data=task.clients[0],
        prior_precision={k: v + local.weight_decay * n for k, v in q.lam.items()}, prior_shift=q.eta,
        cavity=q, start=q.mean(), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    _, precision, loss = algorithm._sgd_inference(problem)
    flat = torch.cat([v.flatten() for v in precision.values()])
    assert bool(torch.isfinite(flat).all()) and bool((flat >= 0).all()) and loss > 0
    identity = config.scale * local.weight_decay * n
    if estimator == "mcmc":  # rescaled to the scaled-identity precision's Frobenius norm
        assert float(flat.norm()) == pytest.approx(identity * flat.numel() ** 0.5, rel=1e-4)
        assert float(flat.std()) > 0  # but not uniform: it follows the iterates' variance
    else:  # Laplace: the Fisher adds data curvature on top of the prior's scale·wd·n
        assert float(flat.min()) >= identity * (1 - 1e-6) and float(flat.max()) > 2 * identity


def test_config_validation():
    with pytest.raises(ValueError, match="weight_decay > 0 or initial_precision_scale"):
        FedEPConfig(local=LocalSGDConfig(weight_decay=0.0))
    with pytest.raises(ValueError, match="mode"):
        FedEPConfig(mode="bogus")
    with pytest.raises(ValueError, match="estimator"):
        FedEPConfig(estimator="nope")
    with pytest.raises(ValueError, match="damping"):
        FedEPConfig(damping=1.5)
    schedule = FedEP(FedEPConfig(clients_per_round=4, damping_schedule="decay", damping_decay_rounds=4))
    assert [schedule.damping(t) for t in (1, 3, 5, 9)] == pytest.approx([0.5, 0.375, 0.25, 0.25])
