"""Packed token blocks: documents tokenised, joined with an end-of-text token and cut into fixed-length
blocks — the unit of language-model training and perplexity evaluation.

* :func:`pack_blocks` / :func:`tokenize_documents` — in-memory blocks (fine-tuning on a corpus);
* :func:`build_token_cache` / :class:`TokenBlocks` — a memory-mapped, cached block array with a
  train/validation split by document, each corpus addressable on its own (pre-training); a cache is
  checked whenever it is used (:func:`read_token_cache`): a damaged one found by
  :func:`build_token_cache` is rebuilt (with a note on stderr), one opened directly is a
  :class:`~lorite.errors.DamagedArtifact` that says to delete it;
* :func:`make_sampler` / :class:`RandomSampler` — which blocks each micro-batch trains on (one protocol
  for uniform sampling and adaptive schedules such as LFR).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import torch

from ..cache import atomic_directory, cache_dir
from ..errors import DamagedArtifact
from .corpora import load_corpus
from .lfr import LFRSampler


def pack_blocks(token_lists: list[list[int]], block_length: int, separator: int | None) -> torch.Tensor:
    """Concatenate ``token_lists`` (``separator`` between documents) and cut into ``(N, block_length)``
    blocks; the tail shorter than a block is dropped."""
    if block_length < 2:
        raise ValueError(f"block_length must be >= 2, got {block_length}")
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    n = len(stream) // block_length
    return torch.tensor(stream[: n * block_length], dtype=torch.long).view(n, block_length)


def tokenize_documents(tokenizer, texts: list[str], block_length: int) -> torch.Tensor:
    """Blocks of ``block_length`` tokens from ``texts`` with the tokenizer's EOS between documents."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return pack_blocks(ids, block_length, tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------- the token cache
# A token cache is a directory ``<root>/<key>/`` holding ``train.bin`` and ``validation.bin`` (row-major
# ``(n_blocks, block_length)`` arrays of uint16 — int32 when the vocabulary exceeds 65,536 — read through a
# memory map) and ``meta.json`` (corpora, the block range of each corpus in each split, document and token
# counts, the held-out document titles). ``key`` hashes everything the bytes depend on, so a cache built
# once (here, or copied in from elsewhere) is found again instead of rebuilt.
TOKEN_CACHE_VERSION = 2  # bump when tokenisation or a corpus reader changes what the bytes hold


def _cache_problem(path: Path) -> tuple[Path, str] | None:
    """What is wrong with the token cache in ``path``, as ``(file, problem)``; None when it is whole."""
    import numpy as np  # optional dependency (lorite[all]): memory-mapped token arrays

    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return meta_file, f"does not parse ({' '.join(str(error).split())})"
    try:
        block_length = int(meta["block_length"])
        itemsize = np.dtype(meta["dtype"]).itemsize
        splits = meta["splits"]
        if not isinstance(splits, dict) or not splits:
            raise TypeError("no splits")
        for split, info in splits.items():
            n_blocks = int(info["n_blocks"])
            for name, where in info["corpora"].items():
                if not 0 <= int(where["start"]) <= int(where["stop"]) <= n_blocks:
                    return (
                        meta_file,
                        f"corpus {name!r} of the {split} split lies outside its {n_blocks} blocks",
                    )
            data = path / f"{split}.bin"
            if not data.is_file():
                return data, "is missing"
            size, expected = data.stat().st_size, n_blocks * block_length * itemsize
            if size != expected:
                state = "truncated" if size < expected else "longer than meta.json says"
                return data, f"holds {size} bytes, meta.json says {expected} ({state})"
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return meta_file, f"is not a token cache's meta.json (bad or missing field: {error})"
    return None


