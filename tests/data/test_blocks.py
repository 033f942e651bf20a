"""Token cache, block views and samplers (char-level tokenizer and synthetic corpora: no downloads)."""

from __future__ import annotations

import io

import pytest
import torch

from lorite.data.blocks import (
    RandomSampler,
    TokenBlocks,
    build_token_cache,
    make_sampler,
    pack_blocks,
    tokenize_documents,
)
from pretraining_data import char_tokenizer, synthetic_corpora


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tokens")
    return build_token_cache(["prose", "code"], tokenizer, 32, documents=synthetic_corpora(), root=root)


def test_pack_blocks_still_packs_with_separators():
    blocks = pack_blocks([[1, 2, 3], [4, 5]], block_length=3, separator=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing separator is the dropped tail
    assert tokenize_documents(char_tokenizer(), ["abc", "de"], 2).shape == (3, 2)


def test_token_cache_round_trip(cache, tokenizer):
    """Each split of each corpus is exactly its documents (original order), each followed by the
    separator, cut into blocks; validation documents are whole documents absent from train."""
    documents = synthetic_corpora()
    train, validation = TokenBlocks(cache, "train"), TokenBlocks(cache, "validation")
    meta = train.meta
    assert meta["dtype"] == "uint16" and meta["separator_id"] == 0 and train.block_length == 32
    for name, docs in documents.items():
        held_out = set(meta["splits"]["validation"]["corpora"][name]["titles"])
        # the default validation_fraction 0.05, at least one document, never all of them
        assert len(held_out) == min(len(docs) - 1, max(1, round(0.05 * len(docs))))
        for split, view in (("train", train), ("validation", validation)):
            chosen = [d for d in docs if (d.title in held_out) == (split == "validation")]
            expected = []
            for d in chosen:
                expected += [*tokenizer(d.text, add_special_tokens=False)["input_ids"], 0]
            first, stop = view.ranges[name]
            got = view[torch.arange(first, stop)].flatten().tolist()
            assert len(got) == len(expected) // 32 * 32
            assert got == expected[: len(got)]


def test_token_cache_views_and_errors(cache, tokenizer, tmp_path):
    both, code = TokenBlocks(cache, "train"), TokenBlocks(cache, "train", corpora=["code"])
    first, stop = both.ranges["code"]
    assert len(code) == stop - first and code.ranges == {"code": (0, len(code))}
    assert torch.equal(code[torch.tensor([0, 3])], both[torch.tensor([first, first + 3])])
    assert both[5].shape == (32,) and both[torch.tensor([5, 1, 5])].dtype == torch.long
    with pytest.raises(IndexError):
        both[torch.tensor([len(both)])]
    with pytest.raises(ValueError, match="not in this cache"):
        TokenBlocks(cache, "train", corpora=["poetry"])
    with pytest.raises(ValueError, match="unknown split"):
        TokenBlocks(cache, "test")
    with pytest.raises(ValueError, match="not a token cache"):
        TokenBlocks(tmp_path, "train")
    with pytest.raises(ValueError, match="distinct"):
        build_token_cache(["prose", "prose"], tokenizer, 32, documents=synthetic_corpora(), root=tmp_path)
    with pytest.raises(ValueError, match="block_length"):
        build_token_cache(["prose"], tokenizer, 1, documents=synthetic_corpora(), root=tmp_path)


def test_token_cache_is_found_again_and_keyed_by_recipe(cache, tokenizer):
    class Refusing:  # same vocabulary, but tokenising would fail: the cache must be reused
        def get_vocab(self):
            return tokenizer.get_vocab()

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenised again")

    root = cache.parent
    assert (
        build_token_cache(["prose", "code"], Refusing(), 32, documents=synthetic_corpora(), root=root)
        == cache
    )
    other = build_token_cache(["prose", "code"], tokenizer, 16, documents=synthetic_corpora(), root=root)
    assert other != cache and TokenBlocks(other).block_length == 16


def test_token_cache_subsamples_documents_deterministically(tokenizer, tmp_path):
    corpora = synthetic_corpora(60)
    full = TokenBlocks(build_token_cache(["prose"], tokenizer, 32, documents=corpora, root=tmp_path))
    capped = build_token_cache(["prose"], tokenizer, 32, documents=corpora, root=tmp_path, max_tokens=2000)
    again = build_token_cache(
        ["prose"], tokenizer, 32, documents=corpora, root=tmp_path / "b", max_tokens=2000
    )
    info = TokenBlocks(capped).meta["splits"]
    kept = (
        info["train"]["corpora"]["prose"]["documents"] + info["validation"]["corpora"]["prose"]["documents"]
    )
    assert 5 < kept < 60
    tokens = info["train"]["corpora"]["prose"]["tokens"] + info["validation"]["corpora"]["prose"]["tokens"]
    assert 2000 - 32 * 2 <= tokens < 2000 + 600  # reaches the cap with at most one document extra
    assert len(TokenBlocks(capped)) < len(full)
    assert torch.equal(TokenBlocks(capped)[torch.arange(3)], TokenBlocks(again)[torch.arange(3)])


def test_random_sampler_epochs_seeds_and_resume():
    sampler = make_sampler("random", n_blocks=12, batch_size=4, total_steps=9, seed=3)
    epoch = torch.cat([sampler.next_indices() for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(12)) and sampler.epoch == 1
    second = torch.cat([sampler.next_indices() for _ in range(3)])
    assert sorted(second.tolist()) == list(range(12)) and not torch.equal(epoch, second)
    other_seed = make_sampler("random", n_blocks=12, batch_size=4, total_steps=9, seed=4)
    assert not torch.equal(torch.cat([other_seed.next_indices() for _ in range(3)]), epoch)

    state = sampler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = RandomSampler(n_blocks=12, batch_size=4, total_steps=9, seed=0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(sampler.next_indices(), restored.next_indices()) for _ in range(5))
    sampler.observe(torch.tensor([1, 2]), torch.tensor([0.5, 0.1]))  # accepted, ignored
    with pytest.raises(ValueError, match="over 12 blocks"):
        RandomSampler(n_blocks=13, batch_size=4, total_steps=9).load_state_dict(state)


def test_random_sampler_shards_are_disjoint_and_cover_the_global_batch():
    n, batch, world = 10, 2, 3
    ranks = [
        make_sampler("random", n_blocks=n, batch_size=batch, total_steps=8, seed=1, rank=0, world_size=world)
    ]
    ranks += [RandomSampler(n, batch, 8, seed=1, rank=r, world_size=world) for r in (1, 2)]
    single = RandomSampler(n, batch * world, 8, seed=1)
    for _ in range(7):  # crosses epoch boundaries (60 % 10 == 0, 6 per step)
        shards = [s.next_indices().tolist() for s in ranks]
        flat = [i for shard in shards for i in shard]
        assert flat == single.next_indices().tolist()  # the same global order, sliced by rank
    first_epoch = [RandomSampler(12, 2, 1, seed=5, rank=r, world_size=3) for r in range(3)]
    seen = [i for _ in range(2) for s in first_epoch for i in s.next_indices().tolist()]
    assert sorted(seen) == list(range(12))  # disjoint shards: every block exactly once per epoch


def test_make_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("curriculum", n_blocks=4, batch_size=2, total_steps=1)
    with pytest.raises(ValueError, match="no options"):
        make_sampler("random", n_blocks=4, batch_size=2, total_steps=1, keep=0.5)
    with pytest.raises(ValueError, match="rank"):
        make_sampler("random", n_blocks=4, batch_size=2, total_steps=1, rank=2, world_size=2)


def _copy_cache(cache, tmp_path):
    import shutil

    copy = tmp_path / cache.name
    shutil.copytree(cache, copy)
    return copy


def test_a_damaged_token_cache_is_named_and_to_be_deleted(cache, tmp_path):
    from lorite.errors import DamagedArtifact

    truncated = _copy_cache(cache, tmp_path / "a")
    data = truncated / "train.bin"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size - 10])
    with pytest.raises(DamagedArtifact) as caught:
        TokenBlocks(truncated, "validation")  # any split: the cache is checked as a whole
    message = str(caught.value)
    assert f"token cache {data} holds {size - 10} bytes, meta.json says {size} (truncated)" in message
    assert f"delete {truncated}" in message
    bad_meta = _copy_cache(cache, tmp_path / "b")
    (bad_meta / "meta.json").write_text('{"block_length": 32, "spl')
    with pytest.raises(DamagedArtifact, match=r"meta.json does not parse"):
        TokenBlocks(bad_meta)
    (bad_meta / "meta.json").write_text('{"block_length": 32}')
    with pytest.raises(DamagedArtifact, match=r"not a token cache's meta.json \(bad or missing field"):
        TokenBlocks(bad_meta)
    missing = _copy_cache(cache, tmp_path / "c")
    (missing / "validation.bin").unlink()
    with pytest.raises(DamagedArtifact, match=r"validation.bin is missing"):
        TokenBlocks(missing)


