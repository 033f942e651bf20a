"""A federated run: its description (:class:`RunSpec`), the server side (:class:`FederatedServer`: state,
client sampling, reply validation, evaluation, history, atomic checkpoints, resume) and the client side
(:class:`FederatedClient`). Both engines — in process (:mod:`lorite.federated.runner`) and Flower
(:mod:`lorite.federated.flower`) — drive these same objects, so they give the same result for a fixed seed.

A run directory holds ``run.json`` (the spec), ``checkpoint.pt`` (server state, FedEP sites of the
in-process engine, history; tensors and plain Python, ``torch.load(weights_only=True)``),
``metrics.json`` (per-round test accuracy, NLL, participants, exclusions) and ``accuracy.png``.

What is read back is checked (:func:`read_spec`, :func:`read_checkpoint`): a ``run.json`` or
``checkpoint.pt`` that does not load, lacks its fields, or whose tensors do not fit the run's model is a
:class:`~lorite.errors.DamagedArtifact` (exit 1) naming the file; the run cannot continue from it (one
checkpoint is kept, the last round's), so the message says to start the run again in a new directory.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import atomic_save_figure, atomic_write_text
from ..errors import DamagedArtifact, LoriteError
from .core import (
    Algorithm,
    ClientDropout,
    ClientUpdate,
    ServerState,
    TensorDict,
    apply_round,
    client_seed,
    config_from_dict,
    config_to_dict,
    is_finite,
    sample_clients,
)
from .data import DataSpec, FederatedTask, evaluate, initial_parameters, load_federated
from .fedavg import FedAvg, FedAvgConfig
from .fedep import FedEP, FedEPConfig
from .fedpa import FedPA, FedPAConfig

ALGORITHMS: dict[str, tuple[type, type]] = {
    "fedavg": (FedAvgConfig, FedAvg),
    "fedep": (FedEPConfig, FedEP),
    "fedpa": (FedPAConfig, FedPA),
}
ENGINES = ("inprocess", "flower-sim", "flower")
CHECKPOINT = "checkpoint.pt"
FORMAT = 1


@dataclass
class RunSpec:
    """Everything that defines a run (written to ``run.json``): the ``algorithm`` name and its config
    (``algorithm_config``, the fields of FedAvgConfig / FedEPConfig / FedPAConfig), the ``data``, the
    number of ``rounds``, the ``seed`` (model initialisation, client sampling, local batches), the
    ``engine``, an optional ``warm_start_from`` run directory whose final model starts this run, and
    ``simulated_dropout`` (each sampled client fails with this probability, seeded)."""

    algorithm: str = "fedep"
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    rounds: int = 50
    seed: int = 0
    engine: str = "inprocess"
    warm_start_from: str | None = None
    simulated_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        if self.algorithm not in ALGORITHMS:
            raise LoriteError(f"unknown algorithm {self.algorithm!r}; available: {', '.join(ALGORITHMS)}")
        if self.engine not in ENGINES:
            raise LoriteError(f"unknown engine {self.engine!r}; available: {', '.join(ENGINES)}")
        if self.rounds < 1:
            raise LoriteError(f"--rounds must be ≥ 1, got {self.rounds}")
        if not 0 <= self.simulated_dropout < 1:
            raise LoriteError(f"simulated dropout must be in [0, 1), got {self.simulated_dropout}")
        self.algorithm_config = config_to_dict(self.make_config())  # validates, fills the defaults

    def make_config(self):
        config_class = ALGORITHMS[self.algorithm][0]
        try:
            return config_from_dict(config_class, self.algorithm_config)
        except (TypeError, ValueError) as error:
            raise LoriteError(f"{self.algorithm} settings: {error}") from error

    def make_algorithm(self) -> Algorithm:
        config = self.make_config()
        if config.clients_per_round > self.data.clients:
            raise LoriteError(
                f"clients per round ({config.clients_per_round}) exceeds the number of clients ({self.data.clients})"
            )
        return ALGORITHMS[self.algorithm][1](config)

    def to_json(self) -> str:
        return _spec_json(self)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        values = json.loads(text)
        values["data"] = DataSpec(**{k: _json_float(v) for k, v in values["data"].items()})
        return cls(**values)


def _json_float(value):
    return math.inf if value in ("inf", "Infinity") else value


def _spec_json(spec: RunSpec) -> str:
    values = asdict(spec)
    values["data"] = {
        k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in values["data"].items()
    }
    return json.dumps(values, indent=1)


# ----------------------------------------------------------------------------------------------- client
class FederatedClient:
    """The client side of a run: given a client id, the broadcast and the round's config, run the
    algorithm's local update on that client's shard. Seeds come from (seed, round, client), so a client
    computes the same thing in any process."""

    def __init__(self, spec: RunSpec, task: FederatedTask | None = None, algorithm: Algorithm | None = None):
        self.spec = spec
        self.task = task or load_federated(spec.data)
        self.algorithm = algorithm or spec.make_algorithm()

    def train(
        self, client: int, broadcast: TensorDict, config: dict[str, Any], site: TensorDict | None
    ) -> ClientUpdate:
        round_ = int(config["round"])
        if not 0 <= client < len(self.task.clients):
            raise ValueError(f"client {client} does not exist (the federation has {len(self.task.clients)})")
        if self.spec.simulated_dropout > 0:
            draw = np.random.default_rng(client_seed(self.spec.seed, round_, client, stream=1)).random()
            if draw < self.spec.simulated_dropout:
                raise ClientDropout(
                    f"client {client} dropped out (simulated, p={self.spec.simulated_dropout})"
                )
        generator = torch.Generator().manual_seed(client_seed(self.spec.seed, round_, client))
        update = self.algorithm.client_update(
            self.task.model, self.task.clients[client], broadcast, config, site, generator
        )
        if update.site is not None and not is_finite(update.site):
            update.site = None  # a client never stores non-finite statistics as its site
        return update


# ----------------------------------------------------------------------------------------------- server
class FederatedServer:
    """The server side of a run in directory ``out`` (None: nothing is written).

    ``sites`` holds the FedEP sites of the in-process engine (with Flower they live on the SuperNodes)."""

    def __init__(
        self,
        spec: RunSpec,
        out: Path | None,
        task: FederatedTask | None = None,
        algorithm: Algorithm | None = None,
        progress: Callable[[str], None] | None = print,
    ):
        self.spec = spec
        self.out = Path(out) if out is not None else None
        self.task = task or load_federated(spec.data)
        self.algorithm = algorithm or spec.make_algorithm()
        self.progress = progress
        self.total_examples = sum(self.task.client_sizes)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.sites: dict[int, TensorDict] = {}
        if self.out is not None and (self.out / CHECKPOINT).exists():
            self._load_checkpoint()  # resume: the warm-start run is not needed any more
        else:
            self.state = self.algorithm.init_state(self._initial_parameters(), self.task.client_sizes)

    # ---------------------------------------------------------------- set-up
    def _initial_parameters(self) -> TensorDict:
        params = initial_parameters(self.task, self.spec.seed)
        if self.spec.warm_start_from is None:
            return params
        warm = load_final_parameters(Path(self.spec.warm_start_from))
        if {k: tuple(v.shape) for k, v in warm.items()} != {k: tuple(v.shape) for k, v in params.items()}:
            raise LoriteError(
                f"--warm-start {self.spec.warm_start_from}: its model does not match this run's model"
            )
        return warm

    def _load_checkpoint(self) -> None:
        saved = read_checkpoint(self.out)
        expected = self.algorithm.init_state(
            initial_parameters(self.task, self.spec.seed), self.task.client_sizes
        )
        if _shapes(saved["tensors"]) != _shapes(expected.tensors):
            raise _damaged(self.out / CHECKPOINT, "holds a server state that does not fit this run's model")
        self.round = int(saved["round"])
        self.state = ServerState(saved["tensors"], saved["optimizer"], saved["extra"])
        self.sites = {int(k): v for k, v in saved["sites"].items()}
        self.history = json.loads(saved["history"])

    def save_checkpoint(self) -> None:
        """checkpoint.pt then metrics.json, each written to a temporary file and renamed."""
        if self.out is None:
            return
        payload = {
            "format": FORMAT,
            "round": self.round,
            "tensors": self.state.tensors,
            "optimizer": self.state.optimizer,
            "extra": self.state.extra,
            "sites": {str(k): v for k, v in self.sites.items()},
            "history": json.dumps(self.history),
        }
        handle, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{CHECKPOINT}.")
        os.close(handle)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.write_metrics()

    def write_metrics(self) -> None:
        if self.out is None:
            return
        metrics = {
            "algorithm": self.spec.algorithm,
            "data": self.spec.data.name,
            "rounds_done": self.round,
            "rounds": self.spec.rounds,
            "complete": self.round >= self.spec.rounds,
            "history": self.history,
        }
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=1))

    # ---------------------------------------------------------------- rounds
    def sample(self, round_: int) -> list[int]:
        return sample_clients(
            self.spec.seed, round_, len(self.task.clients), self.algorithm.clients_per_round
        )

    def broadcast(self) -> TensorDict:
        return self.algorithm.broadcast(self.state)

    def payload(self, client: int) -> TensorDict:
        return self.algorithm.client_payload(self.state, client)

    def round_config(self, round_: int) -> dict[str, Any]:
        return self.algorithm.round_config(self.state, round_, self.total_examples)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.task, self.algorithm.model_parameters(self.state))

    def finish_round(
        self,
        round_: int,
        sampled: list[int],
        replies: dict[int, ClientUpdate],
        failures: dict[int, str],
        started: float,
    ) -> dict[str, Any]:
        """Validate and aggregate one round's replies, evaluate, record, checkpoint, report."""
        if round_ != self.round + 1:
            raise RuntimeError(f"round {round_} finished after round {self.round}")
        self.state, record = apply_round(self.algorithm, self.state, round_, sampled, replies, failures)
        self.round = round_
        record = {"round": round_, **self.evaluate(), **record, "seconds": time.time() - started}
        self.history.append(record)
        self.save_checkpoint()
        if self.progress is not None:
            excluded = f"  excluded {len(record['excluded'])}" if record["excluded"] else ""
            self.progress(
                f"round {round_}/{self.spec.rounds}  test accuracy {record['accuracy']:.4f}  nll {record['nll']:.4f}"
                f"  clients {len(record['participants'])}/{len(sampled)}{excluded}  {record['seconds']:.1f}s"
            )
        return record

    def finalize(self) -> dict[str, Any]:
        self.write_metrics()
        if self.out is not None and self.history:
            plot_curves(
                {
                    self.spec.algorithm: (
                        [h["round"] for h in self.history],
                        [h["accuracy"] for h in self.history],
                    )
                },
                self.out / "accuracy.png",
                title=f"{self.spec.algorithm} on {self.spec.data.name} (M={self.spec.data.clients}, α={self.spec.data.alpha})",
            )
        return {"round": self.round, **(self.history[-1] if self.history else self.evaluate())}


