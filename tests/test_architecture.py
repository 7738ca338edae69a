"""The package's layering, checked on the source: no import circle (counting imports inside
functions too, so none exists only to dodge a circle), ``config`` a leaf, Flower only in its engine,
and each layer importing only the layers below it (CONTRIBUTING.md draws the same picture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pf2lora"

LAYERS: list[tuple[str, ...]] = [
    ("pf2lora.errors", "pf2lora.io", "pf2lora.config", "pf2lora.state", "pf2lora.autodiff", "pf2lora.batching"),
    ("pf2lora.lora", "pf2lora.optim", "pf2lora.hypergrad", "pf2lora.robust", "pf2lora.privacy", "pf2lora.metrics", "pf2lora.secagg"),
    ("pf2lora.data", "pf2lora.models", "pf2lora.tasks"),
    ("pf2lora.methods",),
    ("pf2lora.plan", "pf2lora.export", "pf2lora.adapters"),
    ("pf2lora.engines",),
    ("pf2lora.report", "pf2lora.checkpoint", "pf2lora.runs", "pf2lora.tensorboard"),
    ("pf2lora.cli",),
]
"""Bottom to top: a module may import its own layer's modules and any layer below, never above."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> set[str]:
    """The pf2lora modules ``path`` imports anywhere (functions included, ``TYPE_CHECKING`` blocks not)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:  # `from pf2lora import state` imports the module pf2lora.state
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != me}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := dfs(m)) is not None:
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := dfs(n)) is not None:
            return found
    return None


def test_no_import_circle_even_through_imports_inside_functions():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf():
    assert graph()["pf2lora.config"] <= {"pf2lora.errors"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_layer_and_below(module):
    g = graph()
    if module == "pf2lora":
        return
    mine = layer_of(module)
    above = sorted(m for m in g[module] if m != "pf2lora" and layer_of(m) > mine)
    assert not above, f"{module} (layer {mine}) imports {above} from a higher layer"


def test_flower_is_imported_only_by_its_engine():
    for name, path in modules().items():
        if name.startswith("pf2lora.engines.flower"):
            continue
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("flwr", "ray")], f"{name} imports Flower"
