"""The package's layers only point down and its imports have no cycles.

Every ``import`` in ``flashlm/`` counts, inside functions too: an import hidden in a function to
dodge a cycle is still a cycle. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``,
so those packages count as imported as well.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashlm"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    ["flashlm.errors", "flashlm.hardware", "flashlm.config"],
    ["flashlm.model"],
    ["flashlm.tokenizer", "flashlm.data", "flashlm.chat"],
    ["flashlm.generation", "flashlm.speculative", "flashlm.explain", "flashlm.interop"],
    ["flashlm.training"],
    ["flashlm.evaluate"],
    ["flashlm.serve"],
    ["flashlm.tasks", "flashlm.demo"],
    ["flashlm.cli", "flashlm.__main__"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "flashlm" or name.startswith("flashlm.")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the flashlm modules (and their parent packages) its imports run."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        own_ancestors = {module.rsplit(".", n)[0] for n in range(module.count(".") + 1)}
        for name in _imported_names(module, path):
            while name not in modules:  # `from pkg.mod import function` names a function
                name = name.rpartition(".")[0]
            parts = name.split(".")
            for depth in range(2, len(parts) + 1):
                target = ".".join(parts[:depth])
                if target in modules and target not in own_ancestors:
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def test_there_are_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "flashlm" and _layer(m) is None] == []


def test_layers_only_point_down():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target != "flashlm" and (_layer(target) or 0) > (_layer(module) or 0)
    ]
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _layer("flashlm.model.attention") < _layer("flashlm.training.loop")
