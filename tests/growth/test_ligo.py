"""LiGO growth operator (lorite.growth.ligo): exact function preservation where the operator allows it,
GQA/tied-embedding shapes, only operator parameters train, materialised model = operator forward."""

from __future__ import annotations

import pytest
import torch

from lorite.growth.ligo import (
    LiGOConfig,
    LiGOOperator,
    OperatorTrainingConfig,
    check_growable,
    depth_init,
    depth_mix,
    grow,
    operator_parameter_count,
    train_operator,
    width_expand,
)


def config(**overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-12, tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


def small_model(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms, so their expansion is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    return model


def token_ids(seed=0, batch=3, length=12, vocab=64):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def patterned_batches(n, batch=8, length=16, vocab=64, seed=0):
    """Learnable data: arithmetic sequences with random offsets and strides 1 or 2."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 3, (batch, 1), generator=gen)
        out.append((start + stride * torch.arange(length)) % vocab)
    return out


GQA_DOUBLE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4)


# ------------------------------------------------------------------------ function preservation
def test_depth_only_identity_growth_keeps_the_small_models_outputs():
    small = small_model()
    ids = token_ids()
    operator = LiGOOperator(small, config(num_hidden_layers=5), LiGOConfig(depth_init="identity"))
    assert operator.parameter_count() == 9 * 5 * 2  # depth only: no width rows when widths are equal
    torch.testing.assert_close(operator(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=1e-6)
    # interlacing: new layers 0,1,2 come from small layer 0 and 3,4 from layer 1; the repeated copies
    # (1, 2, 4) have zero residual-writer coefficients, which makes them identity layers
    assert torch.equal(operator.depth["q_weight"].argmax(1), torch.tensor([0, 0, 0, 1, 1]))
    for key in ("o_weight", "down_weight"):
        assert torch.all(operator.depth[key][[1, 2, 4]] == 0) and torch.all(
            operator.depth[key][[0, 3]].sum(1) == 1
        )


def test_same_size_identity_operator_is_the_small_model():
    small = small_model()
    operator = LiGOOperator(small, config(), LiGOConfig(depth_init="stack"))
    fused = operator.fused_state_dict()
    for name, value in small.state_dict().items():
        assert torch.equal(fused[name], value), name


def test_noise_free_stacking_equals_stackbert():
    """C-free depth-only growth with one-hot depth: new layer i is exactly small layer i mod L1."""
    from transformers import LlamaForCausalLM

    small = small_model()
    grown, info = grow(small, config(num_hidden_layers=5), method="stack")
    assert info["operator_parameters"] == 9 * 5 * 2 and "operator_losses" not in info
    stacked = LlamaForCausalLM(config(num_hidden_layers=5)).eval()
    state = small.state_dict()
    stacked_state = {}
    for name in stacked.state_dict():
        if name.startswith("model.layers."):
            index, rest = name.split(".", 3)[2:]
            name_small = f"model.layers.{int(index) % 2}.{rest}"
        else:
            name_small = name
        stacked_state[name] = state[name_small]
    stacked.load_state_dict(stacked_state)
    for name, value in stacked.state_dict().items():
        assert torch.equal(grown.state_dict()[name], value), name
    ids = token_ids()
    torch.testing.assert_close(
        grown.eval()(input_ids=ids).logits, stacked(input_ids=ids).logits, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("tied", "form"), [(False, "identity_plus_C"), (True, "identity_plus_C"), (False, "full")]
)
def test_width_and_depth_growth_with_zero_rows_preserves_function(tied, form):
    """C = 0: new residual units, FFN units and heads stay exactly 0; with the RMSNorm compensation
    sqrt(D1/D2) the old units see the small model's normalisation (ε = 1e-12 here, the only difference)."""
    small = small_model(tie_word_embeddings=tied)
    large = config(num_hidden_layers=3, tie_word_embeddings=tied, **GQA_DOUBLE)
    operator = LiGOOperator(
        small, large, LiGOConfig(depth_init="identity", width_init="zero", width_form=form)
    )
    ids = token_ids()
    torch.testing.assert_close(operator(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=1e-5)
    # without the compensation the grown model is a different function
    plain = LiGOOperator(
        small, large, LiGOConfig(depth_init="identity", width_init="zero", compensate_scales=False)
    )
    assert (plain(input_ids=ids).logits - small(input_ids=ids).logits).abs().max() > 1e-2


def test_head_dim_growth_keeps_rope_pairs_and_function():
    """head_dim 8 → 16: old rotary pair p goes to pair 2p (same frequency); with zero rows and the q
    temperature compensation sqrt(16/8) the attention logits, hence outputs, are unchanged."""
    small = small_model()
    large = config(hidden_size=48, intermediate_size=96, head_dim=16, num_hidden_layers=4)
    operator = LiGOOperator(small, large, LiGOConfig(depth_init="identity", width_init="zero"))
    P = operator.qk_pairs()[0]
    assert (
        P.shape == (8, 4) and torch.equal(P[[0, 2, 4, 6]], torch.eye(4)) and torch.all(P[[1, 3, 5, 7]] == 0)
    )
    ids = token_ids()
    torch.testing.assert_close(operator(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert operator.parameter_count() == operator_parameter_count(small.config, large)


@pytest.mark.parametrize("tied", [False, True])
def test_net2net_copy_growth_with_pinv_inputs_preserves_function(tied):
    """Exact copies (every unit and head duplicated once) with the pseudo-inverse input side: x_new = E x
    stays true through RMSNorm, SwiGLU and attention, so W E⁺ E x = W x everywhere."""
    small = small_model(tie_word_embeddings=tied)
    large = config(num_hidden_layers=4, tie_word_embeddings=tied, **GQA_DOUBLE)
    ligo = LiGOConfig(depth_init="identity", width_init="sel", input_side="pinv", compensate_scales=False)
    operator = LiGOOperator(small, large, ligo)
    ids = token_ids()
    torch.testing.assert_close(operator(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ shapes, GQA, ties
@pytest.mark.parametrize(
    ("small_heads", "large_heads"),
    [((4, 2), (8, 4)), ((4, 2), (12, 4)), ((4, 4), (8, 8)), ((4, 1), (8, 2))],
)
def test_gqa_shapes_and_consistent_head_initialisation(small_heads, large_heads):
    (H1, K1), (H2, K2) = small_heads, large_heads
    small = small_model(num_attention_heads=H1, num_key_value_heads=K1)
    D2 = 8 * H2
    large = config(hidden_size=D2, intermediate_size=96, num_hidden_layers=3, num_attention_heads=H2,
                   num_key_value_heads=K2)  # fmt: skip
    operator = LiGOOperator(small, large)
    fused = operator.fused_state_dict()
    assert fused["model.layers.2.self_attn.q_proj.weight"].shape == (H2 * 8, D2)
    assert fused["model.layers.2.self_attn.k_proj.weight"].shape == (K2 * 8, D2)
    assert fused["model.layers.2.self_attn.v_proj.weight"].shape == (K2 * 8, D2)
    assert fused["model.layers.2.self_attn.o_proj.weight"].shape == (D2, H2 * 8)
    assert fused["model.layers.0.mlp.down_proj.weight"].shape == (D2, 96)
    # E_q = E_kv ⊗ E_group at init: old query head (a, r) sits at (a, r) of the new grouping, and a new
    # query head combines old query heads of the kv heads its own kv head combines
    G1, G2 = H1 // K1, H2 // K2
    E = operator.expansions()
    for layer in range(3):
        Ek, Eq = E["k"][layer], E["q"][layer].reshape(K2, G2, K1, G1)
        assert torch.equal(E["k"][layer], E["v"][layer])
        for a in range(K1):
            for r in range(G1):
                expected = torch.zeros(K1, G1)
                expected[a, r] = 1
                assert torch.equal(Eq[a, r], expected)
        group = Eq.sum(dim=3)  # (K2, G2, K1): Σ_r E_kv[a', a]·E_group[s, r]; rand rows sum to 1
        torch.testing.assert_close(group, Ek[:, None, :].expand(K2, G2, K1), rtol=1e-5, atol=1e-6)
    assert operator.parameter_count() == operator_parameter_count(small.config, large)
    ids = token_ids()
    assert torch.isfinite(operator(input_ids=ids).logits).all()


def test_inconsistent_head_growth_and_shrinking_are_rejected():
    small = small_model()
    with pytest.raises(ValueError, match="query heads per key/value head"):
        check_growable(small.config, config(hidden_size=64, num_attention_heads=8, num_key_value_heads=8))
    with pytest.raises(ValueError, match="must not be smaller"):
        check_growable(small.config, config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="vocab_size"):
        check_growable(small.config, config(vocab_size=65))
    with pytest.raises(ValueError, match="cannot tie"):
        check_growable(small.config, config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="depth_init"):
        LiGOOperator(small, config(), LiGOConfig(depth_init="bogus"))


def test_tied_embeddings_stay_tied_and_untied_head_is_expanded_on_its_input_side():
    tied_small = small_model(tie_word_embeddings=True)
    model = LiGOOperator(tied_small, config(tie_word_embeddings=True, **GQA_DOUBLE)).materialize()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (64, 64)
    # a tied small model may grow into an untied one: both matrices start from the same table
    untied = LiGOOperator(tied_small, config(**GQA_DOUBLE)).materialize()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    torch.testing.assert_close(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_pure_functions_are_the_kronecker_and_depth_maps():
    gen = torch.Generator().manual_seed(0)
    W, B, A = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((3, 4), (5, 3), (6, 4)))
    vec = lambda M: M.mT.reshape(-1)  # noqa: E731  (column-major vec)
    torch.testing.assert_close(vec(width_expand(W, B, A)), torch.kron(A, B) @ vec(W))
    layers = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    mixed = depth_mix(layers, w)
    assert mixed.shape == (3, 3, 4) and torch.equal(mixed[0], layers[0]) and torch.equal(mixed[2], layers[1])
    torch.testing.assert_close(mixed[1], 0.25 * layers[0] + 0.75 * layers[1])


def test_depth_initialisations():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(depth_init(4, 2, "stack", 0.0, gen).argmax(1), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(depth_init(4, 2, "interlace", 0.0, gen).argmax(1), torch.tensor([0, 0, 1, 1]))
    noisy = depth_init(6, 3, "stack_noisy", 0.03, gen)
    torch.testing.assert_close(noisy.sum(1), torch.ones(6))
    assert torch.equal(noisy.argmax(1), torch.tensor([0, 1, 2, 0, 1, 2])) and (noisy > 0).all()


# ------------------------------------------------------------------------------- operator training
def test_full_width_form_parameter_count():
    small = small_model()
    large = config(num_hidden_layers=3, **GQA_DOUBLE)
    operator = LiGOOperator(small, large, LiGOConfig(width_form="full"))
    assert operator.parameter_count() == operator_parameter_count(small.config, large, width_form="full")
    # D2·D1 + L2·(F2·F1 + H2·H1 + 2·K2·K1) + 9·L2·L1
    assert operator.parameter_count() == 64 * 32 + 3 * (128 * 64 + 8 * 4 + 2 * 4 * 2) + 9 * 3 * 2


def test_only_operator_parameters_train_and_the_lm_loss_decreases():
    small = small_model()
    reference = {k: v.clone() for k, v in small.state_dict().items()}
    operator = LiGOOperator(small, config(num_hidden_layers=3, **GQA_DOUBLE))
    names = {name for name, _ in operator.named_parameters()}
    assert names == {f"depth.{k}" for k in operator.depth} | {
        "residual.rows",
        "ffn.rows",
        "q_heads.rows",
        "k_heads.rows",
        "v_heads.rows",
    }
    before = {name: p.detach().clone() for name, p in operator.named_parameters()}
    batches = patterned_batches(40)
    losses = train_operator(
        operator, batches, OperatorTrainingConfig(steps=40, lr=1e-2, warmup_steps=4), progress=False
    )
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    for name, p in operator.named_parameters():  # every operator coefficient moved …
        assert not torch.equal(p, before[name]), name
    for name, value in small.state_dict().items():  # … the small model did not
        assert torch.equal(value, reference[name]), name
    assert all(p.grad is None for p in small.parameters())


def test_materialised_model_roundtrips_through_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    small = small_model(tie_word_embeddings=True)
    large = config(num_hidden_layers=3, tie_word_embeddings=True, **GQA_DOUBLE)
    grown, info = grow(
        small, large, batches=patterned_batches(5),
        training=OperatorTrainingConfig(steps=5, lr=1e-2, warmup_steps=1), progress=False,
    )  # fmt: skip
    assert len(info["operator_losses"]) == 5
    grown.save_pretrained(tmp_path / "grown")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "grown").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = token_ids()
    torch.testing.assert_close(
        loaded(input_ids=ids).logits, grown.eval()(input_ids=ids).logits, rtol=0, atol=0
    )


def test_materialised_weights_equal_the_operator_forward_after_training():
    small = small_model()
    operator = LiGOOperator(small, config(num_hidden_layers=4, **GQA_DOUBLE))
    train_operator(
        operator,
        patterned_batches(3),
        OperatorTrainingConfig(steps=3, lr=1e-2, warmup_steps=1),
        progress=False,
    )
    model = operator.materialize().eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, operator.eval()(input_ids=ids).logits, rtol=0, atol=1e-6
        )
        loss = operator(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, loss, rtol=0, atol=1e-6)


def test_stack_method_is_the_untrained_operator_and_ligo_needs_batches():
    small = small_model()
    large = config(num_hidden_layers=4, **GQA_DOUBLE)
    stacked, info = grow(small, large, method="stack")
    assert info["ligo_config"]["depth_init"] == "stack" and "operator_losses" not in info
    layer = stacked.model.layers
    # StackBERT depth: layers 0 and 2 mix the same source with the same (shared) width expansions of the
    # residual stream, but their per-layer expansions differ; their norms (residual-only) are equal
    assert torch.equal(layer[0].input_layernorm.weight, layer[2].input_layernorm.weight)
    with pytest.raises(ValueError, match="training batches"):
        grow(small, large, method="ligo")
    with pytest.raises(ValueError, match="method"):
        grow(small, large, method="bert2bert")


# ------------------------------------------------------------------------------------- lorite grow
def test_grow_cli_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path, capsys):
    import json

    from transformers import LlamaForCausalLM

    from lorite.cli import main
    from lorite.data.blocks import build_token_cache
    from pretraining_data import char_tokenizer, synthetic_corpora

    tokenizer = char_tokenizer()
    corpora = synthetic_corpora(12)
    cache = build_token_cache(list(corpora), tokenizer, 32, documents=corpora, root=tmp_path / "tokens")
    # a "20m"-like small model for the "tiny" target (hidden 32, FFN 88, 2 layers, 4 heads of 8)
    small = small_model(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=44, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6)  # fmt: skip
    small.save_pretrained(tmp_path / "small")
    out = tmp_path / "grown"
    argv = ["grow", "--from", str(tmp_path / "small"), "--to-size", "tiny", "--out", str(out), "--data", str(cache),
            "--ligo-steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--eval-blocks", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads((out / "growth.json").read_text())
    assert len(info["operator_losses"]) == 4 and info["operator_tokens"] == 4 * 4 * 32
    assert {"small_validation_loss", "grown_validation_loss_at_init", "grown_validation_loss"} <= set(info)
    grown = LlamaForCausalLM.from_pretrained(out)
    assert grown.config.hidden_size == 32 and grown.config.num_hidden_layers == 2
    assert grown.num_parameters() == info["large_parameters"]
    capsys.readouterr()
    assert main(argv) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    stack_argv = [
        *argv[:6],
        str(tmp_path / "stacked"),
        "--method",
        "stack",
        "--eval-blocks",
        "0",
        "--no-progress",
    ]
    assert main(stack_argv) == 0
    assert "operator_losses" not in json.loads((tmp_path / "stacked" / "growth.json").read_text())
    assert main([*argv[:4], "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown --to-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_stacking_shares_ligos_width_initialisation():
    small = small_model()
    large = config(num_hidden_layers=4, **GQA_DOUBLE)
    ligo, stack = LiGOOperator(small, large), LiGOOperator(small, large, LiGOConfig(depth_init="stack"))
    for name, expansion in ligo.expansions().items():
        assert torch.equal(expansion, stack.expansions()[name]), name
    assert not torch.equal(ligo.depth["q_weight"], stack.depth["q_weight"])
    assert torch.equal(ligo.depth["q_weight"].argmax(1), stack.depth["q_weight"].argmax(1))
