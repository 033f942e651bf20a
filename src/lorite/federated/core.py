"""What every federated algorithm here shares: tensor dictionaries, the local SGD loop, optimizers applied
to server (or client-site) statistics, the :class:`Algorithm` interface, reply validation and the
per-round server logic used by both engines (in-process simulation and Flower).

One round, whatever the engine (McMahan et al., arXiv 1602.05629; Guo et al., arXiv 2302.04228):

1. the server samples K of the M clients, uniformly without replacement, from a generator seeded by
   ``(seed, round)`` — so a resumed run and the Flower engine sample exactly the same clients;
2. each sampled client receives :meth:`Algorithm.broadcast` (a dict of tensors) and
   :meth:`Algorithm.round_config` (scalars) and runs :meth:`Algorithm.client_update` on its shard;
3. replies that are missing (drop-outs, errors) or malformed (wrong keys or shapes, non-finite values,
   no examples) are excluded and logged; the rest go to :meth:`Algorithm.aggregate`;
4. a new server state that is not finite is refused: the state of the previous round is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

TensorDict = dict[str, torch.Tensor]
PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger("lorite.federated")


# ------------------------------------------------------------------------------------------ tensor dicts
def parameters_of(model: nn.Module) -> TensorDict:
    """The trainable parameters of ``model`` by name, detached copies (what the federation trains).

    Buffers are not federated: models with running statistics (batch norm) are not supported."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_parameters(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(params[name])


def is_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_by_global_norm(tensors: TensorDict, max_norm: float | None) -> tuple[TensorDict, float]:
    """``tensors · min(1, max_norm / ‖tensors‖)`` with ‖·‖ the norm over all tensors together."""
    norm = global_norm(tensors)
    if max_norm is None or norm <= max_norm or norm == 0.0:
        return tensors, norm
    factor = max_norm / norm
    return {k: v * factor for k, v in tensors.items()}, norm


def client_seed(seed: int, round_: int, client: int, stream: int = 0) -> int:
    """A 63-bit seed for one client in one round, the same in every process (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, round_, client, stream]).generate_state(2, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------ configs
@dataclass
class OptimizerConfig:
    """An optimizer applied to server or client-site statistics, the aggregated update used as a negative
    gradient ("adaptive optimisation" of EP, Guo et al. §3.3; Reddi et al., arXiv 2003.00295).

    ``name``: ``sgd`` (with ``momentum``), ``adagrad`` (``eps``, ``initial_accumulator_value``) or
    ``adam`` (``betas``, ``eps``). SGD with ``lr`` = 1 and no momentum applies the update as it is."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    eps: float = 1e-8
    initial_accumulator_value: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"optimizer {self.name!r}: use sgd, adagrad or adam")
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optimizer momentum must be in [0, 1), got {self.momentum}")
        self.betas = tuple(self.betas)


@dataclass
class LocalSGDConfig:
    """Local training on a client: ``epochs`` passes of mini-batch SGD (``batch_size``, ``lr``,
    ``momentum``) over the shard. ``weight_decay`` is a Gaussian prior N(0, (weight_decay·n_k)⁻¹ I) in the
    client's summed objective, i.e. ``weight_decay/2 · ‖θ‖²`` added to the mean loss (spec §1)."""

    epochs: int = 5
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"local epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"local batch_size must be ≥ 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"local lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"local momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")


def config_from_dict(cls: type, values: Mapping[str, Any]):
    """Build the (possibly nested) config dataclass ``cls`` from plain values; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}")
    kwargs = {}
    for key, value in values.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = config_from_dict(kind, value)
        kwargs[key] = value
    return cls(**kwargs)


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------- optimizers on statistics
def _make_optimizer(config: OptimizerConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(tensors, lr=config.lr, momentum=config.momentum)
    if config.name == "adagrad":
        return torch.optim.Adagrad(
            tensors, lr=config.lr, eps=config.eps, initial_accumulator_value=config.initial_accumulator_value
        )
    return torch.optim.Adam(tensors, lr=config.lr, betas=config.betas, eps=config.eps)


def optimizer_step(
    config: OptimizerConfig,
    params: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    state: TensorDict,
) -> tuple[TensorDict, TensorDict]:
    """One step of ``torch.optim`` on ``params`` with gradient ``−update``; returns (new params, new state).

    With SGD, lr 1, no momentum this is ``params + update``. The optimizer state is kept as a flat dict of
    tensors (``"<state key>/<name>"``), so it checkpoints with ``torch.load(weights_only=True)`` and
    travels in a Flower ``ArrayRecord``."""
    names = list(params)
    tensors = [params[n].detach().clone() for n in names]
    optimizer = _make_optimizer(config, tensors)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kind, name = key.split("/", 1)
        loaded.setdefault(names.index(name), {})[kind] = value.clone()
    if loaded:
        saved = optimizer.state_dict()
        saved["state"] = loaded
        optimizer.load_state_dict(saved)
    for name, tensor in zip(names, tensors):
        tensor.grad = -update[name].to(tensor.dtype)
    optimizer.step()
    new_state: TensorDict = {}
    for index, tensor in enumerate(tensors):
        for kind, value in optimizer.state.get(tensor, {}).items():
            if isinstance(value, torch.Tensor):
                new_state[f"{kind}/{names[index]}"] = value.detach().clone()
    return {n: t.detach() for n, t in zip(names, tensors)}, new_state


# ---------------------------------------------------------------------------------------- local SGD
@dataclass
class ClientData:
    """One client's shard: inputs and targets (first dimension = examples)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class ModelSpec:
    """How a client evaluates its objective: a model factory and a per-example negative log-likelihood
    ``loss(outputs, targets) -> (n,)``."""

    build: Callable[[], nn.Module]
    loss: PerExampleLoss


