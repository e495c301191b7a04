"""The tests' own layout: one home for each helper. A fixture is defined in one
file (conftest.py for the shared ones), a plain helper in one module (such as
tests/helpers.py), and no test module imports conftest.py, whose names pytest
owns. tests/legacy08 is another site's suite, with a conftest of its own."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent


def modules() -> dict[Path, ast.Module]:
    return {
        path: ast.parse(path.read_text(), str(path))
        for path in sorted(TESTS.glob("*.py"))
    }


def is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in {"pytest.fixture", "fixture"}


def fixture_name(node: ast.FunctionDef) -> str | None:
    for decorator in node.decorator_list:
        if is_fixture(decorator):
            if isinstance(decorator, ast.Call):
                for keyword in decorator.keywords:
                    if keyword.arg == "name" and isinstance(
                        keyword.value, ast.Constant
                    ):
                        return str(keyword.value.value)
            return node.name
    return None


def body_of(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    """The definition's code without its name and docstring, for finding copies
    (a class's with its bases)."""
    bases = [ast.dump(base) for base in getattr(node, "bases", [])]
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return "\n".join([*bases, *(ast.dump(statement) for statement in body)])


def test_each_fixture_is_defined_in_one_file() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = fixture_name(node)  # type: ignore[arg-type]
                if name is not None:
                    defined[name].append(f"{path.name}:{node.lineno}")
    twice = {name: places for name, places in defined.items() if len(places) > 1}
    assert not twice, (
        f"fixtures defined more than once (keep one, in conftest.py): {twice}"
    )


def test_no_test_module_imports_conftest() -> None:
    importing = []
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name.split(".")[-1] == "conftest" for name in names):
                importing.append(f"{path.name}:{node.lineno}")
    assert not importing, (
        f"imports of conftest.py (move the helper to tests/helpers.py): {importing}"
    )


def test_no_helper_is_copied_between_files() -> None:
    """Two top-level functions or classes with the same code (whatever their names
    and docstrings) in two files: one is a copy."""
    defined: dict[str, list[str]] = defaultdict(list)
    for path, tree in modules().items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                code = body_of(node)
                if code.count("\n") >= 1:  # two statements or more
                    defined[code].append(f"{path.name}:{node.name}")
    copies = [
        places
        for places in defined.values()
        if len({place.split(":")[0] for place in places}) > 1
    ]
    assert not copies, f"helpers copied between files (keep one, import it): {copies}"


def test_the_checks_see_a_copy(tmp_path: Path) -> None:
    """The checks above can fail: they find a fixture, and a helper, written twice."""
    source = (
        "import pytest\n\n@pytest.fixture(scope='module')\ndef thing():\n"
        "    x = 1\n    return x\n"
    )
    tree = ast.parse(source)
    [node] = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert fixture_name(node) == "thing"
    assert body_of(node) == body_of(ast.parse(source.replace("thing", "other")).body[1])  # type: ignore[arg-type]
