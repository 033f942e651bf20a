"""Damaged checkpoints: each damage is one line naming the file (exit 1) and leaves the run dir as it was;
with ``--keep-last`` ≥ 2 a resume falls back to the newest intact checkpoint and ends as an uninterrupted run;
a resume with another config is refused naming the keys; a checkpoint written before manifests resumes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite import __version__
from lorite.cli import main
from lorite.data.blocks import build_token_cache
from lorite.errors import DamagedArtifact, LoriteError
from lorite.train.checkpoint import MANIFEST, config_hash
from lorite.train.finetune import RESUMABLE_CHANGES, FinetuneConfig, finetune
from lorite.train.pretrain import PretrainConfig, pretrain
from pretraining_data import char_tokenizer, synthetic_corpora


def snapshot(run_dir) -> dict[str, str]:
    """Every file and folder of ``run_dir`` by relative path: a file's sha256, a folder's marker."""
    return {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(run_dir.rglob("*"))
    }


def steps_of(run_dir) -> dict[str, int]:
    return {
        p.name: json.loads((p / "train_state.json").read_text())["step"]
        for p in run_dir.iterdir()
        if p.name.startswith("checkpoint")
    }


# ------------------------------------------------------------------ fine-tuning, through the CLI
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped at step 3 (one checkpoint, of step 2), one stopped at step 5 with --keep-last 2
    (checkpoint of step 4, checkpoint-2) and the uninterrupted run of 6 steps."""
    root = tmp_path_factory.mktemp("faults")
    model, task = tiny_model_dir(root / "model"), write_task(root / "task" / "task.json")
    common = [
        "finetune", "--task", f"file:{task}", "--model", str(model), "--optimizer", "lora_rite", "--lr", "1e-2",
        "--rank", "4", "--steps", "6", "--batch-size", "4", "--n-validation", "8", "--n-test", "8",
        "--eval-batch-size", "8", "--max-length", "64", "--device", "cpu", "--target-modules", "q_proj,v_proj",
        "--dropout", "0.1", "--checkpoint-every", "2",
    ]  # fmt: skip
    assert main([*common, "--out", str(root / "one"), "--stop-after", "3"]) == 0
    assert main([*common, "--out", str(root / "two"), "--stop-after", "5", "--keep-last", "2"]) == 0
    assert main([*common, "--out", str(root / "straight")]) == 0
    assert steps_of(root / "one") == {"checkpoint": 2}
    assert steps_of(root / "two") == {"checkpoint": 4, "checkpoint-2": 2}
    return root


