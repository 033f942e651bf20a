"""A federated run directory that was damaged (a truncated checkpoint.pt, a run.json that does not parse, a
checkpoint of another model): one line naming the file and saying to start again; exit 1 on the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fed_helpers import digits_spec

from lorite.cli import main
from lorite.errors import DamagedArtifact, LoriteError
from lorite.federated.runner import run
from lorite.federated.server import (
    CHECKPOINT,
    FederatedServer,
    load_final_parameters,
    open_run,
    read_checkpoint,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "run"
    run(digits_spec("fedavg", rounds=2), out, progress=None)
    return out


@pytest.fixture
def copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _rewrite(file, change):
    saved = torch.load(file, weights_only=True)
    change(saved)
    torch.save(saved, file)


def test_the_finished_run_reads_back(finished):
    saved = read_checkpoint(finished)
    assert saved["round"] == 2 and len(json.loads(saved["history"])) == 2
    assert open_run(finished).rounds == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: _truncate(out / CHECKPOINT), r"checkpoint.pt does not load \("),
        (lambda out: (out / CHECKPOINT).write_bytes(b""), r"checkpoint.pt does not load \("),
        (lambda out: _rewrite(out / CHECKPOINT, lambda s: s.pop("tensors")), r"checkpoint.pt lacks some of"),
        (
            lambda out: _rewrite(out / CHECKPOINT, lambda s: s.update(round=5)),
            r"checkpoint.pt is inconsistent",
        ),
        (lambda out: _rewrite(out / CHECKPOINT, lambda s: s.update(history="[{")), r"unreadable history"),
        (
            lambda out: (out / "run.json").write_text('{"algorithm": "fedavg", "da'),
            r"run.json does not parse",
        ),
        (lambda out: (out / "run.json").write_text("{}"), r"run.json does not parse \(.*'data'"),
    ],
)
def test_resume_of_a_damaged_run_names_the_file(copy, damage, message):
    damage(copy)
    with pytest.raises(DamagedArtifact, match=message) as caught:
        open_run(copy, rounds=3)
    assert f"federated run: {copy}" in str(caught.value)
    assert "start it again with a new --out" in str(caught.value)
    with pytest.raises(DamagedArtifact, match=message):
        load_final_parameters(copy)  # --warm-start from it


def test_a_checkpoint_of_another_model_is_refused_on_load(copy):
    _rewrite(copy / CHECKPOINT, lambda s: s.update(tensors={k: v[:1] for k, v in s["tensors"].items()}))
    with pytest.raises(DamagedArtifact, match="does not fit this run's model"):
        FederatedServer(open_run(copy), copy, progress=None)


def test_an_unknown_checkpoint_format_stays_bad_input(copy):
    _rewrite(copy / CHECKPOINT, lambda s: s.update(format=99))
    with pytest.raises(LoriteError, match="unknown checkpoint format 99") as caught:
        read_checkpoint(copy)
    assert not isinstance(caught.value, DamagedArtifact)


def test_cli_resume_of_a_truncated_checkpoint_is_one_line_and_exit_1(copy, capsys):
    _truncate(copy / CHECKPOINT)
    before = sorted(p.name for p in copy.iterdir())
    assert main(["federate", "--resume", str(copy), "--rounds", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lorite federate: error: federated run: {copy / CHECKPOINT} does not load (")
    assert sorted(p.name for p in copy.iterdir()) == before, "nothing written"
