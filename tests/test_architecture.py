"""The house's plan, held against the code: no import cycle among the project's modules, counting every import
(function-local and TYPE_CHECKING ones too, so that none can hide a cycle) and the package __init__ an import
runs first; no module of harness/ over ~400 lines without a reason at its top."""
from __future__ import annotations

import ast
from pathlib import Path

from harness.locations import REPO_ROOT

PACKAGE = REPO_ROOT / "harness"
LONGEST = 420  # lines: "about 400"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in its code."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..y import z
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
                wanted = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in wanted:
                found = known(target)
                while found:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                    if found != name and not name.startswith(found + "."):
                        targets.add(found)
                    found = found.rpartition(".")[0] if "." in found else None
                    found = found if found in modules else None
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
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


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "harness.run.flow" in graph["harness.run.flow"] | {"harness.run.flow"}
    assert {"harness.objectives.registry", "harness.run.config"} <= graph["harness.run.command_line"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    package = tmp_path / "harness"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "a.py").write_text("def f():\n    from harness.top import g  # dodging the cycle\n")
    (package / "top.py").write_text("from harness.low.a import f\n")
    (package / "apart.py").write_text("import json\n")
    graph = import_graph(package)
    assert graph["harness.top"] == {"harness.low.a", "harness.low"}
    assert cycles(graph) == [["harness.low.a", "harness.top"]]



def test_no_module_is_over_about_400_lines_without_saying_why():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        head = path.read_text(encoding="utf-8")[:3000]
        if lines > LONGEST and "Why this module is long:" not in head:
            long[str(path.relative_to(REPO_ROOT))] = lines
    assert long == {}
