"""Every experiment config under benchmarks/configs/ parses into a valid comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorite.train.compare import load_config, parse_lrs, parse_optimizers
from lorite.train.finetune import FinetuneConfig

CONFIGS = sorted((Path(__file__).parent.parent / "benchmarks" / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_a_valid_comparison(path):
    config = load_config(str(path))
    specs = parse_optimizers(config["optimizers"])
    grids = parse_lrs(config.get("lrs", "auto"), config["optimizers"])
    assert set(grids) == {s.label for s in specs}
    FinetuneConfig(task=config["tasks"][0], **config["training"]).validate()
    if len(next(iter(grids.values()))) > 1:  # a grid search: at least five learning rates each, or
        # three around a rate chosen beforehand when a best rate at an edge widens the grid (widen >= 1)
        assert all(len(g) >= (3 if config.get("widen", 0) >= 1 else 5) for g in grids.values())
    assert config["description"]


def test_the_paper_table_covers_every_registry_optimizer_and_the_five_dev_tasks():
    from lorite.optim import available

    config = json.loads(
        (Path(__file__).parent.parent / "benchmarks" / "configs" / "paper_table.json").read_text()
    )
    # GaLore and Fira (issue 7) are full-weight pre-training optimizers, not in the LoRA-RITE paper's table
    assert {s.optimizer for s in parse_optimizers(config["optimizers"])} == set(available()) - {
        "galore_adamw",
        "fira_adamw",
    }
    assert len(config["tasks"]) == 5 and config["seeds"] == 3


def test_configs_published_before_the_rank_guard_pin_lora_rite_to_rank_tolerance_0():
    """docs/results.md's LoRA-RITE numbers before the rank guard became the default (3e-3) were run
    with rank_tolerance 0; their configs must keep reproducing them."""
    for path in CONFIGS:
        if "guarded" in path.stem:
            continue
        specs = parse_optimizers(load_config(str(path))["optimizers"])
        for spec in specs:
            if spec.optimizer.startswith("lora_rite"):
                assert spec.args.get("rank_tolerance") == 0.0, (path.name, spec.label)
