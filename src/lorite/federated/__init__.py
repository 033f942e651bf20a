"""Federated learning: FedAvg, FedPA and FedEP (expectation propagation, arXiv 2302.04228) for any torch
model, run in process (deterministic simulation) or on Flower (simulation engine or SuperLink/SuperNode
processes). ``lorite federate`` is the command line; :func:`lorite.federated.runner.run` the entry point.

The names below are imported lazily, so ``lorite --help`` does not pay for torch; scikit-learn,
transformers, matplotlib and flwr are imported only where they are used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Algorithm": "core",
    "ClientData": "core",
    "ClientUpdate": "core",
    "LocalSGDConfig": "core",
    "ModelSpec": "core",
    "OptimizerConfig": "core",
    "ServerState": "core",
    "FedAvg": "fedavg",
    "FedAvgConfig": "fedavg",
    "DiagGaussianNat": "fedep",
    "FedEP": "fedep",
    "FedEPConfig": "fedep",
    "FedPA": "fedpa",
    "FedPAConfig": "fedpa",
    "DataSpec": "data",
    "RunSpec": "server",
    "run": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorite.federated' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
