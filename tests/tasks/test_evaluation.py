"""Each metric on known inputs; the batched scorers against a plain full-logits computation."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_model_dir, write_task
from lorite.data.blocks import pack_blocks
from lorite.models import load_causal_lm
from lorite.tasks.bigbench import load_task_file
from lorite.tasks.encoding import collate, encode_examples, format_prompt, lm_loss
from lorite.tasks.evaluation import (
    accuracy_from_scores,
    answer_perplexity,
    answer_shares,
    choice_log_likelihoods,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    generate_answers,
    length_normalized,
    normalize_answer,
    perplexity,
    rouge_l,
)
from lorite.tasks.rows import rows_to_task
from lorite.tasks.task import Example


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
    assert set(mc) == {"accuracy", "acc_norm", "score", "n", "answer_shares"}
    assert (
        0 <= mc["accuracy"] <= 1
        and mc["score"] == mc["accuracy"]
        and 0 <= mc["acc_norm"] <= 1
        and mc["n"] == 8
    )
    choice_texts = {normalize_answer(c) for ex in task.examples[:8] for c in ex.choices}
    assert set(mc["answer_shares"]) <= choice_texts and sum(mc["answer_shares"].values()) <= 1 + 1e-9
    assert all(share * 8 == round(share * 8) for share in mc["answer_shares"].values()), "counts of 8"
    gen_task = load_task_file(write_task(tmp_path / "g.json", "generation"))
    gen = evaluate_task(model, tokenizer, gen_task, list(gen_task.examples[:4]))
    assert {"exact_match", "rouge_l", "perplexity", "score"} <= set(gen) and gen["score"] == gen["rouge_l"]
    assert gen["perplexity"] == pytest.approx(
        answer_perplexity(model, tokenizer, gen_task, list(gen_task.examples[:4]))
    )


def test_tasks_evaluated_together_score_as_each_alone(tiny, task):
    """A mixture's members share generation batches (budgets of 8 and 35 tokens in one call, then cut per
    answer) and answer-perplexity batches; every member's metrics are those of evaluating it alone."""
    model, tokenizer = tiny
    short = rows(*({"prompt": f"Q{i}:", "completion": " yes" if i % 2 else " no"} for i in range(5)))
    long = rows(
        *({"prompt": f"Say {i}:", "completion": " one two three four five six seven " * 4} for i in range(3))
    )
    members = {"short": (short, list(short.examples)), "long": (long, list(long.examples)),
               "choice": (task, list(task.examples[:4])), "empty": (short, [])}  # fmt: skip
    together = evaluate_tasks(model, tokenizer, members, batch_size=16, share_batches=True)
    assert together["empty"] == {}
    for name in ("short", "long", "choice"):
        alone = evaluate_task(model, tokenizer, *members[name], batch_size=16)
        assert together[name].keys() == alone.keys()
        for key, value in alone.items():
            assert together[name][key] == (
                pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            )
    assert together["short"]["samples"] != together["long"]["samples"]
    apart = evaluate_tasks(model, tokenizer, members, batch_size=16, share_batches=False)  # CPU's default
    assert {name: m.get("samples") for name, m in apart.items()} == {
        n: m.get("samples") for n, m in together.items()
    }
    assert apart["long"]["perplexity"] == pytest.approx(together["long"]["perplexity"], rel=1e-5)
    with pytest.raises(ValueError, match="classification_score"):
        evaluate_tasks(model, tokenizer, members, classification_score="f1")


def test_pack_blocks_drops_the_tail_and_separates_documents():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], block_length=3, separator=0)
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 9]]
    with pytest.raises(ValueError, match="block_length"):
        pack_blocks([[1]], block_length=1, separator=None)


# ------------------------------------------------------------------------- rows: acc_norm, chat, perplexity
def rows(*items):
    return rows_to_task(((f"line {i + 1}", r) for i, r in enumerate(items)), "rows", "rows.jsonl")


