"""The package's layout (DESIGN.md "Moving parts"): no import cycles, no
function-local import of its own modules that could hide one, no module much
over 500 lines. Read from the source with ``ast``: nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "queued_storage"
#: A module over this many lines holds more than one job (migrations excepted).
MAX_LINES = 550
#: Function-local imports of the package's own modules that stay, each with the
#: reason. None of them may only hide a cycle: the cycle test counts them too.
LOCAL_IMPORTS_ALLOWED = {
    ("queued_storage", "queued_storage.prefetch"): (
        "queued_storage.prefetch_files is loaded on first access (PEP 562): the "
        "helpers need the ledger model, and importing the package (settings do, "
        "for STORAGES paths) must not need the app registry"
    ),
    ("queued_storage.apps", "queued_storage.checks"): (
        "the checks import the storage's configuration and through it the "
        "ledger model, which exists only once the app registry is ready (Django's "
        "own apps register their checks from ready() too)"
    ),
    ("queued_storage.apps", "queued_storage.integrations.prometheus"): (
        "the metrics' system check is registered when that module is imported, "
        "and it imports the ledger model (ready() is the first time it can)"
    ),
    ("queued_storage.integrations.celery", "queued_storage.worker"): (
        "a site's celery.py or settings import this module for beat_schedule() "
        "before Django's app registry is ready; the engine needs the ledger model"
    ),
    (
        "queued_storage.management.commands.install_transfer_schedule",
        "queued_storage.integrations.django_q",
    ): "django-q2 is optional and that module imports it: asked for only then",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function: runs at call time, not at import time


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    node: ast.AST, local: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Each import statement under ``node`` that runs, and whether it runs inside
    a function. What ``if TYPE_CHECKING:`` guards never runs."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, local
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(
                    ast.Module(body=[other], type_ignores=[]), local
                )
        else:
            inside = isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            yield from _import_nodes(child, local or inside)


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]
) -> Iterator[str]:
    """The package's modules that ``node`` imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name
        return
    base = node.module or ""
    if node.level:
        here = importer.split(".") if is_package else importer.split(".")[:-1]
        here = here[: len(here) - node.level + 1]
        base = ".".join([*here, base] if base else here)
    if base not in known:
        return
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        # ``from pkg import module`` imports the module, ``from pkg import name``
        # the package (the parent package every module needs is not an edge).
        yield submodule if submodule in known else base


def package_imports(package: Path) -> list[Import]:
    files = module_files(package)
    known = set(files)
    found = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, local in _import_nodes(tree):
            is_package = path.name == "__init__.py"
            for target in _targets(node, module, is_package, known):
                if target != module:
                    found.append(Import(module, target, node.lineno, local))
    return found


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Each set of modules that import each other in a circle (Tarjan's strongly
    connected components of more than one module), sorted."""
    graph: dict[str, set[str]] = {}
    for edge in imports:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _describe(cycle: list[str], imports: list[Import]) -> str:
    """One shortest circle through the first module of ``cycle``, each import
    with its line."""
    members = set(cycle)
    edges: dict[str, dict[str, Import]] = {}
    for edge in imports:
        if edge.importer in members and edge.imported in members:
            edges.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
    start = cycle[0]
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for other, edge in sorted(edges.get(node, {}).items()):
            if other == start:
                steps = [*paths[node], edge]
                return " -> ".join(
                    [start]
                    + [
                        f"{step.imported} (line {step.line}"
                        + (", in a function)" if step.local else ")")
                        for step in steps
                    ]
                )
            if other not in paths:
                paths[other] = [*paths[node], edge]
                queue.append(other)
    raise AssertionError(f"no circle through {start}")


def local_imports(imports: list[Import]) -> list[Import]:
    """The function-local imports of the package's modules not allowed above."""
    return [
        edge
        for edge in imports
        if edge.local and (edge.importer, edge.imported) not in LOCAL_IMPORTS_ALLOWED
    ]


def oversized(package: Path) -> dict[str, int]:
    """Modules over :data:`MAX_LINES` lines (migrations do not count)."""
    sizes = {}
    for module, path in module_files(package).items():
        if "migrations" in module.split("."):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            sizes[module] = lines
    return sizes


# The package


def test_no_import_cycles() -> None:
    imports = package_imports(PACKAGE)

    cycles = import_cycles(imports)

    assert not cycles, "Import cycles (move the shared piece down): " + " | ".join(
        _describe(cycle, imports) for cycle in cycles
    )


def test_no_function_local_imports_of_the_package() -> None:
    imports = package_imports(PACKAGE)

    hidden = local_imports(imports)

    assert not hidden, (
        "Import these at the top of the module (a function-local import hides a "
        "cycle; restructure it away): "
        + "; ".join(f"{e.importer} line {e.line}: {e.imported}" for e in hidden)
    )
    present = {(edge.importer, edge.imported) for edge in imports if edge.local}
    stale = sorted(set(LOCAL_IMPORTS_ALLOWED) - present)
    assert not stale, f"Remove from LOCAL_IMPORTS_ALLOWED (gone): {stale}"


def test_the_logic_never_imports_the_command_line_layer() -> None:
    """Commands are thin: what they share with the admin and the engine lives
    below them, so only ``management`` itself imports ``management``."""
    upward = [
        f"{edge.importer} line {edge.line}: {edge.imported}"
        for edge in package_imports(PACKAGE)
        if edge.imported.startswith("queued_storage.management")
        and not edge.importer.startswith("queued_storage.management")
    ]

    assert not upward, "Move what these need out of management/: " + "; ".join(upward)


def test_modules_stay_small() -> None:
    too_long = oversized(PACKAGE)

    assert not too_long, (
        f"Modules over {MAX_LINES} lines (split along one job each): {too_long}"
    )


# The checks themselves, on a package written for them


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / "queued_storage"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_a_cycle_through_a_function_local_import_is_found(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from queued_storage import high\n",
            "high.py": "from queued_storage.low import f\n",
            "typed.py": (
                "from typing import TYPE_CHECKING\n"
                "from queued_storage import high\n"
                "if TYPE_CHECKING:\n    from queued_storage import typed_user\n"
            ),
            "typed_user.py": "from . import typed\n",
        },
    )
    imports = package_imports(package)

    assert import_cycles(imports) == [["queued_storage.high", "queued_storage.low"]]
    assert local_imports(imports) == [
        Import("queued_storage.low", "queued_storage.high", 2, local=True)
    ]


def test_a_cycle_of_top_level_imports_is_found(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import queued_storage.b.c\n",
            "b/__init__.py": "",
            "b/c.py": "from ..a import x\n",
        },
    )

    assert import_cycles(package_imports(package)) == [
        ["queued_storage.a", "queued_storage.b.c"]
    ]


def test_a_long_module_is_found_and_a_migration_is_not(tmp_path: Path) -> None:
    long = "x = 1\n" * (MAX_LINES + 1)
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "long.py": long,
            "short.py": "x = 1\n" * MAX_LINES,
            "migrations/0001_initial.py": long,
        },
    )

    assert oversized(package) == {"queued_storage.long": MAX_LINES + 1}
