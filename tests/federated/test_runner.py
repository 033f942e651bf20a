"""Runs: non-IID partitions, drop-out and non-finite exclusion, exact resume, warm start, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fed_helpers import digits_spec

from lorite.cli import main
from lorite.federated.core import ClientUpdate, apply_round
from lorite.federated.data import dirichlet_partition
from lorite.federated.runner import run, run_inprocess
from lorite.federated.server import FederatedClient, FederatedServer, load_final_parameters, open_run


def test_dirichlet_partition_is_a_partition_and_alpha_controls_heterogeneity():
    labels = np.repeat(np.arange(10), 100)
    distinct = {}
    for alpha in (0.05, 100.0, math.inf):
        shards = dirichlet_partition(labels, 10, alpha, np.random.default_rng(0), min_size=5)
        merged = np.sort(np.concatenate(shards))
        assert np.array_equal(merged, np.arange(len(labels)))  # every example exactly once
        assert min(len(s) for s in shards) >= 5
        distinct[alpha] = np.mean([len(np.unique(labels[s])) for s in shards])
    assert distinct[0.05] < 4 < 9 < distinct[100.0] and distinct[math.inf] > 9
    from lorite.errors import LoriteError

    with pytest.raises(LoriteError, match="cannot give"):
        dirichlet_partition(labels[:20], 10, 0.1, np.random.default_rng(0), min_size=5)


def _nan_for(client_to_break: int):
    def hook(round_: int, client: int, update: ClientUpdate) -> ClientUpdate:
        if client == client_to_break:
            update.arrays = {k: torch.full_like(v, float("nan")) for k, v in update.arrays.items()}
        return update

    return hook


def test_non_finite_and_dropped_clients_are_excluded_and_logged(caplog):
    spec = digits_spec("fedep", rounds=1, clients=4, per_round=4)
    server = FederatedServer(spec, None, progress=None)
    before = server.state.clone()
    with caplog.at_level("WARNING", logger="lorite.federated"):
        run_inprocess(server, reply_hook=_nan_for(2))
    record = server.history[-1]
    assert record["participants"] == [0, 1, 3] and "non-finite" in record["excluded"]["2"]
    assert "client 2 excluded: non-finite" in caplog.text
    assert all(bool(torch.isfinite(v).all()) for v in server.state.tensors.values())

    # a client whose own statistics are non-finite (NaN data) is excluded and keeps no site
    broken = FederatedServer(spec, None, progress=None)
    broken.task.clients[1].inputs = broken.task.clients[1].inputs.clone().fill_(float("nan"))
    run_inprocess(broken)
    assert "non-finite" in broken.history[-1]["excluded"]["1"] and sorted(broken.sites) == [0, 2, 3]

    # the same round aggregated from the three good replies only gives the same state
    reference = FederatedServer(spec, None, progress=None)

    client = FederatedClient(spec, reference.task, reference.algorithm)
    config = reference.round_config(1)
    replies = {c: client.train(c, reference.payload(c), config, None) for c in (0, 1, 3)}
    expected, _ = apply_round(reference.algorithm, before, 1, [0, 1, 3], replies, {})
    for key, value in expected.tensors.items():
        assert torch.equal(value, server.state.tensors[key])

    # nothing valid at all: the state is unchanged
    state, record = apply_round(server.algorithm, server.state, 2, [0, 1], {}, {0: "boom", 1: "gone"})
    assert (
        state is server.state
        and record["participants"] == []
        and record["excluded"] == {"0": "boom", "1": "gone"}
    )
    # a finite reply whose aggregate overflows: refused
    huge = ClientUpdate({k: torch.full_like(v, 3e38) for k, v in server.broadcast().items()}, 10)
    state, record = apply_round(server.algorithm, server.state, 2, [0, 1], {0: huge, 1: huge}, {})
    assert state is server.state and record["rejected"] == "non-finite aggregate"


def test_simulated_dropout_excludes_clients_deterministically(tmp_path):
    spec = digits_spec("fedavg", rounds=4, clients=4, per_round=4, simulated_dropout=0.4)
    result = run(spec, tmp_path / "run", progress=None)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    dropped = [set(h["excluded"]) for h in history]
    assert any(dropped) and all("dropped out" in r for h in history for r in h["excluded"].values())
    assert math.isfinite(result["accuracy"])
    again = run(spec, tmp_path / "again", progress=None)
    assert again["accuracy"] == result["accuracy"]


@pytest.mark.parametrize("algorithm", ["fedep", "fedavg"])
def test_resume_gives_the_same_run(tmp_path, algorithm):
    extra = {"algorithm_config": {"server": {"lr": 1.0, "momentum": 0.5}}}
    full = digits_spec(algorithm, rounds=4, **extra)
    run(full, tmp_path / "full", progress=None)
    half = digits_spec(algorithm, rounds=2, **extra)
    run(half, tmp_path / "half", progress=None)

    spec = open_run(tmp_path / "half", rounds=4)
    lines = []
    run(spec, tmp_path / "half", resume=True, progress=lines.append)
    assert [line.split()[1] for line in lines] == ["3/4", "4/4"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    for part in ("tensors", "optimizer", "extra"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["sites"].keys() == b["sites"].keys()
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(h)]  # noqa: E731
    assert drop(a["history"]) == drop(b["history"])
    assert not [p for p in (tmp_path / "half").iterdir() if p.name.startswith(".")]  # no temporary files left
    assert (tmp_path / "half" / "accuracy.png").stat().st_size > 1000


def test_warm_start_from_a_fedavg_run(tmp_path):
    run(digits_spec("fedavg", rounds=2), tmp_path / "avg", progress=None)
    spec = digits_spec("fedep", rounds=1, warm_start_from=str(tmp_path / "avg"))
    server = FederatedServer(spec, None, progress=None)

    warm = load_final_parameters(tmp_path / "avg")
    mean = server.algorithm.model_parameters(server.state)
    for key in warm:
        assert torch.allclose(mean[key], warm[key], atol=1e-6)


def test_cli_federate_runs_resumes_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["federate", "--algo", "fedsep", "--clients", "4", "--clients-per-round", "2", "--rounds", "2",
            "--local-epochs", "1", "--hidden", "8", "--alpha", "0.5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "round 2/2  test accuracy" in printed and (out / "accuracy.png").exists()
    assert json.loads((out / "run.json").read_text())["algorithm_config"]["mode"] == "sep"
    assert main(["federate", "--resume", str(out), "--rounds", "3"]) == 0
    assert "round 3/3" in capsys.readouterr().out
    bad = [
        (args, "already exists and holds files"),
        (["federate", "--out", str(tmp_path / "x"), "--algo", "fedprox"], "unknown --algo"),
        (["federate", "--out", str(tmp_path / "x"), "--clients", "3", "--clients-per-round", "5"], "exceeds"),
        (["federate", "--out", str(tmp_path / "x"), "--engine", "spark"], "unknown engine"),
        (
            ["federate", "--out", str(tmp_path / "x"), "--algo", "fedavg", "--estimator", "laplace"],
            "FedEP settings",
        ),
        (["federate", "--out", str(tmp_path / "x"), "--algo-args", '{"mode": "xyz"}'], "mode"),
        (["federate", "--out", str(tmp_path / "x"), "--alpha", "0"], "--alpha must be > 0"),
        (["federate", "--resume", str(tmp_path / "nothing")], "no run.json"),
    ]
    for argv, message in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
