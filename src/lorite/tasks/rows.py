"""Tasks of your own data, in TRL's dataset formats: a JSON Lines file (``jsonl:PATH``) or a Hugging Face
``datasets`` dataset (``hf:PATH``), one row per example.

=================================================================  ======================================
row (the field names of TRL's SFT formats)                         the task
=================================================================  ======================================
``{"prompt": "…", "completion": "…"}``                             generation, ``plain`` prompts: the text
                                                                   is ``prompt + completion`` exactly as
                                                                   given (+ the end token); loss on the
                                                                   completion
``{"messages": [{"role": "user", "content": "…"}, …]}``            generation, ``chat``: the model's chat
                                                                   template; loss on every assistant turn;
                                                                   evaluated on the last assistant turn,
                                                                   generated from the turns before it
``{"prompt": [messages], "completion": [messages]}``               generation, ``chat`` (TRL's
                                                                   conversational prompt/completion); loss
                                                                   on the completion's assistant turns
``{"prompt": "…" or [messages], "choices": ["…", …],               multiple choice (``plain`` or ``chat``
"answer": 0 or "…"}``                                              prompts); ``answer`` is the index of
                                                                   the correct choice or its text
=================================================================  ======================================

Roles are ``system``, ``user``, ``assistant`` and ``tool``; contents are strings; other fields of a row
are ignored. One file holds one kind of row. A bad row is a :class:`LoriteError` naming the file, the row
(``line N`` of a JSON Lines file, counted from 1; ``dataset[N]`` of a dataset) and the field.

``hf:PATH`` reads, through ``datasets`` (``pip install datasets``, part of ``lorite[all]``): a folder
written by ``save_to_disk`` (``load_from_disk``), another folder of data files (``load_dataset(PATH)``,
e.g. a downloaded dataset repository) or one ``.parquet``, ``.json``, ``.jsonl`` or ``.csv`` file. Of a
dataset with several splits it takes ``train``; ``hf:PATH#SPLIT`` names another. Whatever the source, the
examples are split by the one rule of :mod:`lorite.tasks.splits`: the dataset's own splits are not used
as validation or test.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LoriteError
from .task import ROLES, Example, Task

DATA_FILES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}  # hf: file → builder
HF_SPLIT = "#"  # hf:PATH#SPLIT
SCHEMAS = "{prompt, completion}, {messages} or {prompt, choices, answer}"

Messages = tuple[tuple[str, str], ...]


# ------------------------------------------------------------------------------------------------ rows
def _type(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number")):
        if isinstance(value, kind):
            return name
    return "list" if isinstance(value, list | tuple) else "object" if isinstance(value, dict) else "value"


class _Row:
    """One row being read: its fields, and errors that name where it is."""

    def __init__(self, row: Any, where: str):
        self.where = where
        if not isinstance(row, dict):
            raise self.error(f"a row is a JSON object ({SCHEMAS}), got a {_type(row)}")
        self.row = row

    def error(self, message: str) -> LoriteError:
        return LoriteError(f"{self.where}: {message}")

    def has(self, name: str) -> bool:
        """Whether the row sets ``name`` (a dataset's rows hold every column: a null is no value)."""
        return self.row.get(name) is not None

    def field(self, name: str) -> Any:
        """The value of ``name``; a missing field is an error."""
        if not self.has(name):
            raise self.error(f"missing field {name!r}")
        return self.row[name]

    def string(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got a {_type(value)}")
        return value

    def messages(self, name: str, value: Any) -> Messages:
        if not isinstance(value, list | tuple) or not value:
            got = "an empty list" if isinstance(value, list | tuple) else f"a {_type(value)}"
            raise self.error(f"field {name!r} must be a non-empty list of messages, got {got}")
        messages = []
        for index, message in enumerate(value):
            at = f"{name}[{index}]"
            if not isinstance(message, dict):
                raise self.error(
                    f"field {at!r} must be an object with 'role' and 'content', got a {_type(message)}"
                )
            for key in ("role", "content"):
                if message.get(key) is None:
                    raise self.error(f"missing field '{at}.{key}'")
            role = self.string(f"{at}.role", message["role"])
            if role not in ROLES:
                raise self.error(f"unknown role {role!r} in {at!r} (roles: {', '.join(ROLES)})")
            messages.append((role, self.string(f"{at}.content", message["content"])))
        return tuple(messages)

    def conversation(self, name: str, value: Any) -> Messages:
        """Messages with at least one assistant turn."""
        messages = self.messages(name, value)
        if not any(role == "assistant" for role, _ in messages):
            raise self.error(f"no assistant turn in {name!r} (nothing to train on)")
        return messages


def _last_content(messages: Messages) -> str:
    return messages[-1][1] if messages else ""


def _chat_generation(messages: Messages, loss_from: int) -> Example:
    """A chat generation example: its answer is the last assistant turn, its input the message before."""
    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    return Example(
        _last_content(messages[:last]), targets=(messages[last][1],), messages=messages, loss_from=loss_from
    )


def parse_row(row: Any, where: str) -> tuple[str, Example]:
    """The kind of ``row`` (``"prompt/completion"``, ``"conversational prompt/completion"``,
    ``"messages"``, ``"multiple choice"``, ``"conversational multiple choice"``) and its
    :class:`Example`; ``where`` names the row in errors."""
    r = _Row(row, where)
    if r.has("messages"):
        return "messages", _chat_generation(r.conversation("messages", r.field("messages")), 0)
    if r.has("choices"):
        prompt = r.field("prompt")
        choices = r.field("choices")
        if not isinstance(choices, list | tuple):
            raise r.error(f"field 'choices' must be a list of strings, got a {_type(choices)}")
        if not choices:
            raise r.error("field 'choices' is empty")
        choices = tuple(r.string(f"choices[{i}]", c) for i, c in enumerate(choices))
        for i, choice in enumerate(choices):
            if not choice:
                raise r.error(f"field 'choices[{i}]' is an empty string")
        answer = r.field("answer")
        if isinstance(answer, bool) or not isinstance(answer, int | str):
            raise r.error(f"field 'answer' must be a choice's index or its text, got a {_type(answer)}")
        if isinstance(answer, int) and not 0 <= answer < len(choices):
            raise r.error(
                f"answer {answer} is out of range for {len(choices)} choices (0 to {len(choices) - 1})"
            )
        if isinstance(answer, str) and answer not in choices:
            raise r.error(f"answer {answer!r} is not one of the choices")
        correct = (answer if isinstance(answer, int) else choices.index(answer),)
        if isinstance(prompt, str):
            return "multiple choice", Example(prompt, choices=choices, correct=correct)
        if isinstance(prompt, list | tuple):
            messages = r.messages("prompt", prompt)
            example = Example(_last_content(messages), choices=choices, correct=correct, messages=messages)
            return "conversational multiple choice", example
        raise r.error(f"field 'prompt' must be a string or a list of messages, got a {_type(prompt)}")
    if not r.has("prompt"):
        raise r.error(f"missing field 'prompt' or 'messages' (a row is {SCHEMAS})")
    prompt, completion = r.field("prompt"), r.field("completion")
    if isinstance(prompt, str):
        return "prompt/completion", Example(prompt, targets=(r.string("completion", completion),))
    if isinstance(prompt, list | tuple):
        if not isinstance(completion, list | tuple):
            raise r.error(
                f"field 'completion' must be a list of messages like 'prompt', got a {_type(completion)}"
            )
        messages = r.messages("prompt", prompt)
        completion = r.conversation("completion", completion)
        return "conversational prompt/completion", _chat_generation(messages + completion, len(messages))
    raise r.error(f"field 'prompt' must be a string or a list of messages, got a {_type(prompt)}")


def rows_to_task(rows: Iterable[tuple[str, Any]], name: str, source: str, empty: str = "empty file") -> Task:
    """The :class:`Task` of ``rows`` (``(position, row)`` pairs, the position as ``line 3`` or ``dataset[2]``)
    from ``source`` (``empty`` says what it is when there are no rows); all rows must be of one kind."""
    first: tuple[str, str] | None = None  # (kind, position)
    examples = []
    for position, row in rows:
        kind, example = parse_row(row, f"{source}: {position}")
        if first is None:
            first = (kind, position)
        elif kind != first[0]:
            raise LoriteError(
                f"{source}: {position}: a {kind} row, but {first[1]} is a {first[0]} row: one file holds one "
                "kind of row"
            )
        examples.append(example)
    if first is None:
        raise LoriteError(f"{source}: {empty} (no rows)")
    kind = first[0]
    return Task(
        name=name,
        kind="multiple_choice" if kind.endswith("multiple choice") else "generation",
        examples=tuple(examples),
        description=f"{kind} rows of {source}",
        input_prefix="",
        output_prefix="",
        append_choices=False,
        prompt_format="chat" if kind.startswith("conversational") or kind == "messages" else "plain",
    )


# ------------------------------------------------------------------------------------------- JSON Lines
def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(position, row)`` of every non-blank line of a JSON Lines file."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise LoriteError(f"{path}: cannot be read ({error.strerror})") from error
    with handle:
        for number, raw in enumerate(handle, start=1):
            position = f"line {number}"
            where = f"{path}: {position}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise LoriteError(f"{where}: not UTF-8 text") from error
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise LoriteError(f"{where}: not JSON ({error.msg} at column {error.colno})") from error
            yield position, row


def _jsonl_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LoriteError(f"jsonl file {str(path)!r} does not exist")
    if not path.is_file():
        raise LoriteError(f"jsonl file {str(path)!r} is not a file")
    return path


def load_jsonl(path: str | Path) -> Task:
    """The task of a JSON Lines file of rows (see the module docstring); blank lines are skipped."""
    path = _jsonl_path(path)
    return rows_to_task(_jsonl_rows(path), path.stem, str(path))


def check_jsonl(path: str | Path) -> None:
    """Cheap checks of ``jsonl:PATH``: the file exists and can be read, and its first row is a good row."""
    path = _jsonl_path(path)
    for position, row in _jsonl_rows(path):
        parse_row(row, f"{path}: {position}")
        return
    raise LoriteError(f"{path}: empty file (no rows)")


# ----------------------------------------------------------------------------------- Hugging Face datasets
def hf_location(name: str) -> tuple[Path, str | None]:
    """The path and the split (``None``: the default) of ``hf:PATH[#SPLIT]``; a path that exists with its
    ``#`` is taken whole."""
    if HF_SPLIT in name and not Path(name).exists():
        path, split = name.rsplit(HF_SPLIT, 1)
        if not split:
            raise LoriteError(f"hf:{name}: nothing after {HF_SPLIT!r} (give hf:PATH#SPLIT)")
        return Path(path), split
    return Path(name), None


def _is_saved(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def check_hf(name: str) -> None:
    """Cheap checks of ``hf:PATH[#SPLIT]``: ``datasets`` is installed, the path exists and is a folder or
    a data file ``datasets`` reads."""
    path, split = hf_location(name)
    if not path.exists():
        raise LoriteError(f"dataset {str(path)!r} (hf:) does not exist")
    if path.is_file() and path.suffix.lower() not in DATA_FILES:
        raise LoriteError(
            f"dataset file {str(path)!r} (hf:): give a save_to_disk folder or a {', '.join(DATA_FILES)} file"
        )
    if path.is_file() and split not in (None, "train"):
        raise LoriteError(f"hf:{name}: a data file is one split; drop {HF_SPLIT}{split}")
    if importlib.util.find_spec("datasets") is None:
        raise LoriteError(_NO_DATASETS)


_NO_DATASETS = "hf:PATH needs the Hugging Face datasets library: pip install datasets (or 'lorite[all]')"


def _datasets():
    try:
        import datasets  # optional dependency (lorite[all]), slow to import
    except ImportError as error:
        raise LoriteError(_NO_DATASETS) from error
    return datasets


def _pick_split(datasets, dataset, path: Path, split: str | None):
    """One split of a DatasetDict (``train`` unless named), or the Dataset itself."""
    if not isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split is not None:
            raise LoriteError(f"dataset {str(path)!r} has no splits (one Dataset): drop {HF_SPLIT}{split}")
        return dataset
    splits = list(dataset)
    wanted = split or "train"
    if wanted not in splits:
        named = f"no split {wanted!r}" if split else "no 'train' split"
        raise LoriteError(
            f"dataset {str(path)!r} has {named}; its splits: {', '.join(splits)} (give hf:PATH{HF_SPLIT}SPLIT)"
        )
    return dataset[wanted]


def load_hf(name: str) -> Task:
    """The task of ``hf:PATH[#SPLIT]`` (see the module docstring)."""
    check_hf(name)
    path, split = hf_location(name)
    datasets = _datasets()
    try:
        if path.is_file():
            dataset = datasets.load_dataset(
                DATA_FILES[path.suffix.lower()], data_files=str(path), split="train"
            )
        elif _is_saved(path):
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(str(path))
    except Exception as error:  # a file datasets cannot read: whatever it raises, one line naming the path
        detail = str(error).strip().splitlines()
        raise LoriteError(
            f"dataset {str(path)!r} (hf:): datasets cannot read it "
            f"({type(error).__name__}{': ' + detail[0] if detail else ''})"
        ) from error
    if not path.is_file():
        dataset = _pick_split(datasets, dataset, path, split)
    source = str(path) + (f"{HF_SPLIT}{split}" if split else "")
    rows = ((f"dataset[{i}]", row) for i, row in enumerate(dataset))
    return rows_to_task(rows, path.stem if path.is_file() else path.name, source, "empty dataset")
