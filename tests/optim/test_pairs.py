"""Pair discovery by module (lorite.optim.pairs): every peft layout the optimizers must get right."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from helpers import tiny_llama
from lorite.optim import LoRARite, find_lora_pairs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(**config):
    config.setdefault("target_modules", TARGETS)
    return get_peft_model(tiny_llama(), LoraConfig(**config))


def peft_layer(model, pair_name):
    module_path = pair_name.split("[")[0]
    return model.get_submodule(module_path), pair_name.split("[")[1].rstrip("]")


def test_all_linear_pairs_match_peft_delta_weights():
    model = peft_llama(r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == 2 * len(TARGETS)
    assert scan.unpaired == []
    for pair in scan.pairs:
        assert pair.kind == "linear" and pair.rank == 4 and pair.scaling == 2.0
        layer, adapter = peft_layer(model, pair.name)
        assert pair.A is layer.lora_A[adapter].weight and pair.B is layer.lora_B[adapter].weight
        torch.testing.assert_close(pair.delta_weight(), layer.get_delta_weight(adapter))


def test_rslora_scaling():
    scan = find_lora_pairs(peft_llama(r=4, lora_alpha=8, use_rslora=True))
    assert all(abs(p.scaling - 8 / 2.0) < 1e-12 for p in scan.pairs)


def test_several_adapters_pair_within_each_adapter():
    model = peft_llama(r=2, lora_alpha=2)
    model.add_adapter("second", LoraConfig(r=6, lora_alpha=6, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "second"])  # both active and trainable
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == 4 * len(TARGETS)
    for pair in scan.pairs:
        expected = 2 if pair.name.endswith("[default]") else 6
        assert pair.A.shape[0] == pair.B.shape[1] == expected
    only_second = find_lora_pairs(model, adapter_names=["second"])
    assert {p.name.split("[")[1] for p in only_second.pairs} == {"second]"}


def test_frozen_adapter_is_skipped():
    model = peft_llama(r=2)
    model.add_adapter("inactive", LoraConfig(r=3, target_modules=TARGETS))  # not active: frozen
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == 2 * len(TARGETS)
    assert all(p.name.endswith("[default]") for p in scan.pairs)
    assert scan.unpaired == []


def test_dora_magnitudes_and_modules_to_save_are_unpaired():
    model = peft_llama(r=2, use_dora=True, modules_to_save=["lm_head"])
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == 2 * len(TARGETS)
    reasons = {u.reason for u in scan.unpaired}
    assert reasons == {"DoRA magnitude", "modules_to_save copy"}
    dora = [u for u in scan.unpaired if u.reason == "DoRA magnitude"]
    assert len(dora) == 2 * len(TARGETS) and all(u.param.dim() == 1 for u in dora)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    found = {id(t) for p in scan.pairs for t in (p.A, p.B)} | {id(u.param) for u in scan.unpaired}
    assert found == trainable, "every trainable parameter is either in a pair or reported unpaired"


def test_lora_bias_is_unpaired():
    from peft import LoraConfig

    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], lora_bias=True))
    scan = find_lora_pairs(model)
    assert len(scan.pairs) == 2
    assert [u.reason for u in scan.unpaired] == ["LoRA bias", "LoRA bias"]


def test_embedding_lora_pairs_like_linear():
    model = peft_llama(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_()
    pairs = [p for p in find_lora_pairs(model).pairs if p.kind == "embedding"]
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair.A.shape == (4, 64) and pair.B.shape == (32, 4)  # (r, vocab), (dim, r)
    layer, adapter = peft_layer(model, pair.name)
    # peft's embedding delta is (B·A)ᵀ: the pair is used transposed, but pairs like a linear one
    torch.testing.assert_close(pair.delta_weight().T, layer.get_delta_weight(adapter))


def test_moe_style_blocks_and_one_frozen_factor_are_unpaired():
    class FakeLoraLayer(nn.Module):
        def __init__(self, experts=1, freeze_A=False):
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(10, 2 * experts, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2 * experts, 12, bias=False)})
            self.scaling = {"default": 1.0}
            self.num_experts = experts
            self.lora_A["default"].weight.requires_grad_(not freeze_A)

    model = nn.ModuleDict({"moe": FakeLoraLayer(experts=4), "fa": FakeLoraLayer(freeze_A=True)})
    scan = find_lora_pairs(model)
    assert scan.pairs == []
    reasons = sorted(u.reason for u in scan.unpaired)
    assert reasons == ["MoE LoRA: 4 rank blocks in one factor"] * 2 + ["one factor of this pair is frozen"]


def test_pairing_does_not_depend_on_registration_order():
    """B registered before A, and adapters in opposite orders: pairing is by module and adapter name."""

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_B = nn.ModuleDict(
                {"y": nn.Linear(3, 20, bias=False), "x": nn.Linear(5, 20, bias=False)}
            )
            self.lora_A = nn.ModuleDict(
                {"x": nn.Linear(10, 5, bias=False), "y": nn.Linear(10, 3, bias=False)}
            )
            self.scaling = {"x": 1.0, "y": 2.0}

    layer = Reordered()
    names = [n for n, _ in layer.named_parameters()]
    assert names[0].startswith("lora_B"), "the layout really is reordered"
    scan = find_lora_pairs(layer)
    by_name = {p.name: p for p in scan.pairs}
    assert by_name["[x]"].A is layer.lora_A["x"].weight and by_name["[x]"].B is layer.lora_B["x"].weight
    assert by_name["[y]"].scaling == 2.0
    LoRARite.from_model(layer, strict=True)  # ranks validated: 5 with 5, 3 with 3
