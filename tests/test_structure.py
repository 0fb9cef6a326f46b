"""The shape of the code that the architecture page promises: imports run one way (no cycle
among the modules of ``arena`` and ``percpu``, ``TYPE_CHECKING`` imports included), ``percpu``
uses only what ``arena`` exports, and ``Domain`` stays a facade."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import percpu
from percpu import Counter, Domain, Gauge, InvalidType, PerCpu, Summary

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("arena", "percpu")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of the two packages that ``path`` imports, at any depth of its tree."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")]
    names = {_module_name(p) for p in files}
    return {_module_name(p): {m for m in _imports(p) if m in names} - {_module_name(p)}
            for p in files}


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.endswith("__init__") or nxt in PACKAGES:
                continue  # a package's __init__ re-exports: it sits above its modules
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_percpu_imports_nothing_private_from_arena() -> None:
    private = {m: sorted(i for i in _imports(p) if i.startswith("arena._"))
               for p in (ROOT / "percpu").glob("*.py") if (m := _module_name(p))}
    assert {m: i for m, i in private.items() if i} == {}


def test_domain_is_a_facade_of_at_most_500_lines() -> None:
    lines, _ = inspect.getsourcelines(Domain)
    assert len(lines) <= 500, len(lines)


@pytest.mark.parametrize("cls", [Counter, Gauge, Summary, PerCpu])
def test_handles_are_made_by_a_domain_only(cls: type) -> None:
    with pytest.raises(InvalidType, match="made by a Domain"):
        cls()
    assert issubclass(percpu.InvalidType, TypeError)
