"""The layers of ipltool import one way: no module reaches back into one that imports it.

Every module under `src/ipltool` is parsed with `ast` (nothing is imported) and every
`ipltool` import is collected, at module level and inside functions alike, since a
function-level import only delays a cycle. Relative imports are resolved, and
`from ipltool.x import name` counts as an import of `ipltool.x.name` when that is a
submodule (else of `ipltool.x`). Imports under `if TYPE_CHECKING:` never run and are
left out. A strongly connected component of more than one module is an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ipltool"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every `.py` under `root` (the folder of `package`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST):
    """Every Import / ImportFrom node of `tree`, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _type_checking_only(node):
            children = node.orelse
        stack.extend(children)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (`ipltool.hub.ModelEntry` -> `ipltool.hub`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports anywhere in its body (see the module docstring)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    owner = _owner(target, modules)
                    if owner is not None and owner != name:
                        graph[name].add(owner)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_collector_sees_every_kind_of_import(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom pkg import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "from .. import a\n",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nelse:\n    import pkg.sub.d\n",
        "sub/d.py": "from pkg.a import thing\nfrom ..sub import nothing\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.a"},
        "pkg.sub.c": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.a", "pkg.sub"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"]]


#: The bottom of the stack: what these modules may import of ipltool (the models, which
#: import torch, sit above the registry and build from its entries).
LOWER_LAYERS = {
    "ipltool.paths": set(),
    "ipltool.tomlio": set(),
    "ipltool.checkpoints": {"ipltool.errors"},
    "ipltool.hub": {
        "ipltool.errors", "ipltool.console", "ipltool.progress", "ipltool.atomic",
        "ipltool.download", "ipltool.paths", "ipltool.checkpoints", "ipltool.tomlio",
    },
}


def test_the_registry_and_the_cache_sit_below_the_models():
    graph = import_graph(SRC, "ipltool")
    for module, allowed in LOWER_LAYERS.items():
        assert graph[module] <= allowed, f"{module} imports {', '.join(sorted(graph[module] - allowed))}"


def test_ipltool_has_no_import_cycle():
    graph = import_graph(SRC, "ipltool")
    assert graph.get("ipltool.hub")  # the source tree was found and parsed
    found = cycles(graph)
    lines = []
    for component in found:
        members = set(component)
        edges = sorted(f"{a} -> {b}" for a in component for b in graph[a] & members)
        lines.append(f"{len(component)} modules: {', '.join(component)}\n    " + "\n    ".join(edges))
    assert not found, "import cycles (function-level imports count too):\n" + "\n".join(lines)