def local_sgd(
    model: nn.Module,
    data: ClientData,
    loss: PerExampleLoss,
    config: LocalSGDConfig,
    generator: torch.Generator,
    prior_precision: Mapping[str, torch.Tensor] | float,
    prior_shift: Mapping[str, torch.Tensor] | None = None,
    on_epoch_end: Callable[[nn.Module], None] | None = None,
) -> float:
    """Minimise the client objective by mini-batch SGD with momentum (``torch.optim.SGD``), in place::

        f(θ) = [ Σ_i NLL_i(θ) + ½ θᵀ Λ_p θ − η_pᵀ θ ] / n_k

    with ``Λ_p`` = ``prior_precision`` (a diagonal: dict of tensors, or one number for ``c·I``) and ``η_p``
    = ``prior_shift`` (or 0). Each step uses a batch's mean NLL plus the quadratic term / n_k, an
    unbiased estimate of ∇f. FedAvg's weight decay is ``Λ_p = wd·n_k``, ``η_p = 0``; FedEP's tilted
    objective has the cavity × prior natural parameters (Guo et al., arXiv 2302.04228, Eq. 5).
    Batches are drawn by ``generator`` (a permutation per epoch). Returns the last epoch's mean NLL."""
    n = len(data)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in params], lr=config.lr, momentum=config.momentum)
    last_epoch_loss = float("nan")
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            nll = loss(model(data.inputs[index]), data.targets[index])
            objective = nll.mean()
            penalty = 0.0
            for name, p in params:
                lam = prior_precision if isinstance(prior_precision, float | int) else prior_precision[name]
                penalty = penalty + 0.5 * (lam * p * p).sum()
                if prior_shift is not None:
                    penalty = penalty - (prior_shift[name] * p).sum()
            objective = objective + penalty / n
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += float(nll.detach().sum())
            count += len(index)
        last_epoch_loss = total / max(count, 1)
        if on_epoch_end is not None:
            on_epoch_end(model)
    return last_epoch_loss


