"""BIG-bench task loading on fixture files the tests write, and on the real sdist (through the cache)."""

from __future__ import annotations

import json

import pytest

from helpers import write_task
from lorite.errors import LoriteError
from lorite.tasks import bigbench
from lorite.tasks.bigbench import load_task, load_task_file, load_tasks, parse_task
from lorite.tasks.encoding import format_prompt, user_text
from lorite.tasks.splits import split_examples
from lorite.tasks.task import Example


def test_parse_multiple_choice_and_generation(tmp_path):
    mc = load_task_file(write_task(tmp_path / "mc" / "task.json", "multiple_choice"))
    assert mc.kind == "multiple_choice" and mc.name == "mc" and len(mc.examples) == 120
    ex = mc.examples[0]
    assert ex.choices == ("red", "blue", "green", "gold")
    assert ex.answer == ex.input.split()[0] and len(ex.correct) == 1
    gen = load_task_file(write_task(tmp_path / "gen.json", "generation"))
    assert gen.kind == "generation" and gen.examples[0].targets == (gen.examples[0].input.split()[0],)


def test_ties_in_target_scores_mark_every_best_choice_correct():
    task = parse_task({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1, "c": 0}}]}, "t")
    assert task.examples[0].correct == (0, 1)


def test_missing_targets_and_empty_tasks_raise():
    with pytest.raises(LoriteError, match="no examples"):
        parse_task({"examples": []}, "empty")
    with pytest.raises(LoriteError, match="neither target_scores nor target"):
        parse_task({"examples": [{"input": "q"}]}, "broken")
    with pytest.raises(LoriteError, match="does not exist"):
        load_task_file("/nonexistent/task.json")


def test_split_is_deterministic_disjoint_and_sized(tmp_path):
    task = load_task_file(write_task(tmp_path / "task.json", n=300))
    a, b = (
        split_examples(task, seed=3, n_validation=40, n_test=50),
        split_examples(task, seed=3, n_validation=40, n_test=50),
    )
    assert a == b
    assert (len(a.train), len(a.validation), len(a.test)) == (210, 40, 50)
    ids = [id(x) for part in (a.train, a.validation, a.test) for x in part]
    assert len(set(ids)) == 300
    other = split_examples(task, seed=4, n_validation=40, n_test=50)
    assert other.test != a.test
    small = split_examples(task, seed=0, n_validation=500, n_test=500)  # capped at 20% each
    assert (len(small.validation), len(small.test)) == (60, 60)


class ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_prompts_with_and_without_chat_template():
    task = parse_task(
        {"task_prefix": "Pick one.", "examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]},
        "math",
    )
    ex = task.examples[0]
    assert user_text(task, ex) == "Pick one.\n\n2+2?\n  choice: 4\n  choice: 5"
    assert (
        format_prompt(task, ex, ChatTokenizer())
        == "<user>Pick one.\n\n2+2?\n  choice: 4\n  choice: 5</user><assistant>"
    )
    assert format_prompt(task, ex, None) == "Pick one.\nQ: 2+2?\n  choice: 4\n  choice: 5\nA: "
    plain = parse_task(
        {"append_choices_to_input": False, "example_input_prefix": "", "example_output_prefix": " =",
         "examples": [{"input": "2+2", "target_scores": {"4": 1, "5": 0}}]}, "p"
    )  # fmt: skip
    assert format_prompt(plain, plain.examples[0], None) == "2+2 ="
    assert Example("q", targets=("a",)).answer == "a"


@pytest.mark.real_data
def test_real_dev_tasks_load_from_the_sdist(real_data):
    tasks = load_tasks(
        [
            "social_iqa",
            "elementary_math_qa/question_only",
            "natural_instructions/subtask050_multirc_answerability",
        ]
    )
    social = tasks["social_iqa"]
    assert social.kind == "multiple_choice" and len(social.examples) == 1954
    assert all(len(ex.choices) == 3 for ex in social.examples[:50])
    multirc = tasks["natural_instructions/subtask050_multirc_answerability"]
    assert multirc.kind == "generation" and multirc.task_prefix.startswith("Definition:")
    assert tasks["elementary_math_qa/question_only"].examples[0].choices  # multiple choice


@pytest.mark.real_data
def test_unknown_and_group_tasks_give_clear_errors(real_data):
    with pytest.raises(LoriteError, match=r"unknown BIG-bench task 'social_iq'.*social_iqa"):
        load_task("social_iq")
    with pytest.raises(LoriteError, match=r"group of subtasks.*elementary_math_qa/question_only"):
        load_task("elementary_math_qa")


def test_cached_task_files_are_plain_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LORITE_CACHE", str(tmp_path))
    path = bigbench._task_file("a/b")
    assert path.parent == tmp_path / "bigbench" / "tasks" and path.name == "a__b.json"
    path.write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    assert bigbench.load_tasks(["a/b"])["a/b"].examples[0].targets == ("y",)


def _cached_sdist():
    from lorite.cache import cache_dir

    name, version = bigbench.SDIST
    found = sorted((cache_dir() / "downloads").glob(f"{name}-{version}.tar.gz"))
    return found[0] if found else None


def test_the_shipped_index_is_the_sdists_task_list():
    sdist = _cached_sdist()
    if sdist is None:
        pytest.skip("the BIG-bench sdist is not in lorite's cache: nothing to compare the index with")
    names = bigbench.sdist_task_names(sdist)
    assert bigbench.task_names() == names
    assert len(names) == 1041 and "social_iqa" in names and "elementary_math_qa/question_only" in names


def test_an_unknown_name_is_refused_before_any_download(tmp_path, monkeypatch):
    from lorite.tasks import check_task_specs

    def no_download(*args):
        raise AssertionError("the sdist must not be fetched for a misspelt task name")

    monkeypatch.setenv("LORITE_CACHE", str(tmp_path))  # an empty cache: nothing is known from it
    monkeypatch.setattr(bigbench, "fetch_distribution", no_download)
    with pytest.raises(LoriteError, match=r"unknown BIG-bench task 'social_iqaa'; did you mean 'social_iqa'"):
        check_task_specs(["social_iqaa"])
    with pytest.raises(LoriteError, match=r"unknown BIG-bench task 'no_such_task_zz'$"):
        load_tasks(["no_such_task_zz"])
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())