def read_token_cache(path: str | Path) -> dict:
    """The ``meta.json`` of the token cache in ``path``, after checking the cache is whole: ``meta.json``
    parses and has its fields, each split's ``.bin`` exists with exactly the bytes ``meta.json`` implies.
    A directory without ``meta.json`` is a :class:`ValueError`; a damaged cache is a
    :class:`~lorite.errors.DamagedArtifact` naming the file and saying to delete the cache."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise ValueError(f"{str(path)!r} is not a token cache (no meta.json)")
    if (problem := _cache_problem(path)) is not None:
        file, what = problem
        raise DamagedArtifact(
            f"token cache {file} {what}; delete {path} (lorite builds it again from its corpora)"
        )
    return json.loads((path / "meta.json").read_text())


def document_separator_id(tokenizer) -> int:
    """The token between packed documents: ``<|endoftext|>`` when the vocabulary has it (SmolLM2: 0),
    else the tokenizer's EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return tokenizer.eos_token_id


def _tokenizer_fingerprint(tokenizer) -> str:
    # the vocabulary only: the tokenizer's class name differs between transformers versions
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _document_order(n_documents: int, name: str, seed: int) -> list[int]:
    order = list(range(n_documents))
    random.Random(f"{seed}:{name}").shuffle(order)  # str seeds hash with SHA-512: stable across runs
    return order


def _split_and_subsample(n_tokens_of, n_documents: int, name: str, seed: int, fraction: float, cap):
    """Document ids ``(train, validation)``: the documents in a seeded random order; with a token ``cap``
    the shortest prefix of that order reaching it is kept; the first ``max(1, round(fraction·kept))`` of
    the kept ones are held out. Both lists come back sorted (original document order)."""
    order = _document_order(n_documents, name, seed)
    if cap is not None:
        kept, total = [], 0
        for i in order:
            if total >= cap:
                break
            kept.append(i)
            total += n_tokens_of(i)
        order = kept
    if len(order) < 2:
        raise ValueError(
            f"corpus {name!r}: need >= 2 documents for a train/validation split, have {len(order)}"
        )
    n_validation = min(len(order) - 1, max(1, round(fraction * len(order))))
    return sorted(order[n_validation:]), sorted(order[:n_validation])