class Welford:
    """Running mean and (unbiased) variance of a stream of tensor dicts (Welford, 1962)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: TensorDict = {}
        self.m2: TensorDict = {}

    def add(self, sample: Mapping[str, torch.Tensor]) -> None:
        self.count += 1
        for name, value in sample.items():
            value = value.detach().double()
            if name not in self.mean:
                self.mean[name] = value.clone()
                self.m2[name] = torch.zeros_like(value)
                continue
            delta = value - self.mean[name]
            self.mean[name] += delta / self.count
            self.m2[name] += delta * (value - self.mean[name])

    def variance(self) -> TensorDict:
        if self.count < 2:
            raise ValueError("a sample variance needs at least 2 samples (local epochs ≥ 2)")
        return {k: v / (self.count - 1) for k, v in self.m2.items()}


# ---------------------------------------------------------------------------------------- algorithms
@dataclass
class ServerState:
    """The server's state: ``tensors`` (what defines the global model: parameters for FedAvg/FedPA, natural
    parameters for FedEP), ``optimizer`` (the server optimizer's state) and ``extra`` (the algorithm's
    bookkeeping, e.g. FedEP's initial mean and which clients have a site) — all flat tensor dicts."""

    tensors: TensorDict
    optimizer: TensorDict = field(default_factory=dict)
    extra: TensorDict = field(default_factory=dict)

    def clone(self) -> ServerState:
        copy = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
        return ServerState(copy(self.tensors), copy(self.optimizer), copy(self.extra))


@dataclass
class ClientUpdate:
    """A client's reply: ``arrays`` (sent to the server), ``num_examples``, scalar ``metrics``; ``site`` is
    the client's new private state (FedEP's site), kept on the client and never sent."""

    arrays: TensorDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    site: TensorDict | None = None


class Algorithm(ABC):
    """A federated algorithm, written once and run by any engine.

    The server side (:meth:`init_state`, :meth:`broadcast`, :meth:`round_config`, :meth:`aggregate`,
    :meth:`model_parameters`) and the client side (:meth:`client_update`) only exchange tensor dicts and
    scalars, which is what Flower messages carry."""

    name: str = ""
    stateful_clients: bool = False

    def __init__(self, config) -> None:
        self.config = config

    @property
    def clients_per_round(self) -> int:
        return int(self.config.clients_per_round)

    @abstractmethod
    def init_state(self, params: TensorDict, client_sizes: list[int]) -> ServerState:
        """The initial server state from the model's initial (or warm-start) parameters."""

    @abstractmethod
    def broadcast(self, state: ServerState) -> TensorDict:
        """What every sampled client receives."""

    def client_payload(self, state: ServerState, client: int) -> TensorDict:
        """What sampled client ``client`` receives (by default the broadcast)."""
        return self.broadcast(state)

    def after_round(self, state: ServerState, participants: list[int]) -> None:  # noqa: B027 (optional hook)
        """Bookkeeping on the new state once the round's valid participants are known (default: none)."""

    def round_config(
        self, state: ServerState, round_: int, total_examples: int
    ) -> dict[str, float | int | str]:
        """Scalars the clients receive with the broadcast."""
        return {"round": round_, "total-examples": total_examples}

    @abstractmethod
    def client_update(
        self,
        model: ModelSpec,
        data: ClientData,
        broadcast: TensorDict,
        config: Mapping[str, Any],
        site: TensorDict | None,
        generator: torch.Generator,
    ) -> ClientUpdate:
        """A client's local work on its shard."""

    @abstractmethod
    def aggregate(
        self, state: ServerState, updates: list[ClientUpdate], round_: int
    ) -> tuple[ServerState, dict[str, float]]:
        """The new server state from the valid replies of one round (at least one)."""

    @abstractmethod
    def model_parameters(self, state: ServerState) -> TensorDict:
        """The parameters to evaluate and deploy."""

    def reply_shapes(self, state: ServerState) -> dict[str, torch.Size]:
        """The keys and shapes a valid reply has (by default: those of the broadcast)."""
        return {k: v.shape for k, v in self.broadcast(state).items()}


def check_reply(update: ClientUpdate, shapes: Mapping[str, torch.Size]) -> str | None:
    """Why a reply must be excluded, or None when it is valid."""
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples {update.num_examples!r} is not a positive integer"
    if set(update.arrays) != set(shapes):
        missing, extra = set(shapes) - set(update.arrays), set(update.arrays) - set(shapes)
        return f"wrong arrays (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for name, shape in shapes.items():
        if tuple(update.arrays[name].shape) != tuple(shape):
            return f"array {name!r} has shape {tuple(update.arrays[name].shape)}, expected {tuple(shape)}"
        if not bool(torch.isfinite(update.arrays[name]).all()):
            return f"non-finite values in {name!r}"
    return None


class ClientDropout(RuntimeError):
    """A simulated client failure (``simulated_dropout``)."""


def sample_clients(seed: int, round_: int, n_clients: int, per_round: int) -> list[int]:
    """K of the M clients, uniformly without replacement, from a generator seeded by (seed, round)."""
    rng = np.random.default_rng([seed, round_, 0x5A4D])
    chosen = rng.choice(n_clients, size=min(per_round, n_clients), replace=False)
    return sorted(int(c) for c in chosen)


def apply_round(
    algorithm: Algorithm,
    state: ServerState,
    round_: int,
    sampled: list[int],
    replies: Mapping[int, ClientUpdate],
    failures: Mapping[int, str],
) -> tuple[ServerState, dict[str, Any]]:
    """Validate the replies of one round, aggregate the valid ones, and refuse a non-finite result.

    Returns the new state (the old one, unchanged, when nothing valid came back or the result is not
    finite) and the round's record: ``participants``, ``excluded`` (client → reason) and the
    algorithm's metrics."""
    shapes = algorithm.reply_shapes(state)
    excluded: dict[int, str] = {}
    for client in sampled:
        if client in failures:
            excluded[client] = failures[client]
        elif client not in replies:
            excluded[client] = "no reply (dropped out)"
    valid: list[tuple[int, ClientUpdate]] = []
    for client in sorted(replies):
        reason = check_reply(replies[client], shapes)
        if reason is None:
            valid.append((client, replies[client]))
        else:
            excluded[client] = reason
    for client, reason in sorted(excluded.items()):
        log.warning("round %d: client %d excluded: %s", round_, client, reason)
    record: dict[str, Any] = {
        "sampled": list(sampled),
        "participants": [c for c, _ in valid],
        "excluded": {str(c): r for c, r in sorted(excluded.items())},
    }
    if not valid:
        log.warning("round %d: no valid client update; the server state is unchanged", round_)
        return state, record
    new_state, metrics = algorithm.aggregate(state.clone(), [u for _, u in valid], round_)
    if not (is_finite(new_state.tensors) and is_finite(new_state.optimizer)):
        log.warning("round %d: the aggregated state is not finite; the server state is unchanged", round_)
        record["rejected"] = "non-finite aggregate"
        return state, record
    algorithm.after_round(new_state, [c for c, _ in valid])
    losses = [u.metrics.get("local_loss") for _, u in valid if "local_loss" in u.metrics]
    if losses:
        weights = [u.num_examples for _, u in valid if "local_loss" in u.metrics]
        metrics["local_loss"] = float(np.average(losses, weights=weights))
    record.update(metrics)
    return new_state, record
