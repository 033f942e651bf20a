"""``--model`` specs: local directories, Hugging Face Hub ids through a (fake, offline) hub cache, and the
one-line errors of specs that name nothing loadable."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from helpers import tiny_model_dir
from lorite.errors import LoriteError
from lorite.models import hub_cache_dir, is_hub_id, load_causal_lm, load_tokenizer, loading, resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def hub_cache_layout(source, cache, repo_id, commit=COMMIT, branch="main"):
    """``source``'s files laid out as huggingface_hub lays a download out in its cache:
    ``models--owner--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` as relative links to the blobs,
    and ``refs/<branch>`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, with HF_HUB_OFFLINE=1 (these tests never reach the network)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-360M-Instruct", True),
        ("owner/name@main", True),
        (f"owner/name@{COMMIT}", True),
        ("owner/name.v2", True),
        ("gpt2", False),  # a bare name: a missing local path, as before
        ("./owner/name", False),
        ("/owner/name", False),
        ("~/owner/name", False),
        ("a/b/c", False),
        ("owner/model.gguf", False),
        ("owner/--name", False),
        ("owner/na..me", False),
        ("owner/", False),
    ],
)
def test_what_reads_as_a_hub_id(spec, expected):
    assert is_hub_id(spec) is expected


def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads(tiny_dir, offline_cache):
    snapshot = hub_cache_layout(tiny_dir, offline_cache, "owner/tiny")
    assert resolve_model_dir("owner/tiny") == snapshot
    assert resolve_model_dir(f"owner/tiny@{COMMIT}") == snapshot
    model, tokenizer = load_causal_lm("owner/tiny")
    reference, _ = load_causal_lm(str(tiny_dir))
    assert model.config.vocab_size == reference.config.vocab_size == len(tokenizer)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert tokenizer("ab")["input_ids"] == load_tokenizer(str(tiny_dir))("ab")["input_ids"]


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    snapshot = hub_cache_layout(tiny_dir, tmp_path / "hf" / "hub", "owner/tiny")
    assert resolve_model_dir("owner/tiny") == snapshot


def test_a_repo_with_only_pytorch_bin_weights_loads(tiny_dir, tmp_path, offline_cache):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dir, legacy)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    snapshot = hub_cache_layout(legacy, offline_cache, "owner/legacy")
    assert resolve_model_dir("owner/legacy") == snapshot
    model, _ = load_causal_lm("owner/legacy")
    reference, _ = load_causal_lm(str(tiny_dir))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_an_uncached_id_offline_is_one_line_saying_what_to_download(offline_cache):
    with pytest.raises(LoriteError) as caught:
        resolve_model_dir("HuggingFaceTB/SmolLM2-360M-Instruct")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "model 'HuggingFaceTB/SmolLM2-360M-Instruct' is not in the Hugging Face cache "
        f"(HF_HUB_CACHE={offline_cache}) and could not be downloaded (HF_HUB_OFFLINE is set): run "
        "`hf download HuggingFaceTB/SmolLM2-360M-Instruct` on a machine with network and copy that cache "
        "here, or give a local model directory"
    )
    with pytest.raises(LoriteError, match=r"`hf download owner/name --revision v2`"):
        resolve_model_dir("owner/name@v2")


def test_a_cached_snapshot_without_weights_is_refused(tiny_dir, tmp_path, offline_cache):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "model.safetensors").unlink()
    hub_cache_layout(bare, offline_cache, "owner/bare")
    with pytest.raises(LoriteError, match=r"'owner/bare' .* holds no transformers weights"):
        resolve_model_dir("owner/bare")


def test_hub_failures_online_are_one_line_each(monkeypatch, tmp_path):
    """Online (no HF_HUB_OFFLINE), with snapshot_download raising what huggingface_hub raises."""
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def failing(error):
        def snapshot_download(repo_id, **kwargs):
            calls.append((repo_id, kwargs))
            raise error

        return snapshot_download

    # no network and not cached: huggingface_hub's fallback to the cache fails
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing(LocalEntryNotFoundError("no network")))
    with pytest.raises(LoriteError) as caught:
        resolve_model_dir("owner/name")
    assert "could not be downloaded: run `hf download owner/name`" in str(caught.value)
    assert calls[0][0] == "owner/name"
    assert calls[0][1]["local_files_only"] is False and calls[0][1]["cache_dir"] == tmp_path / "hub"
    assert calls[0][1]["allow_patterns"] == loading._HUB_FILES
    # errors built without a server response (their constructors want one)
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing(missing))
    with pytest.raises(LoriteError, match=r"^model 'owner/name' is neither a local path nor a Hugging Face"):
        resolve_model_dir("owner/name")
    gated = GatedRepoError.__new__(GatedRepoError)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing(gated))
    with pytest.raises(LoriteError, match=r"is gated on the Hugging Face Hub: accept its terms at "):
        resolve_model_dir("owner/name")


@pytest.mark.parametrize("spec", ["/no/model", "./no/model", "no/model.gguf", "a/b/c", "nomodel"])
def test_a_missing_path_keeps_the_path_message(spec, offline_cache):
    with pytest.raises(LoriteError, match=rf"^model path '{spec}' does not exist \(give "):
        resolve_model_dir(spec)


def test_a_local_directory_wins_over_a_hub_id(tiny_dir, tmp_path, offline_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "owner" / "tiny")
    assert resolve_model_dir("owner/tiny").resolve() == (tmp_path / "owner" / "tiny").resolve()


def test_the_cli_prints_the_hub_error_as_one_line(capsys, tmp_path, offline_cache):
    from helpers import write_task
    from lorite.cli import main

    task = write_task(tmp_path / "task" / "task.json")
    argv = ["finetune", "--task", f"file:{task}", "--model", "owner/absent", "--steps", "1"]
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "model 'owner/absent' is not in the Hugging Face cache" in err[0]
