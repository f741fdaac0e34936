"""No import cycles between the modules of ``analysis`` (issue 20).

A cycle is held together by an import inside a function, which hides it until someone moves that
import to the top and the package stops loading; so imports at module level and inside functions
both count (those under ``if TYPE_CHECKING:`` never run, and do not). Importing a module also runs
the ``__init__`` of every package above it, so that counts too (except ``analysis`` itself, whose
names load lazily).
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import analysis

def _modules() -> dict[str, Path]:
    """Every module of the analysis package, by dotted name, with its source file."""
    found = {"analysis": Path(analysis.__file__)}
    for info in pkgutil.walk_packages(analysis.__path__, "analysis."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[info.name] = Path(spec.origin)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level or in a function, not under ``if TYPE_CHECKING``."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if _is_type_checking(node) else list(ast.iter_child_nodes(node))
        stack.extend(children)
    return found


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The analysis modules one import statement loads, resolving relative imports from ``importer``."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = ".".join(p for p in (package if node.level else "", node.module or "") if p)
    # ``from pkg import name`` loads pkg.name when that is a module, else just pkg.
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


def _with_parents(name: str, importer: str) -> set[str]:
    """``name`` and the packages above it that importing it runs, bar ``analysis`` and the importer's own."""
    parts = name.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in chain if not importer.startswith(m + ".") and m != importer}


def import_graph() -> dict[str, set[str]]:
    """analysis module -> the analysis modules it imports (directly, at any level, when run)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, is_package, set(modules)):
                edges |= _with_parents(target, name) & set(modules)
        graph[name] = edges - {name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The groups of modules that import one another in a cycle (Tarjan's algorithm; groups of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(frozenset(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def one_cycle(graph: dict[str, set[str]], group: frozenset[str]) -> list[str]:
    """A readable path around a group: start at its first module and walk inside the group until back."""
    start = min(group)
    path, seen, node = [start], {start}, start
    while True:
        nxt = min(m for m in graph[node] if m in group)
        path.append(nxt)
        if nxt in seen:
            return path[path.index(nxt):]
        seen.add(nxt)
        node = nxt


def _describe(graph: dict[str, set[str]], groups: list[frozenset[str]]) -> str:
    return "; ".join(" -> ".join(one_cycle(graph, g)) for g in groups)


def test_the_graph_sees_imports_inside_functions() -> None:
    """The walker itself: cli imports the selection package only inside its commands, and the graph has that edge."""
    graph = import_graph()
    assert "analysis.selection" in graph["analysis.cli.run_commands"]
    assert graph["analysis.selection.recommender"] >= {"analysis.selection.eligibility", "analysis.selection.search",
                                                       "analysis.selection.explain", "analysis.selection.weights"}
    assert "analysis.selection" not in graph["analysis"]   # only under TYPE_CHECKING there


def test_a_new_cycle_would_be_found_and_named() -> None:
    """The checker itself: one import from errors back into the selection package closes a new cycle."""
    graph = import_graph()
    graph["analysis.errors"] = graph["analysis.errors"] | {"analysis.selection.weights"}
    new = strongly_connected(graph)
    assert new == [frozenset({"analysis.errors", "analysis.selection.weights"})]
    assert _describe(graph, new) == "analysis.errors -> analysis.selection.weights -> analysis.errors"


def test_selection_package_has_no_cycle() -> None:
    graph = import_graph()
    assert [g for g in strongly_connected(graph) if any(m.startswith("analysis.selection") for m in g)] == []


def test_no_import_cycles() -> None:
    """The merge package move (issue 20) removed the last two (checkpoints <-> block_reader, streaming <-> fused)."""
    graph = import_graph()
    groups = strongly_connected(graph)
    assert groups == [], f"import cycles: {_describe(graph, groups)}"
