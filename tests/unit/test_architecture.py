"""The package picture of docs/architecture.md holds: imports go one way, models know no ranks, nothing imports a stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "mtk"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (under ``if TYPE_CHECKING:`` too: a type is a dependency)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _unit(module: str) -> str | None:
    """``mtk.X``: the subpackage or top-level module of mtk that ``module`` belongs to."""
    parts = module.split(".")
    if parts[0] != "mtk" or len(parts) < 2:
        return None
    candidate = ROOT / parts[1]
    return f"mtk.{parts[1]}" if candidate.is_dir() or candidate.with_suffix(".py").is_file() else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        unit = _unit(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if unit is None:  # mtk/__init__.py
            continue
        targets = {_unit(name) for name in _imports(path)} - {None, unit}
        graph.setdefault(unit, set()).update(targets)
    return graph


def test_no_import_cycle_among_subpackages():
    graph = import_graph()
    assert {"mtk.models", "mtk.parallel", "mtk.train", "mtk.data", "mtk.layers", "mtk.config"} <= set(graph)
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, node, target])
            if target not in state:
                walk(target, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])


def test_the_arrows_of_the_picture():
    graph = import_graph()
    assert graph["mtk.config"] == set()
    assert "mtk.train" not in graph["mtk.parallel"] and "mtk.train" not in graph["mtk.models"]
    assert "mtk.parallel" not in graph["mtk.models"] and "mtk.parallel" not in graph["mtk.layers"]
    assert "mtk.models" not in graph["mtk.layers"]


def test_models_and_layers_know_no_ranks_and_nothing_imports_a_stage():
    for path in ROOT.rglob("*.py"):
        imports = _imports(path)
        assert not any(name == "stages" or name.startswith("stages.") for name in imports), path
        if path.parent.name in ("models", "layers"):
            assert not any(name.startswith("torch.distributed") for name in imports), path
