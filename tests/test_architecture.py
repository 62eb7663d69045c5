"""The package's shape, checked: imports flow one way (no cycle among the imports a module runs when it
loads), modules stay small, and nothing in the repository points at files outside it."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "qualgate"
MAX_LINES = 310  # "about 300": a module past it holds more than one responsibility


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_imports(path: Path, modules: set[str]) -> set[str]:
    """The qualgate modules `path` imports at load time: top-level imports, not those under
    `if TYPE_CHECKING:` or inside functions (deferred on purpose)."""
    found: set[str] = set()
    this = _module(path)
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                anchor = this.split(".")[: len(this.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*anchor, node.module])
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {name for name in names if name in modules and name != this}
    return found


def test_no_import_cycle() -> None:
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _load_time_imports(path, set(paths)) for name, path in paths.items()}
    # A package's __init__ that re-exports its submodules is not a cycle with them: drop parent edges.
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_modules_stay_small() -> None:
    big = {
        str(p.relative_to(REPO)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"