def copy_run(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_from_manifest(path):
    manifest = json.loads((path.parent / MANIFEST).read_text())
    del manifest["files"][path.name]
    (path.parent / MANIFEST).write_text(json.dumps(manifest, indent=1))


DAMAGES = {  # (the damaged file, how, what the message says about it)
    "truncated": ("training_state.pt", truncate, r"training_state\.pt has \d+ bytes, the manifest says \d+"),
    "broken json": ("train_state.json", lambda p: p.write_text("{not json"), r"train_state\.json has \d+ bytes"),
    "deleted": ("trainable.safetensors", lambda p: p.unlink(), r"trainable\.safetensors is missing"),
    "flipped byte": ("trainable.safetensors", flip_a_byte, r"trainable\.safetensors does not match its sha256"),
    "not in the manifest": ("training_state.pt", drop_from_manifest, r"training_state\.pt is not in the manifest"),
    # written before manifests: what can be checked is whether each file parses
    "old, broken json": ("train_state.json", lambda p: p.write_text("{not"), r"train_state\.json is not valid JSON"),
    "old, truncated": ("training_state.pt", truncate, r"training_state\.pt cannot be read \("),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_exit_1_and_changes_nothing(runs, tmp_path, capsys, damage):
    run = copy_run(runs, "one", tmp_path)
    name, damage_it, says = DAMAGES[damage]
    if damage.startswith("old"):
        (run / "checkpoint" / MANIFEST).unlink()
    damage_it(run / "checkpoint" / name)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lorite finetune: error: checkpoint {run / 'checkpoint'} is damaged: ")
    assert re.search(says, err[0]), err[0]
    assert "start again with a new --out" in err[0]
    assert snapshot(run) == before, "a failed resume changes nothing in the run dir"


def test_the_library_refuses_a_damaged_checkpoint_before_loading_anything(runs, tmp_path):
    run = copy_run(runs, "one", tmp_path)
    truncate(run / "checkpoint" / "training_state.pt")
    config = FinetuneConfig(**json.loads((run / "checkpoint" / "train_state.json").read_text())["config"])
    before = snapshot(run)
    with pytest.raises(DamagedArtifact, match=r"training_state\.pt has"):
        finetune(config, out=run, resume=True, progress=False)
    assert snapshot(run) == before


def test_the_manifest_records_every_file_the_versions_and_the_config(runs):
    folder = runs / "one" / "checkpoint"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "training_state.pt", "train_state.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["format_version"] == 1 and manifest["lorite_version"] == __version__
    assert manifest["torch_version"] == torch.__version__
    config = json.loads((folder / "train_state.json").read_text())["config"]
    assert manifest["config_hash"] == config_hash(config, RESUMABLE_CHANGES)
    assert manifest["config_hash"] == config_hash(
        {**config, "keep_last": 9, "report_to": "tensorboard"}, RESUMABLE_CHANGES
    )
    assert manifest["config_hash"] != config_hash({**config, "lr": 0.5}, RESUMABLE_CHANGES)


def matches_its_manifest(folder) -> bool:
    files = json.loads((folder / MANIFEST).read_text())["files"]
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    return found == set(files) and all(
        hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
        for name, entry in files.items()
    )


def final_numbers(run_dir) -> tuple:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["history"]["loss"], metrics["validation"], metrics["test"]


def test_keep_last_falls_back_to_the_newest_intact_checkpoint(runs, tmp_path, capsys):
    """A byte flipped: the sizes still match, the sha256 does not."""
    run = copy_run(runs, "two", tmp_path)
    name, damage_it, says = DAMAGES["flipped byte"]
    damage_it(run / "checkpoint" / name)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and notes[0].startswith(f"checkpoint {run / 'checkpoint'} is damaged (")
    assert notes[0].endswith("); resuming from checkpoint-2 instead")
    assert re.search(says, notes[0])
    assert final_numbers(run) == final_numbers(runs / "straight"), "the same run as an uninterrupted one"
    # the damaged step-4 checkpoint was written again; the run keeps its newest two, intact
    assert steps_of(run) == {"checkpoint": 6, "checkpoint-4": 4}
    assert all(matches_its_manifest(run / name) for name in ("checkpoint", "checkpoint-4"))


def test_a_write_killed_between_its_two_renames_resumes_from_the_checkpoint_it_was_replacing(
    runs, tmp_path, capsys
):
    """A checkpoint replaces the last one in two renames (``checkpoint`` → ``.checkpoint.old-<pid>``, then
    the finished ``.checkpoint.tmp-…`` → ``checkpoint``). Killed between them, the run has no ``checkpoint``;
    the resume puts the old one back (one line on stderr) and ends as the uninterrupted run, and the next
    write removes the leftovers. Before, ``--resume`` said "no checkpoint there", a fresh start said the
    folder "already holds a run", and that next write would have deleted the old one."""
    run = copy_run(runs, "one", tmp_path)
    (run / "checkpoint").rename(run / ".checkpoint.old-4242")
    shutil.copytree(run / ".checkpoint.old-4242", run / ".checkpoint.tmp-killed")  # the finished new one
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "was missing" in line]
    assert notes == [
        f"lorite: {run / 'checkpoint'} was missing (a checkpoint write was killed while replacing it); "
        "put back the one it replaced, .checkpoint.old-4242"
    ]
    assert final_numbers(run) == final_numbers(runs / "straight"), "the same run as an uninterrupted one"
    assert steps_of(run) == {"checkpoint": 6}
    assert not list(run.glob(".checkpoint.*")), "the leftovers are gone"


def test_every_checkpoint_damaged_is_one_line_naming_each(runs, tmp_path, capsys):
    run = copy_run(runs, "two", tmp_path)
    truncate(run / "checkpoint" / "training_state.pt")
    (run / "checkpoint-2" / "trainable.safetensors").unlink()
    before = snapshot(run)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training_state.pt has" in err[0]
    assert "the older ones kept are damaged too (checkpoint-2: trainable.safetensors is missing" in err[0]
    assert snapshot(run) == before


def test_resuming_with_another_config_names_the_keys_and_changes_nothing(runs, tmp_path, capsys):
    run = copy_run(runs, "one", tmp_path)
    saved = json.loads((run / "checkpoint" / "train_state.json").read_text())["config"]
    before = snapshot(run)
    other = FinetuneConfig(**{**saved, "lr": 0.5, "optimizer": "adamw", "rank": 8})
    with pytest.raises(LoriteError, match=r"the settings \['lr', 'optimizer', 'rank'\] differ") as error:
        finetune(other, out=run, resume=True, progress=False)
    assert not isinstance(error.value, DamagedArtifact)
    assert "lr: 0.01 → 0.5" in str(error.value)
    assert snapshot(run) == before


def test_a_checkpoint_without_a_manifest_still_resumes(runs, tmp_path):
    run = copy_run(runs, "one", tmp_path)
    (run / "checkpoint" / MANIFEST).unlink()  # as lorite wrote checkpoints before manifests
    assert main(["finetune", "--resume", str(run)]) == 0
    assert final_numbers(run) == final_numbers(runs / "straight")
    assert (run / "checkpoint" / MANIFEST).is_file(), "the checkpoints it writes have one"


# ------------------------------------------------------------------ pre-training
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return build_token_cache(
        ["prose", "code"], char_tokenizer(), 32, documents=synthetic_corpora(), root=root
    )


def tiny(cache, **overrides) -> PretrainConfig:
    settings = dict(
        size="tiny", lr=3e-3, tokens=32 * 8 * 8, block_length=32, batch_size=8, corpora=["prose", "code"],
        data=str(cache), eval_every=4, eval_blocks=4, log_every=2, device="cpu", checkpoint_every=3,
    )  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_pretrain_falls_back_refuses_damage_and_names_changed_settings(cache, tmp_path, capsys):
    full = pretrain(tiny(cache), tmp_path / "full")
    run = tmp_path / "run"
    pretrain(tiny(cache, keep_last=2), run, stop_after=5)
    assert steps_of(run) == {"checkpoint": 5, "checkpoint-3": 3}
    flip_a_byte(run / "checkpoint" / "training_state.pt")
    before = snapshot(run)

    with pytest.raises(LoriteError, match=r"the settings \['lr', 'optimizer'\] differ") as error:
        pretrain(tiny(cache, keep_last=2, lr=1e-2, optimizer="lamb"), run, resume=True)
    assert not isinstance(error.value, DamagedArtifact) and snapshot(run) == before

    lone = shutil.copytree(run, tmp_path / "lone")
    shutil.rmtree(lone / "checkpoint-3")
    lone_before = snapshot(lone)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(lone)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training_state.pt does not match its sha256" in err[0], err
    assert snapshot(lone) == lone_before

    resumed = pretrain(tiny(cache, keep_last=2, report_to="none", progress=True), run, resume=True)
    assert "resuming from checkpoint-3 instead" in capsys.readouterr().err
    assert resumed["validation"] == full["validation"] and resumed["train"] == full["train"]
    # the damaged step-5 checkpoint is not kept when step 6 replaces it
    assert steps_of(run) == {"checkpoint": 6, "checkpoint-3": 3}
