"""Each metric on known inputs; the batched scorers against a plain full-logits computation."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite.data.blocks import pack_blocks
from lorite.models import load_causal_lm
from lorite.tasks.bigbench import load_task_file
from lorite.tasks.encoding import format_prompt
from lorite.tasks.evaluation import (
    accuracy_from_scores,
    answer_shares,
    choice_log_likelihoods,
    evaluate_task,
    exact_match,
    generate_answers,
    normalize_answer,
    perplexity,
    rouge_l,
)


def test_normalisation_and_exact_match():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("An apple.", ["pear", "apple"]) == 1.0
    assert exact_match("pear tree", ["pear"]) == 0.0


def test_rouge_l_known_values():
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l("dog", ["cat"]) == 0.0
    assert rouge_l("a b c", ["x", "a b c"]) == pytest.approx(1.0)  # best reference


def test_answer_shares_count_normalised_answers_most_common_first():
    shares = answer_shares(["No.", "no", "Yes.", "No", "maybe", "a", "b", "c"], top=3)
    assert list(shares) == ["no", "yes", "maybe"] and shares["no"] == 3 / 8 and shares["yes"] == 1 / 8


def test_accuracy_from_scores_ties_go_to_the_first_choice():
    assert accuracy_from_scores([[1.0, 2.0, 0.0], [5.0, 1.0, 1.0]], [(1,), (1, 2)]) == 0.5
    assert accuracy_from_scores([[3.0, 3.0]], [(0,)]) == 1.0
    assert accuracy_from_scores([[3.0, 3.0]], [(1,)]) == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_dir(tmp_path_factory.mktemp("model"))
    model, tokenizer = load_causal_lm(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return load_task_file(write_task(tmp_path_factory.mktemp("task") / "task.json"))


def test_choice_log_likelihoods_match_full_logits(tiny, task):
    model, tokenizer = tiny
    examples = list(task.examples[:5])
    batched = choice_log_likelihoods(model, tokenizer, task, examples, batch_size=3)
    for ex, scores in zip(examples, batched):
        prompt = tokenizer(format_prompt(task, ex, tokenizer), add_special_tokens=False)["input_ids"]
        for choice, score in zip(ex.choices, scores):
            answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                log_probs = model(input_ids=ids).logits.log_softmax(-1)[0]
            expected = sum(float(log_probs[len(prompt) + i - 1, t]) for i, t in enumerate(answer))
            assert score == pytest.approx(expected, abs=1e-4)


def test_batched_greedy_generation_equals_one_at_a_time(tiny, task):
    model, tokenizer = tiny
    examples = list(task.examples[:4])
    together = generate_answers(model, tokenizer, task, examples, batch_size=4, max_new_tokens=6)
    alone = [
        generate_answers(model, tokenizer, task, [ex], batch_size=1, max_new_tokens=6)[0] for ex in examples
    ]
    assert together == alone
    assert together == generate_answers(model, tokenizer, task, examples, batch_size=4, max_new_tokens=6)


def test_perplexity_matches_the_models_own_loss(tiny):
    model, _ = tiny
    blocks = pack_blocks([list(range(3, 40)), list(range(50, 90))], block_length=16, separator=1)
    assert blocks.shape == (4, 16)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert perplexity(model, blocks, batch_size=3) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_evaluate_task_reports_the_right_metrics(tiny, task, tmp_path):
    model, tokenizer = tiny
    mc = evaluate_task(model, tokenizer, task, list(task.examples[:8]))
    assert (
        set(mc) == {"accuracy", "score", "n", "answer_shares"} and 0 <= mc["accuracy"] <= 1 and mc["n"] == 8
    )
    choice_texts = {normalize_answer(c) for ex in task.examples[:8] for c in ex.choices}
    assert set(mc["answer_shares"]) <= choice_texts and sum(mc["answer_shares"].values()) <= 1 + 1e-9
    assert all(share * 8 == round(share * 8) for share in mc["answer_shares"].values()), "counts of 8"
    gen_task = load_task_file(write_task(tmp_path / "g.json", "generation"))
    gen = evaluate_task(model, tokenizer, gen_task, list(gen_task.examples[:4]))
    assert {"exact_match", "rouge_l", "score"} <= set(gen) and gen["score"] == gen["rouge_l"]


def test_pack_blocks_drops_the_tail_and_separates_documents():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], block_length=3, separator=0)
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 9]]
    with pytest.raises(ValueError, match="block_length"):
        pack_blocks([[1]], block_length=1, separator=None)
