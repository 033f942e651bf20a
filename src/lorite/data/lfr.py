"""LFR — Learn, Focus, Review: a data schedule for language-model pre-training (Prakriya, Yen, Hsieh, Cong,
arXiv 2409.06131; CoNLL 2025).

The corpus is a set of N fixed token blocks with stable ids b ∈ {0..N−1}. Training runs in phases:

1. **Learn** — all blocks, uniformly shuffled, for p1 epochs; record PPL(b) for every block seen.
2. **Focus** — sort the blocks by their recorded score and drop the ⌊N·s1⌋ *lowest*-perplexity ("already
   learned") ones; train on the remaining keep-set, shuffled, for p2 epochs (no recording).
3. **Review** — all blocks again for p3 epochs, recording PPL(b) again.
4. **Focus again** — drop the ⌊N·s2⌋ lowest-scoring blocks by the new record; train on the rest for p4
   epochs, ``reps`` times (the keep-set is computed once, after Review).

PPL(b) = exp(ℓ_b) with ℓ_b = (1/T_b) Σ_t CE(x_{t+1} | x_{≤t}; θ), the mean token cross-entropy of the block,
which the training loop passes to :meth:`LFRSampler.observe` straight from its training forward pass (model in
train mode, parameters changing along the epoch: no extra compute). A block's score after a recording phase
is the arithmetic mean of its recorded PPL values (``score="ppl"``, as the third-party reading of the paper
does) or the mean of ℓ (``score="loss"``, i.e. ranking by the geometric-mean PPL).

The per-block store is a handful of length-N float64 arrays (running sums and counts, the latest score, the
last observed loss), never per-block Python lists. Sampling is counter-based: the order of every epoch of
every phase is a permutation drawn from a generator seeded by (seed, phase, epoch), so the sampler's whole
state is the step counter, the store and the current keep-set — :meth:`LFRSampler.state_dict` holds tensors
and plain Python only (``torch.load(weights_only=True)``) and a resumed sampler draws exactly the indices
the uninterrupted one would have.

Under DDP (``torch.distributed`` initialised, ``world_size > 1``) every rank builds the same global stream
of micro-batches of ``batch_size · world_size`` blocks and takes the contiguous slice ``[rank·batch_size,
(rank+1)·batch_size)`` of each, so the ranks' shards are disjoint; :meth:`LFRSampler.observe` all-gathers
the (id, loss) pairs in rank order before updating the store, so every rank ranks identically.

Where the paper is ambiguous (spec ``lfr.md`` §4) the defaults here are:

* phase-4 length: ``final_reps = 5`` repetitions of ``final_epochs = 1`` epoch — "focus on 30% of the data
  for 5 epochs" (the transcription also shows "reps = 2" next to it; the third-party implementation uses
  reps = 5, p4 = 1). With the defaults the run costs N·(1 + 0.5 + 1 + 5·0.3) = 4.0 corpus-epochs of blocks;
* PPL source: the training forward pass (``ppl_source="train_forward"``); ``"eval_pass"`` instead scores all
  N blocks with a separate no-grad forward (eval mode, the current weights) at the end of each recording
  phase — the loop attaches a scorer once (``sampler.attach_scorer(eval_pass_scorer(model, blocks))``)
  and the sampler runs the pass inside ``next_indices`` when the phase ends (see
  :meth:`LFRSampler.run_evaluation_pass`). Online records mix difficulty with *when* a block was seen
  (the model improves along the epoch); the pass removes that at about +1/3 of an epoch's compute;
* which records rank the second Focus: the most recent recording phase only (``rank_from="latest"``; a block
  never recorded in that phase falls back to its previous record); ``"all"`` averages over every record;
* keep-set refresh: computed once before the phase-4 reps (``refresh_each_rep=False``); ``True`` records
  during the phase-4 reps and re-ranks before each rep (kept blocks then carry fresher, lower scores than
  the dropped ones: that bias is inherent to the option);
* drop direction: the lowest scores are dropped; ties are broken by block id (lower id dropped first);
  blocks never recorded count as the hardest (score +∞, always kept);
* schedule length: the phases' block draws are stretched or compressed by one common factor so the run
  fills exactly ``total_steps`` micro-batches — the learning-rate schedule then spans the whole LFR run, as
  the spec requires. Phase boundaries are rounded *up* to whole micro-batches (a phase never ends on a
  partial batch, so a Focus keep-set is ranked only after the previous phase's losses were all observed).
  When ``total_steps`` equals :meth:`LFRConfig.planned_steps` the phases run the paper's epoch counts
  (exactly, when the global batch divides N); use :meth:`LFRConfig.planned_tokens` to size a token budget.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import LoriteError

SCORES = ("ppl", "loss")
RANK_FROM = ("latest", "all")
PPL_SOURCES = ("train_forward", "eval_pass")
STATE_VERSION = 1


@dataclass(frozen=True)
class LFRPhase:
    """One expanded phase: ``name`` (learn, focus, review, final_focus), how many passes over its block set
    (``epochs``), the fraction of blocks ``drop``-ped from that set (0 for learn/review), whether it records
    scores (``records``) and whether it re-ranks the keep-set when it starts (``ranks``)."""

    name: str
    epochs: float
    drop: float
    records: bool
    ranks: bool


@dataclass(frozen=True)
class LFRConfig:
    """The LFR schedule (spec ``lfr.md``; defaults (p1, s1, p2, p3, s2, p4, reps) = (1, 50%, 1, 1, 70%, 1, 5)).
    Invalid values raise :class:`~lorite.errors.LoriteError` (a ValueError: the CLI prints it as one line).

    Drop fractions are in [0, 1): ``focus_drop = s1/100``, ``final_drop = s2/100``; the keep-set holds
    N − ⌊N·drop⌋ blocks. ``score``: "ppl" (mean of recorded PPL values) or "loss" (mean recorded CE).
    ``rank_from``: "latest" (most recent recording phase) or "all" (every record). ``ppl_source``:
    "train_forward" or "eval_pass". See the module docstring for what each ambiguity resolves to and why.
    """

    learn_epochs: float = 1.0
    focus_drop: float = 0.5
    focus_epochs: float = 1.0
    review_epochs: float = 1.0
    final_drop: float = 0.7
    final_epochs: float = 1.0
    final_reps: int = 5
    score: str = "ppl"
    rank_from: str = "latest"
    refresh_each_rep: bool = False
    ppl_source: str = "train_forward"

    def __post_init__(self):
        for name in ("learn_epochs", "focus_epochs", "review_epochs", "final_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise LoriteError(f"LFRConfig.{name} must be a number >= 0, got {value!r}")
        for name in ("focus_drop", "final_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise LoriteError(f"LFRConfig.{name} must be a fraction in [0, 1), got {value!r}")
        if isinstance(self.final_reps, bool) or not isinstance(self.final_reps, int) or self.final_reps < 0:
            raise LoriteError(f"LFRConfig.final_reps must be an integer >= 0, got {self.final_reps!r}")
        if self.learn_epochs <= 0:
            raise LoriteError(
                "LFRConfig.learn_epochs must be > 0: the first Focus ranks by the Learn records"
            )
        if self.score not in SCORES:
            raise LoriteError(f"LFRConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.rank_from not in RANK_FROM:
            raise LoriteError(f"LFRConfig.rank_from must be one of {RANK_FROM}, got {self.rank_from!r}")
        if self.ppl_source not in PPL_SOURCES:
            raise LoriteError(f"LFRConfig.ppl_source must be one of {PPL_SOURCES}, got {self.ppl_source!r}")
        if not isinstance(self.refresh_each_rep, bool):
            raise LoriteError(f"LFRConfig.refresh_each_rep must be a bool, got {self.refresh_each_rep!r}")

    @classmethod
    def from_options(cls, options: dict) -> LFRConfig:
        """A config from keyword options (e.g. ``--sampler-options``); unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LoriteError(f"unknown LFR option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def phases(self) -> list[LFRPhase]:
        """Learn, Focus, Review, final Focus. The ``final_reps`` repetitions over one keep-set form a single
        phase of ``final_reps · final_epochs`` epochs (one continuous stream of permutations); with
        ``refresh_each_rep`` each repetition is its own recording phase that re-ranks when it starts."""
        phases = [
            LFRPhase("learn", self.learn_epochs, 0.0, records=True, ranks=False),
            LFRPhase("focus", self.focus_epochs, self.focus_drop, records=False, ranks=True),
            LFRPhase("review", self.review_epochs, 0.0, records=True, ranks=False),
        ]
        if self.refresh_each_rep:
            phases += [
                LFRPhase("final_focus", self.final_epochs, self.final_drop, records=True, ranks=True)
                for _ in range(self.final_reps)
            ]
        elif self.final_reps:
            epochs = self.final_reps * self.final_epochs
            phases.append(LFRPhase("final_focus", epochs, self.final_drop, records=False, ranks=True))
        return phases

    def planned_blocks(self, n_blocks: int) -> float:
        """Block draws of the schedule at its own epoch counts: Σ_phases epochs · (N − ⌊N·drop⌋)."""
        return sum(p.epochs * keep_size(n_blocks, p.drop) for p in self.phases())

    def corpus_epochs(self, n_blocks: int) -> float:
        """The schedule's cost in passes over the whole corpus (4.0 with the defaults)."""
        return self.planned_blocks(n_blocks) / n_blocks

    def planned_steps(self, n_blocks: int, global_batch: int) -> int:
        """Micro-batches of ``global_batch`` blocks that run the schedule at its own epoch counts."""
        return math.ceil(self.planned_blocks(n_blocks) / global_batch - 1e-9)

    def planned_tokens(self, n_blocks: int, block_length: int, global_batch: int) -> int:
        """Training tokens of :meth:`planned_steps` micro-batches (size the LR schedule / budget from it)."""
        return self.planned_steps(n_blocks, global_batch) * global_batch * block_length


def keep_size(n_blocks: int, drop: float) -> int:
    """N − ⌊N·drop⌋ (the rounding guards against 0.29·100 = 28.999…)."""
    return n_blocks - math.floor(round(n_blocks * drop, 9))


def _permutation_seed(seed: int, phase: int, epoch: int) -> int:
    digest = hashlib.sha256(f"lfr:{seed}:{phase}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LFRSampler:
    """Block sampler running the LFR schedule (protocol of :func:`lorite.data.blocks.make_sampler`).

    ``n_blocks``: N, the training blocks; ``batch_size``: blocks per micro-batch *on this rank*;
    ``total_steps``: micro-batches (``next_indices`` calls) the run will make — the schedule is fitted to
    it; ``seed``: the permutation seed; ``rank``/``world_size``: this process's place in the DDP group;
    ``options``: :class:`LFRConfig` fields (or ``config=LFRConfig(...)``).

    Loop contract: call :meth:`observe` with a micro-batch's per-block losses before the next
    :meth:`next_indices` (phase changes happen in ``next_indices``, after every loss of the ending phase has
    been recorded). With ``ppl_source="eval_pass"``, either :meth:`attach_scorer` once (the sampler then
    runs each pass inside ``next_indices``) or call :meth:`run_evaluation_pass` whenever
    :meth:`evaluation_due` says so. Calls beyond ``total_steps`` continue the last phase's stream.
    """

    def __init__(
        self,
        n_blocks: int,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        **options,
    ):
        config = options.pop("config", None)
        if config is None:
            config = LFRConfig.from_options(options)
        elif options:
            raise LoriteError(f"pass either config= or LFR options, not both (got {sorted(options)})")
        if not isinstance(config, LFRConfig):
            raise TypeError(f"config must be an LFRConfig, got {type(config).__name__}")
        for name, value, low in (
            ("n_blocks", n_blocks, 1),
            ("batch_size", batch_size, 1),
            ("total_steps", total_steps, 1),
            ("world_size", world_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.config = config
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.phases = config.phases()
        self._ends = self._phase_ends()
        self._distributed = world_size > 1 and _dist_initialized()
        if self._distributed and (dist.get_world_size() != world_size or dist.get_rank() != rank):
            raise ValueError(
                f"rank/world_size ({rank}/{world_size}) disagree with torch.distributed "
                f"({dist.get_rank()}/{dist.get_world_size()})"
            )
        n = n_blocks
        # the store (float64: sums over many records stay exact enough to rank identically on every rank)
        self._phase_ppl_sum = torch.zeros(n, dtype=torch.float64)
        self._phase_loss_sum = torch.zeros(n, dtype=torch.float64)
        self._phase_count = torch.zeros(n, dtype=torch.float64)
        self._total_ppl_sum = torch.zeros(n, dtype=torch.float64)
        self._total_loss_sum = torch.zeros(n, dtype=torch.float64)
        self._total_count = torch.zeros(n, dtype=torch.float64)
        self._latest_score = torch.full((n,), math.nan, dtype=torch.float64)
        self._last_loss = torch.full((n,), math.nan, dtype=torch.float64)
        # each finished recording phase's per-block score (float32, NaN where unrecorded), for analysis
        self._records: dict[int, torch.Tensor] = {}
        self._keep = torch.arange(n)
        self._step = 0  # micro-batches drawn
        self._phase = 0  # the phase whose records/keep-set are current
        self._evaluated_phase = -1  # last recording phase scored by an evaluation pass
        self._polled = False  # evaluation_due() asked since the last next_indices() (eval_pass contract)
        self._scorer: Callable[[torch.Tensor], torch.Tensor] | None = None  # see attach_scorer
        self._order_cache: dict[int, torch.Tensor] = {}  # epoch → block order, current phase only

    # ------------------------------------------------------------------ plan
    def _phase_ends(self) -> list[int]:
        """Cumulative micro-batch boundaries: phase j covers steps [ends[j-1], ends[j]). Each phase's share
        of ``total_steps`` is proportional to its block draws epochs·|keep-set|, boundaries rounded up."""
        weights = [p.epochs * keep_size(self.n_blocks, p.drop) for p in self.phases]
        total = sum(weights)
        ends, cumulative = [], 0.0
        for w in weights:
            cumulative += w
            ends.append(min(self.total_steps, math.ceil(self.total_steps * cumulative / total - 1e-9)))
        ends[-1] = self.total_steps
        return ends

    def plan(self) -> list[dict]:
        """The phases with their step ranges and keep-set sizes (for logs and plots)."""
        out, start = [], 0
        for j, (phase, end) in enumerate(zip(self.phases, self._ends)):
            out.append(
                dict(
                    index=j,
                    name=phase.name,
                    start_step=start,
                    end_step=end,
                    keep_size=keep_size(self.n_blocks, phase.drop),
                    records=phase.records,
                )
            )
            start = end
        return out

    def _phase_of(self, step: int) -> int:
        for j, end in enumerate(self._ends):
            if step < end:
                return j
        return len(self.phases) - 1

    def _phase_start(self, j: int) -> int:
        return self._ends[j - 1] if j > 0 else 0

    # ------------------------------------------------------------------ introspection
    @property
    def step(self) -> int:
        return self._step

    @property
    def phase(self) -> LFRPhase:
        return self.phases[self._phase]

    @property
    def phase_index(self) -> int:
        return self._phase

    def keep_set(self) -> torch.Tensor:
        """The sorted block ids the current phase samples from."""
        return self._keep.clone()

    def scores(self) -> torch.Tensor:
        """Each block's ranking score (+∞ where never recorded), as the next ranking would see it."""
        return self._ranking_scores()

    def records(self) -> dict[int, torch.Tensor]:
        """Per finished recording phase (by phase index, see :meth:`plan`): each block's score in that
        phase alone (float32; NaN where the phase did not see the block)."""
        return {j: r.clone() for j, r in self._records.items()}

    def last_losses(self) -> torch.Tensor:
        """The most recent recorded loss of each block (NaN where never recorded)."""
        return self._last_loss.clone()

    # ------------------------------------------------------------------ sampling
    def _raw_permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_permutation_seed(self.seed, self._phase, epoch))
        return self._keep[torch.randperm(len(self._keep), generator=gen)]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The current phase's block order in ``epoch``: a seeded permutation of the keep-set whose head
        is adjusted so that the micro-batch straddling the epoch boundary holds no block twice (the tail
        of the previous epoch's order decides the adjustment, so orders are built epoch by epoch)."""
        cache = self._order_cache
        start = max((e for e in cache if e <= epoch), default=None)
        if start is None:
            start, cache[0] = 0, self._raw_permutation(0)
        order = cache[start]
        for e in range(start + 1, epoch + 1):
            order = self._avoid_repeats(self._raw_permutation(e), order, e)
            cache[e] = order
        for e in [e for e in cache if e < epoch - 1]:
            del cache[e]
        return order

    def _avoid_repeats(self, order: torch.Tensor, previous: torch.Tensor, epoch: int) -> torch.Tensor:
        """Move the blocks that end ``previous`` inside the straddling micro-batch out of ``order``'s head
        (first the other blocks in their permuted order, then the rest). When the keep-set is smaller
        than a global micro-batch, repeats are unavoidable and stay."""
        size = len(order)
        tail = (epoch * size) % self.global_batch  # positions of the straddling batch before the boundary
        if tail == 0:
            return order
        head = min(self.global_batch - tail, size)
        in_tail = torch.isin(order, previous[max(0, size - tail) :])
        chosen = torch.zeros(size, dtype=torch.bool)
        free = (~in_tail).nonzero().flatten()[:head]
        chosen[free] = True
        if len(free) < head:  # keep-set smaller than the batch
            chosen[in_tail.nonzero().flatten()[: head - len(free)]] = True
        return torch.cat([order[chosen], order[~chosen]])

    def next_indices(self) -> torch.Tensor:
        """This rank's block ids for the next micro-batch (LongTensor of ``batch_size``)."""
        if self.config.ppl_source == "eval_pass":
            if self._scorer is not None:
                if self._evaluation_pending():
                    self.run_evaluation_pass(self._scorer)
            elif not self._polled:
                # fail at the first draw, not after a whole Learn phase, in a loop that cannot run the pass
                raise LoriteError(
                    "LFR with ppl_source='eval_pass' needs a scorer: the training loop calls "
                    "sampler.attach_scorer(eval_pass_scorer(model, blocks)) once, or asks "
                    "sampler.evaluation_due() before every next_indices() and runs "
                    "sampler.run_evaluation_pass(score_fn); this one does neither (use ppl_source='train_forward')"
                )
        self._polled = False
        target = self._phase_of(self._step)
        if target != self._phase:
            if self._evaluation_pending():
                raise RuntimeError(
                    "LFR with ppl_source='eval_pass': the recording phase "
                    f"{self.phase.name!r} ended and its evaluation pass has not run; the training loop "
                    "must call sampler.run_evaluation_pass(score_fn) when sampler.evaluation_due()"
                )
            self._enter(target)
        local = self._step - self._phase_start(self._phase)
        start = local * self.global_batch + self.rank * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        size = len(self._keep)
        epochs, offsets = positions // size, positions % size
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._epoch_order(epoch)[offsets[mask]]
        self._step += 1
        return out

    def _enter(self, target: int) -> None:
        """Close the phases from the current one up to ``target`` (finalising records, re-ranking)."""
        while self._phase < target:
            if self.phases[self._phase].records:
                self._finish_recording()
            self._phase += 1
            phase = self.phases[self._phase]
            if phase.drop == 0:
                self._keep = torch.arange(self.n_blocks)
            elif phase.ranks:
                self._keep = self._rank_keep_set(phase.drop)
            self._order_cache = {}

    def _rank_keep_set(self, drop: float) -> torch.Tensor:
        """Drop the ⌊N·drop⌋ lowest-scoring blocks (ties: lower id first); return the rest, sorted."""
        scores = self._ranking_scores()
        order = torch.sort(scores, stable=True).indices  # stable on id order → ties broken by id
        n_drop = self.n_blocks - keep_size(self.n_blocks, drop)
        return order[n_drop:].sort().values

    def _ranking_scores(self) -> torch.Tensor:
        if self.config.rank_from == "latest":
            scores = self._latest_score.clone()
        else:
            total = self._total_ppl_sum if self.config.score == "ppl" else self._total_loss_sum
            scores = total / self._total_count  # 0/0 → NaN where never recorded
        return torch.nan_to_num(scores, nan=math.inf)

    # ------------------------------------------------------------------ recording
    def observe(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the mean token losses ℓ_b of this rank's micro-batch ``indices`` (from the training
        forward, detached). Under DDP the pairs are all-gathered first, so all ranks' stores stay equal.
        A no-op outside recording phases and when scores come from an evaluation pass."""
        indices, losses = self._check_observation(indices, losses)
        # the blocks were drawn in the current phase: phases change only inside next_indices
        if not self.phase.records or self.config.ppl_source == "eval_pass":
            return
        self._record(*self._gather(indices, losses))

    def _check_observation(self, indices, losses) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices).detach().reshape(-1).to("cpu", torch.long)
        losses = torch.as_tensor(losses).detach().reshape(-1).to("cpu", torch.float64)
        if indices.shape != losses.shape:
            raise ValueError(f"observe: {indices.numel()} indices but {losses.numel()} losses")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.n_blocks):
            raise ValueError(f"observe: block ids must lie in [0, {self.n_blocks})")
        return indices, losses

    def _record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        # a diverged (NaN) loss counts as maximally hard rather than poisoning the sums
        losses = torch.nan_to_num(losses, nan=math.inf)
        self._phase_loss_sum.index_add_(0, indices, losses)
        self._phase_ppl_sum.index_add_(0, indices, losses.exp())
        self._phase_count.index_add_(0, indices, torch.ones_like(losses))
        self._last_loss[indices] = losses

    def _finish_recording(self) -> None:
        """Turn the ending phase's sums into scores (blocks it never saw keep their previous score)."""
        seen = self._phase_count > 0
        total = self._phase_ppl_sum if self.config.score == "ppl" else self._phase_loss_sum
        self._latest_score[seen] = total[seen] / self._phase_count[seen]
        record = torch.full((self.n_blocks,), math.nan, dtype=torch.float32)
        record[seen] = (total[seen] / self._phase_count[seen]).float()
        self._records[self._phase] = record
        self._total_ppl_sum += self._phase_ppl_sum
        self._total_loss_sum += self._phase_loss_sum
        self._total_count += self._phase_count
        for t in (self._phase_ppl_sum, self._phase_loss_sum, self._phase_count):
            t.zero_()

    def _gather(self, indices: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' (id, loss) pairs in rank order (sizes may differ between ranks)."""
        if not self._distributed:
            return indices, losses
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        payload = torch.stack([indices.to(torch.float64), losses], dim=1).to(device)
        size = torch.tensor([payload.shape[0]], device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        padded = torch.zeros(max(sizes), 2, dtype=torch.float64, device=device)
        padded[: payload.shape[0]] = payload
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        rows = torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()
        return rows[:, 0].round().long(), rows[:, 1]

    # ------------------------------------------------------------------ evaluation pass (optional)
    def evaluation_due(self) -> bool:
        """True when ``ppl_source="eval_pass"`` and a recording phase has just ended unscored (a loop
        running the pass asks this before every :meth:`next_indices`)."""
        if self.config.ppl_source != "eval_pass":
            return False
        self._polled = True
        return self._evaluation_pending()

    def _evaluation_pending(self) -> bool:
        if self.config.ppl_source != "eval_pass" or self._phase >= len(self.phases) - 1:
            return False
        ended = self._step >= self._ends[self._phase]
        return ended and self.phase.records and self._evaluated_phase != self._phase

    def attach_scorer(self, score_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """With ``ppl_source="eval_pass"``: let :meth:`next_indices` run each due evaluation pass itself
        with ``score_fn`` (e.g. :func:`eval_pass_scorer`), so the training loop needs no other change.
        Not part of the state: attach again after constructing a sampler to resume into."""
        self._scorer = score_fn

    def run_evaluation_pass(self, score_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Score all N blocks with ``score_fn(ids) -> per-block mean token loss`` (a no-grad forward in
        eval mode, e.g. :func:`eval_pass_scorer`) and record them as the ending phase's scores.

        Under DDP each rank scores the strided shard ``ids[rank::world_size]`` in chunks of ``batch_size``
        (every rank makes the same number of gathers, empty chunks included; use the unwrapped model in
        ``score_fn`` so the forward itself issues no collectives)."""
        if not self._evaluation_pending():
            raise RuntimeError("no evaluation pass is due (see evaluation_due())")
        shard = torch.arange(self.rank, self.n_blocks, self.world_size)
        n_chunks = math.ceil(math.ceil(self.n_blocks / self.world_size) / self.batch_size)
        for c in range(n_chunks):
            ids = shard[c * self.batch_size : (c + 1) * self.batch_size]
            losses = score_fn(ids) if len(ids) else torch.zeros(0)
            ids, losses = self._check_observation(ids, losses)
            self._record(*self._gather(ids, losses))
        self._evaluated_phase = self._phase

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Tensors and plain Python (``torch.load(weights_only=True)``-loadable)."""
        return dict(
            kind="lfr",
            version=STATE_VERSION,
            config=asdict(self.config),
            n_blocks=self.n_blocks,
            global_batch=self.global_batch,
            total_steps=self.total_steps,
            seed=self.seed,
            step=self._step,
            phase=self._phase,
            phase_name=self.phase.name,
            evaluated_phase=self._evaluated_phase,
            keep=self._keep.clone(),
            phase_ppl_sum=self._phase_ppl_sum.clone(),
            phase_loss_sum=self._phase_loss_sum.clone(),
            phase_count=self._phase_count.clone(),
            total_ppl_sum=self._total_ppl_sum.clone(),
            total_loss_sum=self._total_loss_sum.clone(),
            total_count=self._total_count.clone(),
            latest_score=self._latest_score.clone(),
            last_loss=self._last_loss.clone(),
            record_phases=list(self._records),
            records=[r.clone() for r in self._records.values()],
        )

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the schedule (config, N, global batch, steps, seed) must match —
        the world size may differ as long as ``batch_size · world_size`` is the same."""
        if state.get("kind") != "lfr" or state.get("version") != STATE_VERSION:
            raise ValueError("not an LFR sampler state (kind/version mismatch)")
        expected = dict(
            config=asdict(self.config),
            n_blocks=self.n_blocks,
            global_batch=self.global_batch,
            total_steps=self.total_steps,
            seed=self.seed,
        )
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(f"LFR state was saved with {key}={state[key]!r}, this sampler has {value!r}")
        self._step = int(state["step"])
        self._phase = int(state["phase"])
        self._evaluated_phase = int(state["evaluated_phase"])
        self._keep = state["keep"].clone().long()
        for name in (
            "phase_ppl_sum",
            "phase_loss_sum",
            "phase_count",
            "total_ppl_sum",
            "total_loss_sum",
            "total_count",
            "latest_score",
            "last_loss",
        ):
            value = state[name]
            if value.shape != (self.n_blocks,):
                raise ValueError(
                    f"LFR state {name} has shape {tuple(value.shape)}, expected ({self.n_blocks},)"
                )
            setattr(self, f"_{name}", value.clone().to(torch.float64))
        self._records = {int(j): r.clone() for j, r in zip(state["record_phases"], state["records"])}
        self._order_cache = {}


def _dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def eval_pass_scorer(model, blocks, autocast_dtype: torch.dtype | None = None):
    """``score_fn`` for :meth:`LFRSampler.run_evaluation_pass`: ids → mean token CE of each block of
    ``blocks`` (indexable by a LongTensor of ids → (n, L) tokens), from a no-grad forward of ``model``
    (a causal LM returning ``.logits``; the unwrapped module under DDP) in eval mode (dropout off), on the
    device of its parameters, under autocast to ``autocast_dtype`` when given; the mode is restored after.
    Costs about one third of a training step per block."""

    def score(ids: torch.Tensor) -> torch.Tensor:
        tokens = blocks[ids].to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        try:
            autocast = torch.autocast(
                tokens.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            )
            with torch.no_grad(), autocast:
                logits = model(input_ids=tokens).logits
            ce = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
            )
            return ce.view(tokens.shape[0], -1).mean(dim=1).cpu()
        finally:
            model.train(was_training)

    return score
