"""Every experiment config under benchmarks/configs/ parses into a valid comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorite.cli import _compare_config
from lorite.train.compare import parse_lrs, parse_optimizers
from lorite.train.finetune import FinetuneConfig

CONFIGS = sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_a_valid_comparison(path):
    config = _compare_config(str(path))
    specs = parse_optimizers(config["optimizers"])
    grids = parse_lrs(config.get("lrs", "auto"), config["optimizers"])
    assert set(grids) == {s.label for s in specs}
    FinetuneConfig(task=config["tasks"][0], **config["training"]).validate()
    if len(next(iter(grids.values()))) > 1:  # a grid search: at least five learning rates each
        assert all(len(g) >= 5 for g in grids.values())
    assert config["description"]


def test_the_paper_table_covers_every_registry_optimizer_and_the_five_dev_tasks():
    from lorite.optim import available

    config = json.loads(
        (Path(__file__).parent.parent / "benchmarks" / "configs" / "paper_table.json").read_text()
    )
    # GaLore and Fira (issue 7) are full-weight pre-training optimizers, not in the LoRA-RITE paper's table
    assert set(config["optimizers"]) == set(available()) - {"galore_adamw", "fira_adamw"}
    assert len(config["tasks"]) == 5 and config["seeds"] == 3
