"""The core's imports run one way, bottom up (DESIGN.md "The layers"); function-level imports count too.

Every ``import`` / ``from ... import`` anywhere in a module (module level, inside functions, under
``TYPE_CHECKING``) is an edge, and so is the package a module lives in. Strings that name an
integration module count as imports of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spallm_plugins
import spallm_plugins.integrations

CORE = Path(spallm_plugins.__file__).parent
INTEGRATIONS = Path(spallm_plugins.integrations.__file__).parent

# lowest first; a module may import only modules of its own rank or below (and no circle)
RANKS = [
    ("config",),
    ("format", "outputs", "hub", "card"),
    ("kernels",),
    ("hooks",),
    ("ops", "layer", "convert", "sharding"),
    ("sketch",),
    ("models", "validate", "evaluate"),
    ("streaming", "pipeline", "merge", "cli", "bench", "builtin_plugins", "_autoregister"),
]


def module_files() -> dict[str, Path]:
    files = {}
    for root, package in ((CORE, "spallm_plugins"), (INTEGRATIONS, "spallm_plugins.integrations")):
        for path in root.rglob("*.py"):
            if root == CORE and INTEGRATIONS in path.parents:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project that ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                add(candidate if candidate in known else module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("spallm_plugins.integrations") and node.value in known:
                found.add(node.value)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    graph = {}
    for name, path in files.items():
        edges = imports_of(name, path, known)
        for target in list(edges):  # importing a.b.c runs a.b's __init__ too (unless we are inside a.b)
            parent = target.rpartition(".")[0]
            while parent.startswith("spallm_plugins.") and not (name + ".").startswith(parent + "."):
                edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = edges
    return graph


def rank(module: str) -> int | None:
    if not module.startswith("spallm_plugins.") or module.startswith("spallm_plugins.integrations"):
        return None
    top = module.split(".")[1]
    for i, names in enumerate(RANKS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of RANKS: add it to the layer it belongs to (and DESIGN.md)")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "spallm_plugins.format" in graph["spallm_plugins.kernels.reference"]  # from ..format import (top)
    assert "spallm_plugins.kernels.triton.ops" in graph["spallm_plugins.kernels.triton"]  # from . import ops (in a def)
    assert "spallm_plugins.hooks" in graph["spallm_plugins._autoregister"]  # from .hooks import (in a def)
    assert "spallm_plugins.sketch" in graph["spallm_plugins.bench.kmeans"]  # the package of sketch.kmeans


def test_core_imports_point_down_only():
    bad = []
    for module, targets in import_graph().items():
        mine = rank(module)
        if mine is None:
            continue
        for target in targets:
            theirs = rank(target)
            if target.startswith("spallm_plugins.integrations"):
                bad.append(f"{module} -> {target} (the core reaches integrations only through hooks)")
            elif theirs is not None and theirs > mine:
                bad.append(f"{module} (layer {mine}) -> {target} (layer {theirs})")
    assert not bad, "imports pointing up:\n" + "\n".join(sorted(bad))


def test_no_import_circle_in_the_core_or_the_integrations():
    graph = {m: {t for t in ts if t != "spallm_plugins"} for m, ts in import_graph().items() if m != "spallm_plugins"}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_checks_catch_a_circle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert rank("spallm_plugins.format") < rank("spallm_plugins.validate")
    assert rank("spallm_plugins.kernels.triton.ops") < rank("spallm_plugins.hooks")


def test_only_the_root_facade_names_integration_classes_and_it_loads_them_lazily():
    import subprocess
    import sys

    import spallm_plugins
    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.integrations.transformers import SpaLLMQuantConfig

    graph = import_graph()
    named = {t for t in graph["spallm_plugins"] if t.startswith("spallm_plugins.integrations.")}
    assert named == {"spallm_plugins.integrations.peft", "spallm_plugins.integrations.transformers"}
    assert spallm_plugins.SpaLLMConfig is SpaLLMConfig
    assert spallm_plugins.SpaLLMQuantConfig is SpaLLMQuantConfig
    assert {"SpaLLMConfig", "SpaLLMQuantConfig", "sketch_pretrained", "SketchConfig"} <= set(dir(spallm_plugins))
    probe = (
        "import sys; before = set(sys.modules); import spallm_plugins; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'transformers', 'peft') "
        "or m.startswith('spallm_plugins.integrations')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"importing the root loaded {loaded}"
    with pytest.raises(AttributeError, match=r"has no attribute 'nothing'$"):
        spallm_plugins.nothing  # noqa: B018