def _damaged(file: Path, what: str) -> DamagedArtifact:
    return DamagedArtifact(
        f"federated run: {file} {what}; the run cannot continue from it — start it again with a new --out"
    )


def _shapes(tensors: TensorDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_spec(run_dir: Path) -> RunSpec:
    """The :class:`RunSpec` in ``run_dir/run.json``; one that does not parse is a DamagedArtifact."""
    file = Path(run_dir) / "run.json"
    try:
        return RunSpec.from_json(file.read_text())
    except LoriteError:  # it parses, but a setting is refused (the file was edited by hand)
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise _damaged(file, f"does not parse ({_one_line(error)})") from error


CHECKPOINT_KEYS = ("round", "tensors", "optimizer", "extra", "sites", "history")


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``run_dir/checkpoint.pt``, checked: it loads, has its format and fields, and its history has one
    record per round done. Anything else is a :class:`DamagedArtifact` naming the file."""
    file = Path(run_dir) / CHECKPOINT
    try:
        saved = torch.load(file, weights_only=True)
    except Exception as error:  # truncated zip (RuntimeError), bad pickle (UnpicklingError), EOFError, …
        raise _damaged(file, f"does not load ({_one_line(error)})") from error
    if not isinstance(saved, dict) or any(key not in saved for key in ("format", *CHECKPOINT_KEYS)):
        raise _damaged(file, f"lacks some of its fields {list(CHECKPOINT_KEYS)}")
    if saved["format"] != FORMAT:
        raise LoriteError(f"{file}: unknown checkpoint format {saved['format']!r} (expected {FORMAT})")
    try:
        history = json.loads(saved["history"])
        ok = isinstance(history, list) and int(saved["round"]) == len(history) >= 0
        ok = ok and all(isinstance(saved[k], dict) for k in ("tensors", "optimizer", "extra", "sites"))
    except (TypeError, ValueError) as error:
        raise _damaged(file, f"has an unreadable history ({_one_line(error)})") from error
    if not ok:
        raise _damaged(file, "is inconsistent (its round, history and state disagree)")
    return saved


def load_final_parameters(run_dir: Path) -> TensorDict:
    """The model parameters at the end of the run in ``run_dir`` (its checkpoint, under its algorithm)."""
    if not (run_dir / "run.json").exists() or not (run_dir / CHECKPOINT).exists():
        raise LoriteError(f"{run_dir}: not a federated run directory (no run.json and checkpoint.pt)")
    spec = read_spec(run_dir)
    saved = read_checkpoint(run_dir)
    algorithm = spec.make_algorithm()
    return algorithm.model_parameters(ServerState(saved["tensors"], saved["optimizer"], saved["extra"]))


# ------------------------------------------------------------------------------------- in-process engine


def prepare_run(spec: RunSpec, out: Path) -> None:
    """Refuse an occupied ``out``; check the spec; build the data cache; write ``run.json``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LoriteError(f"--out {str(out)!r} already holds files; pick a new directory (or --resume it)")
    spec.make_algorithm()  # K ≤ M and the algorithm's settings
    if spec.warm_start_from is not None:
        load_final_parameters(Path(spec.warm_start_from))
    load_federated(spec.data)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", spec.to_json())


def open_run(out: Path, rounds: int | None = None) -> RunSpec:
    """The spec of the run in ``out`` (for ``--resume``), with the total ``rounds`` raised if asked."""
    out = Path(out)
    if not (out / "run.json").exists():
        raise LoriteError(f"--resume {str(out)!r}: no run.json there")
    if not (out / CHECKPOINT).exists():
        raise LoriteError(f"--resume {str(out)!r}: no checkpoint.pt there (the run never finished a round)")
    spec = read_spec(out)
    read_checkpoint(out)  # damaged: say so now, before the data and the engine start
    if rounds is not None and rounds != spec.rounds:
        if rounds < 1:
            raise LoriteError(f"--rounds must be ≥ 1, got {rounds}")
        spec.rounds = rounds
        atomic_write_text(out / "run.json", spec.to_json())
    return spec


# ------------------------------------------------------------------------------------------------ plots
def plot_curves(
    curves: dict[str, tuple[list[int], list[float]]],
    path: Path,
    title: str = "",
    bands: dict[str, tuple[list[float], list[float]]] | None = None,
    ylabel: str = "test accuracy",
) -> None:
    """Accuracy vs round, one line per label (optional ± bands); written atomically as PNG."""
    import matplotlib  # optional dependency (lorite[all]), slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (lorite[all])

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, (rounds, values) in curves.items():
        (line,) = axis.plot(rounds, values, label=label)
        if bands and label in bands:
            low, high = bands[label]
            axis.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2)
    axis.set_xlabel("round")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    try:
        atomic_save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)