def build_token_cache(
    corpora: list[str],
    tokenizer,
    block_length: int,
    *,
    validation_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | dict[str, int] | None = None,
    documents: dict[str, list] | None = None,
    root: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """Tokenise ``corpora`` once into a memory-mapped block cache and return its directory.

    Per corpus: documents are put in a seeded random order (``seed``), optionally cut to the first ones
    that reach ``max_tokens`` tokens (an int for every corpus or a dict per corpus name), and split **by
    document**: ``round(validation_fraction·n)`` (at least 1) held out. Each split's documents, in their
    original order, are joined with :func:`document_separator_id` after each one and cut into blocks of
    ``block_length`` tokens (the tail shorter than a block is dropped); corpora are packed separately, so
    a block never mixes two and each corpus is a contiguous block range (``TokenBlocks(..., corpora=)``).

    ``documents`` supplies the documents of some names directly (tests, custom data) instead of
    :func:`lorite.data.corpora.load_corpus`. ``root`` defaults to ``$LORITE_CACHE/tokens``.
    """
    import numpy as np  # optional dependency (lorite[all]): memory-mapped token arrays

    if not corpora or len(set(corpora)) != len(corpora):
        raise ValueError(f"corpora must be a non-empty list of distinct names, got {corpora!r}")
    if block_length < 2:
        raise ValueError(f"block_length must be >= 2, got {block_length}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    caps = max_tokens if isinstance(max_tokens, dict) else dict.fromkeys(corpora, max_tokens)
    if unknown := set(caps) - set(corpora):
        raise ValueError(f"max_tokens names corpora not in the list: {sorted(unknown)}")
    documents = documents or {}
    supplied = {
        name: hashlib.sha256(json.dumps([(d.title, d.text) for d in docs]).encode()).hexdigest()[:16]
        for name, docs in sorted(documents.items())
    }
    recipe = {
        "version": TOKEN_CACHE_VERSION,
        "corpora": list(corpora),
        "block_length": block_length,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "max_tokens": {name: caps.get(name) for name in corpora},
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "supplied_documents": supplied,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(root) if root is not None else cache_dir() / "tokens"
    target = target / f"{'+'.join(corpora)}-L{block_length}-{digest}"
    if target.exists():
        problem = _cache_problem(target)
        if problem is None:
            return target
        print(  # a cache: rebuilt (atomically replacing the damaged one), not a reason to stop
            f"lorite: token cache {problem[0]} {problem[1]}; rebuilding {target}", file=sys.stderr
        )

    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    separator = document_separator_id(tokenizer)
    meta = {
        **recipe,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "separator_id": separator,
        "splits": {"train": {"n_blocks": 0, "corpora": {}}, "validation": {"n_blocks": 0, "corpora": {}}},
    }
    arrays: dict[str, list] = {"train": [], "validation": []}
    for name in corpora:
        docs = documents[name] if name in documents else load_corpus(name)
        tokens: dict[int, np.ndarray] = {}

        def tokenize(ids, docs=docs, tokens=tokens):
            ids = [i for i in ids if i not in tokens]
            for start in range(0, len(ids), 64):
                chunk = ids[start : start + 64]
                encoded = tokenizer([docs[i].text for i in chunk], add_special_tokens=False)["input_ids"]
                for i, e in zip(chunk, encoded):
                    tokens[i] = np.asarray([*e, separator], dtype=dtype)

        order = _document_order(len(docs), name, seed)
        where = {i: k for k, i in enumerate(order)}

        def n_tokens_of(i, tokenize=tokenize, tokens=tokens, order=order, where=where):
            if i not in tokens:  # asked in ``order``: tokenise the next 64 at once (one call each is slow)
                tokenize(order[where[i] : where[i] + 64])
            return len(tokens[i])

        train_ids, validation_ids = _split_and_subsample(
            n_tokens_of if caps.get(name) is not None else (lambda i: 0),
            len(docs), name, seed, validation_fraction, caps.get(name),
        )  # fmt: skip
        for split, ids in (("train", train_ids), ("validation", validation_ids)):
            tokenize(ids)
            stream = np.concatenate([tokens[i] for i in ids])
            n = len(stream) // block_length
            if n == 0:
                raise ValueError(f"corpus {name!r}: its {split} split is shorter than one block")
            info = meta["splits"][split]
            info["corpora"][name] = {
                "start": info["n_blocks"],
                "stop": info["n_blocks"] + n,
                "documents": len(ids),
                "tokens": n * block_length,
            }
            if split == "validation":
                info["corpora"][name]["titles"] = [docs[i].title for i in ids]
            info["n_blocks"] += n
            arrays[split].append(stream[: n * block_length])
        if progress:
            counts = {s: meta["splits"][s]["corpora"][name]["tokens"] for s in arrays}
            print(f"lorite: tokenised {name}: {counts}", file=sys.stderr)
    with atomic_directory(target) as tmp:
        for split, parts in arrays.items():
            np.concatenate(parts).tofile(tmp / f"{split}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return target


class TokenBlocks:
    """The blocks of one split of a token cache (see :func:`build_token_cache`), optionally restricted to
    some ``corpora``; ``blocks[idx]`` is an ``(n, block_length)`` LongTensor for a LongTensor ``idx`` of
    block ids ``0 ≤ id < len(blocks)`` (ids are stable: they index the selected corpora in cache order)."""

    def __init__(self, path: str | Path, split: str = "train", corpora: list[str] | None = None):
        import numpy as np  # optional dependency (lorite[all]): memory-mapped token arrays

        self.path = Path(path)
        self.meta = read_token_cache(self.path)
        if split not in self.meta["splits"]:
            raise ValueError(f"unknown split {split!r}; the cache has {', '.join(self.meta['splits'])}")
        self.split = split
        self.block_length = int(self.meta["block_length"])
        info = self.meta["splits"][split]
        self.corpora = list(corpora) if corpora is not None else list(info["corpora"])
        if unknown := [c for c in self.corpora if c not in info["corpora"]]:
            raise ValueError(
                f"corpus {unknown[0]!r} is not in this cache; it has {', '.join(info['corpora'])}"
            )
        self._array = np.memmap(
            self.path / f"{split}.bin",
            dtype=self.meta["dtype"],
            mode="r",
            shape=(info["n_blocks"], self.block_length),
        )
        ranges = [(info["corpora"][c]["start"], info["corpora"][c]["stop"]) for c in self.corpora]
        self._rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        self.ranges = {}  # corpus -> (first id, stop id) in this view
        offset = 0
        for c, (a, b) in zip(self.corpora, ranges):
            self.ranges[c] = (offset, offset + b - a)
            offset += b - a

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def n_tokens(self) -> int:
        return len(self) * self.block_length

    def __getitem__(self, idx) -> torch.Tensor:
        import numpy as np  # optional dependency (lorite[all]): memory-mapped token arrays

        ids = torch.as_tensor(idx, dtype=torch.long).cpu()
        single = ids.dim() == 0
        ids = ids.reshape(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"block ids must be in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        rows = np.asarray(self._array[self._rows[ids.numpy()]], dtype=np.int64)
        blocks = torch.from_numpy(rows)
        return blocks[0] if single else blocks


# ----------------------------------------------------------------------------------------- samplers
class RandomSampler:
    """Uniform sampling without replacement, epoch by epoch: epoch e visits every block once in the order
    of a permutation seeded by ``(seed, e)``; epochs run back to back (a micro-batch may straddle two).
    Under DDP every rank computes the same global order and takes its own disjoint slice
    ``[rank·batch_size, (rank+1)·batch_size)`` of each global micro-batch of ``world_size·batch_size``.
    State: the global position (blocks consumed by all ranks), so a resumed run continues exactly."""

    name = "random"

    def __init__(
        self,
        n_blocks: int,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if n_blocks < 1 or batch_size < 1 or total_steps < 0:
            raise ValueError(
                f"need n_blocks, batch_size >= 1, total_steps >= 0; got {n_blocks}, {batch_size}, {total_steps}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.n_blocks, self.batch_size, self.total_steps = n_blocks, batch_size, total_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0
        self._epoch, self._permutation = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.n_blocks, generator=generator)
        return self._permutation

    @property
    def epoch(self) -> int:
        return self.position // self.n_blocks

    def next_indices(self) -> torch.Tensor:
        start = self.position + self.rank * self.batch_size
        positions = range(start, start + self.batch_size)
        ids = [int(self._order(p // self.n_blocks)[p % self.n_blocks]) for p in positions]
        self.position += self.batch_size * self.world_size
        return torch.tensor(ids, dtype=torch.long)

    def observe(self, indices: torch.Tensor, per_block_loss: torch.Tensor) -> None:
        """Uniform sampling ignores the losses (the protocol lets adaptive samplers such as LFR use them)."""

    def state_dict(self) -> dict:
        return {"name": self.name, "position": self.position, "seed": self.seed, "n_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or int(state["n_blocks"]) != self.n_blocks:
            raise ValueError(
                f"sampler state is for {state.get('name')!r} over {state.get('n_blocks')} blocks, "
                f"this sampler is {self.name!r} over {self.n_blocks}"
            )
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._epoch = -1


SAMPLERS = ("random", "lfr")


def make_sampler(
    name: str,
    *,
    n_blocks: int,
    batch_size: int,
    total_steps: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    **options,
):
    """A sampler over block ids ``0..n_blocks-1`` with the protocol ``next_indices()`` → LongTensor of this
    rank's ``batch_size`` ids for the next micro-batch; ``observe(ids, per_block_loss)``;
    ``state_dict()`` / ``load_state_dict()``. ``total_steps`` is the number of micro-batches the run will
    draw per rank (optimizer steps × gradient accumulation). ``"random"``: :class:`RandomSampler`;
    ``"lfr"``: ``lorite.data.lfr.LFRSampler`` (Learn-Focus-Review, arXiv 2409.06131), with ``options``."""
    common = {"n_blocks": n_blocks, "batch_size": batch_size, "total_steps": total_steps, "seed": seed}
    common.update(rank=rank, world_size=world_size)
    if name == "random":
        if options:
            raise ValueError(f"the random sampler takes no options, got {sorted(options)}")
        return RandomSampler(**common)
    if name == "lfr":
        return LFRSampler(**common, **options)
    raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
