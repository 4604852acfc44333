"""The layout promises of docs/architecture.md, checked on the source (issue 14): data flows one way.

- no import cycle between the package's modules (a module importing another inside a function counts too:
  a lazy import hides a cycle, it does not remove it);
- the model's math (``modeling.py``) does no file I/O;
- converters never import the model;
- the runners stay thin.
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "paddle_megatronbert")
RUNNERS = ("run_pretrain.py", "run_squad.py", "run_glue.py")
RUNNER_LINE_BUDGET = 160  # issue 14 asks for "about 150"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _package_modules():
    modules = {}
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[_module_name(path)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str, known) -> set:
    """Package modules that ``module`` imports anywhere in its body (module level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:  # `from .x import y` names module x or a package's member
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith("paddle_megatronbert"):
                found.add(target)
    return found


def _import_graph():
    modules = _package_modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # A package's __init__ re-exporting its members is the package's face, not a dependency of the members
    # on each other: importing `pkg.sub` runs `pkg/__init__` first, so edges into a package from its own
    # members are not counted.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


FILE_IO_NAMES = {"open", "makedirs", "listdir", "rename", "replace", "remove", "unlink", "fsync", "scandir"}
FILE_IO_ATTRIBUTES = {("paddle", "save"), ("paddle", "load"), ("os", "path"), ("json", "dump"), ("json", "load"),
                      ("shutil", "rmtree"), ("shutil", "copy"), ("shutil", "move")}


def _file_io_uses(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FILE_IO_NAMES:
            uses.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in FILE_IO_ATTRIBUTES or (node.value.id == "os" and node.attr in FILE_IO_NAMES):
                uses.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return uses


def test_the_model_math_does_no_file_io():
    uses = _file_io_uses(os.path.join(PACKAGE, "modeling.py"))
    assert not uses, "modeling.py does file I/O (belongs in the checkpoint module): " + "; ".join(uses)


def test_converters_never_import_the_model():
    graph = _import_graph()
    offenders = sorted(m for m, targets in graph.items()
                       if m.startswith("paddle_megatronbert.convert") and "paddle_megatronbert.modeling" in targets)
    assert not offenders, f"converters importing the model: {offenders}"


@pytest.mark.parametrize("runner", RUNNERS)
def test_runners_are_thin(runner):
    with open(os.path.join(REPO, runner), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert len(lines) <= RUNNER_LINE_BUDGET, f"{runner} has {len(lines)} lines (budget {RUNNER_LINE_BUDGET})"
