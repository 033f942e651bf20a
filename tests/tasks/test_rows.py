"""Tasks of your own rows (``jsonl:PATH``, ``hf:PATH``): every row kind, one error line per bad file, the
specs, the cheap checks and the one split."""

from __future__ import annotations

import json

import pytest

from lorite.errors import LoriteError
from lorite.tasks import TaskSpec, check_task_specs, load_task, parse_task_spec, split_examples
from lorite.tasks.rows import load_jsonl, parse_row

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "so"},
]


def write_jsonl(path, rows, raw_lines=()):
    """``rows`` as JSON Lines (then ``raw_lines`` verbatim)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw_lines))
    return path


def test_prompt_completion_rows_are_a_plain_generation_task(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" a{i}", "id": i} for i in range(3)]
    task = load_jsonl(write_jsonl(tmp_path / "qa.jsonl", rows, raw_lines=["", "   "]))
    assert (task.name, task.kind, task.prompt_format, task.chat) == ("qa", "generation", "plain", False)
    assert [(ex.input, ex.targets) for ex in task.examples] == [
        ("Q0:", (" a0",)),
        ("Q1:", (" a1",)),
        ("Q2:", (" a2",)),
    ]


def test_messages_rows_are_a_chat_task_answered_by_the_last_assistant_turn(tmp_path):
    task = load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    (ex,) = task.examples
    assert (task.kind, task.prompt_format, task.chat) == ("generation", "chat", True)
    assert ex.messages == tuple((m["role"], m["content"]) for m in CHAT) and ex.loss_from == 0
    assert ex.targets == ("so",) and ex.input == "and?" and ex.context == ex.messages[:4]


def test_conversational_prompt_completion_trains_on_the_completion_only():
    row = {"prompt": CHAT[:3] + CHAT[3:4], "completion": [CHAT[4]]}
    kind, ex = parse_row(row, "x: line 1")
    assert kind == "conversational prompt/completion"
    assert ex.loss_from == 4 and ex.targets == ("so",) and len(ex.messages) == 5


def test_multiple_choice_rows_answer_by_index_or_text(tmp_path):
    rows = [
        {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"prompt": "1+1=", "choices": ["2", "3"], "answer": "2"},
    ]
    task = load_jsonl(write_jsonl(tmp_path / "mc.jsonl", rows))
    assert (task.kind, task.prompt_format, task.append_choices) == ("multiple_choice", "plain", False)
    assert [(ex.choices, ex.correct, ex.answer) for ex in task.examples] == [
        (("3", "4"), (1,), "4"),
        (("2", "3"), (0,), "2"),
    ]
    kind, ex = parse_row({"prompt": CHAT[:2], "choices": ["a", "b"], "answer": "b"}, "w")
    assert kind == "conversational multiple choice" and ex.context == ex.messages == (
        ("system", "be brief"),
        ("user", "hi"),
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty file (no rows)"),
        (["", "  "], "empty file (no rows)"),
        (['{"prompt": "a", "completion": "b"}', "{not json"], "line 2: not JSON (Expecting property name"),
        (['{"prompt": "a"}'], "line 1: missing field 'completion'"),
        (['{"completion": "b"}'], "line 1: missing field 'prompt' or 'messages'"),
        (['{"prompt": 3, "completion": "b"}'], "line 1: field 'prompt' must be a string or a list of messages, got a number"),
        (['{"prompt": "a", "completion": ["b"]}'], "line 1: field 'completion' must be a string, got a list"),
        (['{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}'], "line 1: field 'completion' must be a list of messages like 'prompt', got a string"),
        (["[1, 2]"], "line 1: a row is a JSON object"),
        (['{"prompt": "a", "choices": [], "answer": 0}'], "line 1: field 'choices' is empty"),
        (['{"prompt": "a", "choices": "ab", "answer": 0}'], "line 1: field 'choices' must be a list of strings, got a string"),
        (['{"prompt": "a", "choices": ["x", 2], "answer": 0}'], "line 1: field 'choices[1]' must be a string, got a number"),
        (['{"prompt": "a", "choices": ["x", ""], "answer": 0}'], "line 1: field 'choices[1]' is an empty string"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'], "line 1: answer 2 is out of range for 2 choices (0 to 1)"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": -1}'], "line 1: answer -1 is out of range for 2 choices"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": "z"}'], "line 1: answer 'z' is not one of the choices"),
        (['{"prompt": "a", "choices": ["x", "y"], "answer": true}'], "line 1: field 'answer' must be a choice's index or its text, got a boolean"),
        (['{"prompt": "a", "choices": ["x", "y"]}'], "line 1: missing field 'answer'"),
        (['{"messages": [{"role": "bot", "content": "a"}]}'], "line 1: unknown role 'bot' in 'messages[0]' (roles: system, user, assistant, tool)"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1: no assistant turn in 'messages'"),
        (['{"messages": [{"role": "user"}]}'], "line 1: missing field 'messages[0].content'"),
        (['{"messages": [{"role": "user", "content": ["a"]}]}'], "line 1: field 'messages[0].content' must be a string, got a list"),
        (['{"messages": []}'], "line 1: field 'messages' must be a non-empty list of messages, got an empty list"),
        (['{"messages": ["hi"]}'], "line 1: field 'messages[0]' must be an object with 'role' and 'content', got a string"),
        (['{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}'], "line 1: no assistant turn in 'completion'"),
        (
            ['{"prompt": "a", "completion": "b"}', "", '{"messages": [{"role": "assistant", "content": "b"}]}'],
            "line 3: a messages row, but line 1 is a prompt/completion row: one file holds one kind of row",
        ),
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}'],
            "line 2: a conversational prompt/completion row, but line 1 is a prompt/completion row",
        ),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_error_naming_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(LoriteError) as error:
        load_task(f"jsonl:{path}")
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(LoriteError, match=r"latin\.jsonl: line 2: not UTF-8 text$"):
        load_jsonl(path)


def test_specs_parse_and_check_cheaply(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}], raw_lines=["{broken"])
    assert (
        parse_task_spec(f"jsonl:{good}") == TaskSpec("jsonl", str(good))
        and str(TaskSpec("jsonl", "x")) == "jsonl:x"
    )
    assert parse_task_spec("hf: /data/ds#test") == TaskSpec("hf", "/data/ds#test")
    assert check_task_specs([f"jsonl:{good}"]) == [TaskSpec("jsonl", str(good))], "only the first row is read"
    with pytest.raises(LoriteError, match=r"jsonl file '/nope\.jsonl' does not exist"):
        check_task_specs(["jsonl:/nope.jsonl"])
    with pytest.raises(LoriteError, match="is not a file"):
        check_task_specs([f"jsonl:{tmp_path}"])
    with pytest.raises(LoriteError, match=r"line 1: missing field 'completion'"):
        check_task_specs([f"jsonl:{write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'a'}])}"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoriteError, match=r"empty\.jsonl: empty file \(no rows\)"):
        check_task_specs([f"jsonl:{tmp_path / 'empty.jsonl'}"])
    with pytest.raises(LoriteError, match=r"dataset '/nope' \(hf:\) does not exist"):
        check_task_specs(["hf:/nope#train"])
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(
        LoriteError, match=r"give a save_to_disk folder or a \.parquet, \.json, \.jsonl, \.csv file"
    ):
        check_task_specs([f"hf:{tmp_path / 'rows.txt'}"])
    with pytest.raises(LoriteError, match="nothing after '#'"):
        check_task_specs([f"hf:{tmp_path}#"])
    with pytest.raises(LoriteError, match="nothing after 'jsonl:'"):
        parse_task_spec("jsonl:")


def test_hf_without_datasets_installed_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    folder = tmp_path / "ds"
    folder.mkdir()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )
    with pytest.raises(LoriteError, match=r"needs the Hugging Face datasets library: pip install datasets"):
        check_task_specs([f"hf:{folder}"])


def test_the_one_split_applies_to_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    task = load_task(f"jsonl:{write_jsonl(tmp_path / 'r.jsonl', rows)}")
    splits = split_examples(task, seed=0, n_validation=3, n_test=4)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (13, 3, 4)
    seen = [ex.input for ex in splits.train + splits.validation + splits.test]
    assert sorted(seen) == sorted(f"p{i}" for i in range(20))
    assert split_examples(task, seed=0, n_validation=3, n_test=4) == splits


# ------------------------------------------------------------------------------- Hugging Face datasets
@pytest.fixture
def datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not the user's cache
    datasets.disable_progress_bars()
    yield datasets
    datasets.enable_progress_bars()


def test_hf_folders_and_files_hold_the_same_rows(tmp_path, datasets):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    one = datasets.Dataset.from_list(rows)
    one.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": one, "test": one.select(range(2))}).save_to_disk(tmp_path / "dict")
    datasets.DatasetDict({"valid": one}).save_to_disk(tmp_path / "no_train")
    one.to_parquet(tmp_path / "rows.parquet")
    one.to_json(tmp_path / "rows.jsonl")
    (tmp_path / "repo").mkdir()
    one.to_parquet(tmp_path / "repo" / "train.parquet")
    expected = tuple((r["prompt"], (r["completion"],)) for r in rows)
    for spec, name, n in [("one", "one", 6), ("dict", "dict", 6), ("dict#test", "dict", 2), ("rows.parquet", "rows", 6),
                          ("rows.jsonl", "rows", 6), ("repo", "repo", 6), ("no_train#valid", "no_train", 6)]:  # fmt: skip
        check_task_specs([f"hf:{tmp_path / spec}"])
        task = load_task(f"hf:{tmp_path / spec}")
        assert (task.name, task.kind, task.prompt_format) == (name, "generation", "plain")
        assert tuple((ex.input, ex.targets) for ex in task.examples) == expected[:n], spec
    with pytest.raises(
        LoriteError, match=r"no_train' has no 'train' split; its splits: valid \(give hf:PATH#SPLIT\)"
    ):
        load_task(f"hf:{tmp_path / 'no_train'}")
    with pytest.raises(LoriteError, match=r"has no split 'dev'; its splits: train, test"):
        load_task(f"hf:{tmp_path / 'dict'}#dev")
    with pytest.raises(LoriteError, match=r"has no splits \(one Dataset\): drop #train"):
        load_task(f"hf:{tmp_path / 'one'}#train")
    with pytest.raises(LoriteError, match=r"a data file is one split; drop #test"):
        check_task_specs([f"hf:{tmp_path / 'rows.parquet'}#test"])


def test_hf_chat_and_multiple_choice_rows_and_their_errors(tmp_path, datasets):
    datasets.Dataset.from_list([{"messages": CHAT}] * 3).save_to_disk(tmp_path / "chat")
    task = load_task(f"hf:{tmp_path / 'chat'}")
    assert task.chat and task.examples[0].targets == ("so",) and len(task.examples[0].messages) == 5
    mc = [
        {"prompt": "q", "choices": ["a", "b"], "answer": 1},
        {"prompt": "r", "choices": ["a", "b"], "answer": 5},
    ]
    datasets.Dataset.from_list(mc).save_to_disk(tmp_path / "mc")
    with pytest.raises(LoriteError, match=r"/mc: dataset\[1\]: answer 5 is out of range for 2 choices"):
        load_task(f"hf:{tmp_path / 'mc'}")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LoriteError) as error:
        load_task(f"hf:{tmp_path / 'broken.parquet'}")
    assert str(error.value).startswith(
        f"dataset '{tmp_path / 'broken.parquet'}' (hf:): datasets cannot read it ("
    )
    assert "\n" not in str(error.value)