def test_build_token_cache_rebuilds_a_damaged_cache_and_says_so(tokenizer, tmp_path, capsys):
    root = tmp_path / "tokens"
    built = build_token_cache(["prose", "code"], tokenizer, 32, documents=synthetic_corpora(), root=root)
    whole = {split: (built / f"{split}.bin").read_bytes() for split in ("train", "validation")}
    (built / "train.bin").write_bytes(whole["train"][:100])  # a copy cut short
    again = build_token_cache(["prose", "code"], tokenizer, 32, documents=synthetic_corpora(), root=root)
    assert again == built
    assert f"lorite: token cache {built / 'train.bin'} holds 100 bytes" in capsys.readouterr().err
    assert {split: (built / f"{split}.bin").read_bytes() for split in whole} == whole
    assert len(TokenBlocks(built, "train")) == len(whole["train"]) // (2 * 32)
    assert sorted(p.name for p in root.iterdir()) == [built.name], "no temporary folder is left"
    build_token_cache(["prose", "code"], tokenizer, 32, documents=synthetic_corpora(), root=root)
    assert capsys.readouterr().err == "", "a whole cache is used as it is"


def test_pretrain_on_a_damaged_data_cache_is_one_line_and_exit_1(cache, tmp_path, capsys):
    from lorite.cli import main

    damaged = _copy_cache(cache, tmp_path)
    (damaged / "validation.bin").write_bytes(b"")
    argv = ["pretrain", "--tokens", "1000", "--data", str(damaged), "--block-length", "32",
            "--corpora", "prose,code", "--device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        f"token cache {damaged / 'validation.bin'} holds 0 bytes" in err[0] and f"delete {damaged}" in err[0]
    )
    assert not (tmp_path / "run").exists(), "nothing is left of the refused run"