def test_length_normalized_divides_by_the_characters_of_each_choice():
    examples = [Example("q", choices=("ab", "abcdef"), correct=(1,))]
    assert length_normalized([[-2.0, -3.0]], examples) == [[-1.0, -0.5]]
    assert accuracy_from_scores([[-2.0, -3.0]], [(1,)]) == 0.0
    assert accuracy_from_scores(length_normalized([[-2.0, -3.0]], examples), [(1,)]) == 1.0


def test_acc_norm_flips_the_choice_where_length_normalisation_does(tiny):
    """A short choice wins on Σ log p, a long one on Σ log p per character: accuracy 0, acc_norm 1."""
    model, tokenizer = tiny
    shorts = list("abcdefghij")
    longs = ["abcdefghijkl", "zyxwvutsrqpo", "hello world!", "mnopqrstuvwx"]
    probe = rows({"prompt": "Q:", "choices": shorts + longs, "answer": 0})
    (scores,) = choice_log_likelihoods(model, tokenizer, probe, list(probe.examples))
    per_char = [s / len(c) for s, c in zip(scores, shorts + longs)]
    long_index = max(range(len(shorts), len(per_char)), key=per_char.__getitem__)
    short_index = min(range(len(shorts)), key=per_char.__getitem__)
    short, long = shorts[short_index], longs[long_index - len(shorts)]
    assert scores[short_index] > scores[long_index] and per_char[long_index] > per_char[short_index]
    task = rows({"prompt": "Q:", "choices": [short, long], "answer": long})
    metrics = evaluate_task(model, tokenizer, task, list(task.examples))
    assert (metrics["accuracy"], metrics["acc_norm"], metrics["score"]) == (0.0, 1.0, 0.0)


def test_answer_perplexity_is_the_exponential_of_the_loss_on_the_answer_tokens(tiny):
    model, tokenizer = tiny
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for task in (
        rows({"prompt": "Q: hi\nA:", "completion": " yo"}, {"prompt": "Q: hey\nA:", "completion": " hello"}),
        rows({"messages": chat}, {"messages": [*chat, {"role": "user", "content": "ok"}, chat[1]]}),
    ):
        encoded = encode_examples(task, list(task.examples), tokenizer, 512)
        with torch.no_grad():
            nll = [float(lm_loss(model, collate([e], tokenizer.pad_token_id))) for e in encoded]
        counts = [sum(label != -100 for label in e.labels[1:]) for e in encoded]
        expected = math.exp(sum(n * c for n, c in zip(nll, counts)) / sum(counts))
        assert answer_perplexity(model, tokenizer, task, list(task.examples), batch_size=2) == pytest.approx(
            expected
        )


def test_chat_answers_are_generated_from_the_turns_before_the_last_assistant_turn(tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]  # fmt: skip
    task = rows({"messages": messages})
    (answer,) = generate_answers(model, tokenizer, task, list(task.examples), max_new_tokens=5)
    prompt = tokenizer("<user>hi<eos><assistant>yo<eos><user>ok<eos><assistant>", add_special_tokens=False)
    ids = torch.tensor([prompt["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_exact_match_and_rouge_l_of_a_model_that_learned_one_answer(tmp_path):
    """Trained until it answers "hi" with "yo": exact match 1/2 and ROUGE-L (1 + 2/3)/2 against the
    references "yo" and "yo there"; the learned answer's perplexity is near 1."""
    model, tokenizer = load_causal_lm(tiny_model_dir(tmp_path / "model", seed=1))
    hi = {"role": "user", "content": "hi"}
    train = rows({"messages": [hi, {"role": "assistant", "content": "yo"}]})
    batch = collate(encode_examples(train, list(train.examples), tokenizer, 64), tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    task = rows({"messages": [hi, {"role": "assistant", "content": "yo"}]},
                {"messages": [hi, {"role": "assistant", "content": "yo there"}]})  # fmt: skip
    metrics = evaluate_task(model, tokenizer, task, list(task.examples))
    assert metrics["samples"] == ["yo", "yo"]
    assert metrics["exact_match"] == 0.5 and metrics["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["score"] == metrics["rouge_l"] and metrics["answer_shares"] == {"yo": 1.0}
    assert answer_perplexity(model, tokenizer, task, list(task.examples[:1])) < 1.1 < metrics["perplexity"]
