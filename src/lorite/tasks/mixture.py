"""Task mixtures (``A+B+C``, ``natural_instructions/*``: :class:`lorite.tasks.spec.MixtureSpec`): how
training draws from the members and how the members' metrics combine.

* **Splits.** Every member is split on its own by the one rule (:mod:`lorite.tasks.splits`, the same
  ``split_seed`` for each), so validation and test of every member are never trained on.
* **Caps.** A member trains on the first ``max_examples_per_task`` examples of its training split (the
  split is a seeded shuffle, so this is a random subset fixed by ``split_seed``): ``n_i`` examples.
* **Temperature.** Each drawn example comes from member ``i`` with probability
  ``p_i = n_i^(1/T) / Σ_j n_j^(1/T)`` (:func:`mixture_probabilities`): ``T = 1`` is proportional to the
  capped sizes (the union, every example alike), ``T → ∞`` uniform over the members.
* **Data order** (:class:`MixtureSampler`). Micro-batch ``m`` (= ``step · grad_accum + micro``) draws its
  members i.i.d. from ``p`` with a generator seeded by ``(seed, m)``; the ``c``-th draw of member ``i``
  overall is position ``c`` of its stream, seeded epoch permutations of its ``n_i`` examples (every
  example once per epoch of that member). The indices are a pure function of ``(seed, step, micro)``, so a
  resumed run draws exactly what the uninterrupted one would; the member counts before ``m`` are replayed
  from the nearest micro-batch already drawn (forward, so a run pays once).
* **Evaluation** (:func:`macro_metrics`). Every member is scored on its own examples (computed in batches
  shared across members, :func:`lorite.tasks.evaluation.evaluate_tasks`); ``score`` is the macro mean of
  the members' scores (what a comparison chooses learning rates on), ``per_task`` holds each member's
  metrics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from ..errors import LoriteError

DEFAULT_MAX_EXAMPLES_PER_TASK = 1000
_SEED_STRIDE = 1_000_003  # keeps the generators of different seeds apart (micro-batches < ~10^6 per seed)


def check_mixture_settings(max_examples_per_task: int, temperature: float) -> None:
    """Raise :class:`LoriteError` for a cap below 1 or a temperature that is not > 0 (∞ is fine)."""
    if isinstance(max_examples_per_task, bool) or not isinstance(max_examples_per_task, int):
        raise LoriteError(f"--max-examples-per-task must be a whole number, got {max_examples_per_task!r}")
    if max_examples_per_task < 1:
        raise LoriteError(f"--max-examples-per-task must be >= 1, got {max_examples_per_task}")
    if not (isinstance(temperature, int | float) and temperature > 0) or math.isnan(temperature):
        raise LoriteError(f"--mixture-temperature must be > 0 (inf: uniform over tasks), got {temperature!r}")


def capped_sizes(sizes: Sequence[int], cap: int) -> list[int]:
    """Each member's training examples after the per-task ``cap``."""
    return [min(int(n), cap) for n in sizes]


def mixture_probabilities(sizes: Sequence[int], temperature: float = 1.0) -> list[float]:
    """``p_i ∝ n_i^(1/T)`` over the (capped) member sizes ``n_i``; ``T = inf`` is uniform."""
    if not sizes or any(n < 1 for n in sizes):
        raise LoriteError(f"every mixture member needs training examples, got sizes {list(sizes)}")
    if math.isinf(temperature):
        return [1.0 / len(sizes)] * len(sizes)
    # in log space: n^(1/T) overflows for small T
    logs = [math.log(n) / temperature for n in sizes]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = sum(weights)
    return [w / total for w in weights]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


class MixtureSampler:
    """The example indices (into the members' training examples laid end to end, member 0 first) of every
    micro-batch of a run on a mixture: see the module docstring."""

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], seed: int, batch_size: int,
                 grad_accum: int = 1) -> None:  # fmt: skip
        if len(sizes) != len(probabilities):
            raise LoriteError("a mixture sampler needs one probability per member")
        self.sizes = [int(n) for n in sizes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.probabilities = torch.tensor(list(probabilities), dtype=torch.float64)
        self.seed, self.batch_size, self.grad_accum = seed, batch_size, grad_accum
        self._at = 0  # counts of draws per member before micro-batch _at
        self._counts = [0] * len(self.sizes)
        self._epochs: dict[tuple[int, int], list[int]] = {}

    def members(self, position: int) -> list[int]:
        """The member of each example of micro-batch ``position`` (i.i.d. from the probabilities)."""
        generator = _generator(self.seed * _SEED_STRIDE + position)
        return torch.multinomial(self.probabilities, self.batch_size, True, generator=generator).tolist()

    def _counts_before(self, position: int) -> list[int]:
        if position < self._at:  # asked for an earlier micro-batch (rare): replay from the start
            self._at, self._counts = 0, [0] * len(self.sizes)
        while self._at < position:
            for member in self.members(self._at):
                self._counts[member] += 1
            self._at += 1
        return list(self._counts)

    def _epoch(self, member: int, epoch: int) -> list[int]:
        key = (member, epoch)
        if key not in self._epochs:
            if len(self._epochs) > 4 * len(self.sizes):  # only the current epochs are needed
                self._epochs.clear()
            seed = (self.seed * 10_007 + member) * 100_003 + epoch
            self._epochs[key] = torch.randperm(self.sizes[member], generator=_generator(seed)).tolist()
        return self._epochs[key]

    def indices(self, step: int, micro: int = 0) -> list[int]:
        """The indices of micro-batch ``micro`` of optimizer step ``step``."""
        position = step * self.grad_accum + micro
        counts = self._counts_before(position)
        out = []
        for member in self.members(position):
            epoch, offset = divmod(counts[member], self.sizes[member])
            out.append(self.offsets[member] + self._epoch(member, epoch)[offset])
            counts[member] += 1
        return out


def macro_metrics(per_task: dict[str, dict]) -> dict:
    """A mixture's metrics from its members' (``per_task``: member spec → metrics): ``score`` and every
    other number all members have, as the macro mean over members; ``n`` the examples in all;
    ``n_tasks``; and ``per_task`` itself."""
    scored = {name: metrics for name, metrics in per_task.items() if metrics}
    if not scored:
        return {}
    shared = set.intersection(
        *(
            {k for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            for m in scored.values()
        )
    ) - {"n"}
    macro = {key: statistics.fmean(m[key] for m in scored.values()) for key in sorted(shared)}
    return {
        **macro,
        "score": statistics.fmean(m["score"] for m in scored.values()),
        "n": sum(int(m.get("n", 0)) for m in scored.values()),
        "n_tasks": len(scored),
        "n_scored_by_exact_match": sum(m.get("score_metric") == "exact_match" for m in scored.values()),
        "per_task": per_task,
    }
