"""The Flower engines give the same run as the in-process engine for a fixed seed.

The deployment test starts a SuperLink and three SuperNodes as separate processes on 127.0.0.1 (each
Flower message runs in a fresh ClientApp process, so this takes ~15–30 s); a simulated drop-out in round 1
exercises error replies, and the FedEP sites persist in the nodes' ``context.state`` across rounds."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from fed_helpers import digits_spec

from lorite.federated.runner import run
from lorite.federated.server import RunSpec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="flwr is not installed")


def _spec(engine: str) -> RunSpec:
    # seed 3: client 1 drops out in round 1 and returns (first time, with x₀) in round 2; client 2 trains twice
    return digits_spec(
        "fedep", rounds=2, clients=3, per_round=2, simulated_dropout=0.3, seed=3, engine=engine
    )


def _compare(tmp_path, engine: str) -> None:
    run(_spec("inprocess"), tmp_path / "inprocess", progress=None)
    lines: list[str] = []
    result = run(_spec(engine), tmp_path / engine, progress=lines.append)
    assert any(line.startswith("round 2/2") for line in lines), lines
    a = torch.load(tmp_path / "inprocess" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / engine / "checkpoint.pt", weights_only=True)
    for part in ("tensors", "extra"):
        for key, value in a[part].items():
            assert torch.allclose(value, b[part][key], atol=1e-6), (part, key)
    history_a, history_b = json.loads(a["history"]), json.loads(b["history"])
    assert [h["participants"] for h in history_a] == [h["participants"] for h in history_b] == [[2], [1, 2]]
    assert [sorted(h["excluded"]) for h in history_b] == [["1"], []]
    assert "ClientDropout" in history_b[0]["excluded"]["1"]  # an error reply from the node
    assert result["accuracy"] == pytest.approx(history_a[-1]["accuracy"], abs=1e-6)
    assert b["sites"] == {}  # with Flower the sites live on the nodes


def test_flower_processes_on_localhost_match_the_inprocess_run(tmp_path):
    _compare(tmp_path, "flower")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs ray")
def test_flower_simulation_engine_matches_the_inprocess_run(tmp_path):
    _compare(tmp_path, "flower-sim")


def test_stateful_fedep_refuses_to_resume_on_flower(tmp_path):
    from lorite.errors import LoriteError
    from lorite.federated.flower import run_flower

    with pytest.raises(LoriteError, match="cannot resume on Flower"):
        run_flower(_spec("flower"), tmp_path, resume=True)
