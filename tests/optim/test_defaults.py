"""Each optimizer's default learning rate: what ``create`` uses without ``lr`` (and ``lorite finetune``
without ``--lr``) is the constructor's own, and it lies inside the optimizer's ``--lrs auto`` grid."""

from __future__ import annotations

import pytest

from helpers import tiny_peft
from lorite.optim import REGISTRY, available, create, default_lr
from lorite.train.compare import AUTO_GRIDS


@pytest.fixture(scope="module")
def model():
    return tiny_peft(random_B=False)


@pytest.mark.parametrize("name", list(available()))
def test_the_registry_default_is_the_constructors_own(model, name):
    built = REGISTRY[name].build(model)  # no lr: the constructor's (or from_model's) default
    assert {g["lr"] for g in built.param_groups} == {default_lr(name)}
    assert {g["lr"] for g in create(name, model).param_groups} == {default_lr(name)}
    assert {g["lr"] for g in create(name, model, lr=None).param_groups} == {default_lr(name)}
    assert create(name, model, lr=0.5).param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("name", sorted(AUTO_GRIDS))
def test_the_default_lies_inside_the_auto_grid(name):
    grid = AUTO_GRIDS[name]
    assert min(grid) <= default_lr(name) <= max(grid), (name, default_lr(name), grid)


def test_lora_rite_defaults_by_variant():
    assert default_lr("lora_rite") == 1e-2 and default_lr("lora_rite_reference") == 1e-3
    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
        default_lr("sgdx")
