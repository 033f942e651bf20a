"""The layering of docs/architecture.md holds: every module of ``src/lorite`` belongs to a unit of its table,
imports only its own unit and lower layers (imports inside functions included), no imports form a circle,
every lazy import says why, and only the task layer parses task specs."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the lorite module imported, or a third-party top-level name
    line: int
    lazy: bool  # inside a function
    explained: bool  # a comment on its line or just above it


def layer_table() -> dict[str, int]:
    """unit → layer, from the table between the ``layers`` markers of docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    block = text.split("<!-- layers", 1)[1].split("<!-- /layers -->", 1)[0]
    units: dict[str, int] = {}
    for row in block.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for unit in re.findall(r"`([a-z_.]+)`", cells[1]):
                units[unit] = int(cells[0])
    return units


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SOURCE / "lorite").rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def unit_of(module: str, units: dict[str, int]) -> str | None:
    """The longest unit that is ``module`` or a package above it (the root package only as itself)."""
    matches = [u for u in units if module == u or (u != "lorite" and module.startswith(u + "."))]
    return max(matches, key=len) if matches else None


def _explained(lines: list[str], number: int) -> bool:
    """A comment on the import's line, or on a line above it across the imports right before it."""
    if "#" in lines[number - 1]:
        return True
    index = number - 2
    while index >= 0 and lines[index].strip().startswith(("from ", "import ")):
        index -= 1
    return index >= 0 and lines[index].strip().startswith("#")


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.stmt, lazy: bool) -> None:
        found.append(Import(module, target, node.lineno, lazy, _explained(lines, node.lineno)))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(
                        alias.name if alias.name.startswith("lorite") else alias.name.split(".")[0],
                        child,
                        lazy,
                    )
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    origin = ".".join(base + ([child.module] if child.module else []))
                else:
                    origin = child.module or ""
                if origin.startswith("lorite"):
                    for alias in child.names:  # `from . import x`: the submodule x when there is one
                        submodule = f"{origin}.{alias.name}"
                        add(submodule if submodule in known else origin, child, lazy)
                elif origin != "__future__":
                    add(origin.split(".")[0], child, lazy)
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


UNITS = layer_table()
MODULES = modules()
IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path, set(MODULES))]
INTERNAL = [imp for imp in IMPORTS if imp.target.startswith("lorite")]


def test_the_table_names_every_layer_and_covers_every_module():
    assert sorted(set(UNITS.values())) == list(range(10)), UNITS
    assert {"lorite.optim", "lorite.tasks", "lorite.runtime", "lorite.train", "lorite.commands"} <= set(UNITS)
    assert [m for m in MODULES if unit_of(m, UNITS) is None] == []
    assert all(unit in MODULES for unit in UNITS), "a unit of the table names no module"


def test_imports_go_to_the_own_unit_or_a_lower_layer():
    wrong = []
    for imp in INTERNAL:
        source, target = unit_of(imp.module, UNITS), unit_of(imp.target, UNITS)
        if source != target and UNITS[target] >= UNITS[source]:
            wrong.append(
                f"{imp.module}:{imp.line} imports {imp.target} (layer {UNITS[source]} → {UNITS[target]})"
            )
    assert wrong == []


def test_adapters_data_and_models_never_import_train():
    low = ("lorite.adapters", "lorite.data", "lorite.models")
    assert [i for i in INTERNAL if i.module.startswith(low) and i.target.startswith("lorite.train")] == []


def test_no_import_circles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in INTERNAL:
        if imp.target != imp.module:
            graph[imp.module].add(imp.target)
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert circles == []


def test_lazy_imports_say_why():
    unexplained = [f"{i.module}:{i.line} ({i.target})" for i in IMPORTS if i.lazy and not i.explained]
    assert unexplained == []


def test_lazy_lorite_imports_are_the_documented_exceptions():
    lazy = {(i.module, i.target) for i in INTERNAL if i.lazy}
    assert lazy == {
        ("lorite.federated.runner", "lorite.federated.flower"),
        ("lorite.optim._linalg", "lorite.optim._jacobi"),
    }


@pytest.mark.parametrize(
    "pattern", [r'startswith\(\(?"(corpus|file|bigbench):', r'len\("(corpus|file|bigbench):"\)']
)
def test_only_the_task_layer_parses_task_specs(pattern):
    parsers = [
        str(path.relative_to(SOURCE))
        for path in MODULES.values()
        if re.search(pattern, path.read_text()) and path != SOURCE / "lorite" / "tasks" / "spec.py"
    ]
    assert parsers == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The helpers themselves: a circle, a wrong-way import and an unexplained lazy import are found."""
    package = tmp_path / "lorite"
    (package / "train").mkdir(parents=True)
    (package / "data").mkdir()
    (package / "__init__.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "a.py").write_text("from ..train import loop\n")
    (package / "train" / "loop.py").write_text("def f():\n    from ..data import a\n")
    known = {"lorite", "lorite.train", "lorite.data", "lorite.data.a", "lorite.train.loop"}
    up = imports_of("lorite.data.a", package / "data" / "a.py", known)
    down = imports_of("lorite.train.loop", package / "train" / "loop.py", known)
    assert [(i.target, i.lazy) for i in up] == [("lorite.train.loop", False)]
    assert [(i.target, i.lazy, i.explained) for i in down] == [("lorite.data.a", True, False)]
    assert UNITS[unit_of("lorite.train.loop", UNITS)] > UNITS[unit_of("lorite.data.a", UNITS)]
