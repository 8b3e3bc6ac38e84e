"""The layers of docs/architecture.md, enforced: who may import whom, and no import cycles.

Read from the `ast` of every module (imports inside functions too, since a lazy import is still
a dependency), against the `layers` block of docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "vm_image", "takeover", "scripts")
AGENT_THIRD_PARTY = {"mcp", "pydantic"}


def layer_table() -> dict[str, tuple[str, ...]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    table = {}
    for line in block.group(1).strip().splitlines():
        name, _, allowed = line.partition(":")
        table[name.strip()] = tuple(a.strip() for a in allowed.split(","))
    return table


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names), at any depth of its code."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from . import x` and `from pkg import module` name modules, not attributes
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def ours(module: str, known: set[str]) -> str | None:
    """The module of this repository that an import names (the longest known prefix), or None."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def owner(module: str, table: dict[str, tuple[str, ...]]) -> str:
    matches = [k for k in table if module == k or module.startswith(k + ".")]
    assert matches, f"{module} has no line in the layers block of docs/architecture.md"
    return max(matches, key=len)


def graph() -> dict[str, set[str]]:
    found = dict(modules())
    known = set(found)
    edges = {}
    for name, path in found.items():
        edges[name] = {m for i in imports(name, path) if (m := ours(i, known)) and m != name}
    return edges


def test_every_import_follows_the_layer_table():
    table = layer_table()
    wrong = []
    for module, targets in graph().items():
        allowed = table[owner(module, table)]
        for target in targets:
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_agents_tools_use_the_standard_library_and_mcp_only():
    allowed = set(sys.stdlib_module_names) | AGENT_THIRD_PARTY | {"proxy"}
    wrong = []
    for name, path in modules():
        if name == "proxy.agent" or name.startswith("proxy.agent."):
            for module in imports(name, path):
                if module and module.split(".")[0] not in allowed:
                    wrong.append(f"{name} imports {module}")
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _without_packages(g: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exporting its modules is not a cycle through them.
    packages = {n for n, p in modules() if p.name == "__init__.py"}
    return {k: {t for t in v if t not in packages} for k, v in g.items() if k not in packages}


def test_no_module_imports_one_that_imports_it_back():
    cycle = _cycle(_without_packages(graph()))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_test_module_imports_another():
    """Shared helpers live in `tests/*_helpers.py` (and fixtures in conftest.py), one place each."""
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for module in imports(f"tests.{path.stem}", path):
            if module.split(".")[-1].startswith("test_") and module.startswith("tests."):
                wrong.append(f"{path.name} imports {module}")
    assert wrong == []
