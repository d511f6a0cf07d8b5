"""The package picture of docs/architecture.md holds: the arrow table is read from the document itself,
and every import of ``stages/`` and ``mtk/`` (function-local ones too, relative ones resolved) is
checked against it: no cycle, each package imports only what its row lists, every package has a row,
each "no X" note holds, and nothing in mtk imports a stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "mtk"
DOC = REPO / "docs" / "architecture.md"
STAGES = "stages"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (under ``if TYPE_CHECKING:`` and inside functions
    too: a type or a lazy import is a dependency); ``from X import y`` counts as X and X.y."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                assert parent, f"{path}: relative import beyond the top package"
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str | None:
    """The row of the picture ``module`` belongs to: ``stages`` for the CLI package, ``X`` for the
    subpackage or top-level module ``mtk.X``; None for anything else (and ``mtk`` itself)."""
    parts = module.split(".")
    if parts[0] == STAGES:
        return STAGES
    if parts[0] != "mtk" or len(parts) < 2 or parts[1] == "__init__":
        return None
    candidate = ROOT / parts[1]
    return parts[1] if candidate.is_dir() or candidate.with_suffix(".py").is_file() else None


def _sources() -> list[Path]:
    return sorted([*ROOT.rglob("*.py"), *(REPO / STAGES).rglob("*.py")])


def import_graph() -> dict[str, set[str]]:
    """Row -> the rows it imports (itself left out)."""
    graph: dict[str, set[str]] = {}
    for path in _sources():
        unit = _unit(".".join(path.relative_to(REPO).with_suffix("").parts))
        if unit is None:  # mtk/__init__.py
            continue
        targets = {_unit(name) for name in _imports(path)} - {None, unit}
        graph.setdefault(unit, set()).update(targets)  # type: ignore[arg-type]
    return graph


def arrow_table() -> dict[str, tuple[set[str] | None, set[str]]]:
    """docs/architecture.md's "One-way arrows" block: row -> (what it may import, None for every mtk
    package; the modules a "(no X)" note forbids)."""
    text = DOC.read_text(encoding="utf-8")
    after = text[text.index("One-way arrows") :]
    block = after.split("```", 2)[1]
    rows: list[str] = []
    for line in block.splitlines():
        if line[:1].isspace() and line.strip() and rows:  # an indented line continues the row above
            rows[-1] += " " + line.strip()
        elif line.strip():
            rows.append(line.strip())
    table: dict[str, tuple[set[str] | None, set[str]]] = {}
    for line in rows:
        match = re.fullmatch(r"(\w+)\s+->\s+(.*?)(?:\s{2,}\((.*)\))?", line)
        assert match, f"{DOC}: an arrow line must read 'name -> a, b, c  (note)': {line!r}"
        name, targets, note = match.groups()
        targets = re.sub(r"\([^)]*\)", "", targets).strip()  # "models (the spec)" -> "models"
        if targets == "mtk.*":
            allowed = None
        elif targets == "nothing":
            allowed = set()
        else:
            allowed = {target.strip() for target in targets.split(",")}
        forbidden = set(re.findall(r"\bno ([\w.]+)", note or ""))
        assert name not in table, f"{DOC}: two rows for {name}"
        table[name] = (allowed, forbidden)
    return table


def test_every_package_has_a_row_and_every_row_a_package():
    graph, table = import_graph(), arrow_table()
    assert {"models", "parallel", "train", "data", "layers", "config", STAGES} <= set(graph)
    assert sorted(set(graph) - set(table)) == [], (
        f"packages without a row in the arrow table of {DOC}: add their arrows"
    )
    assert sorted(set(table) - set(graph)) == [], f"rows of {DOC} for packages that do not exist"
    for name, (allowed, _) in table.items():
        assert allowed is None or allowed <= set(graph), f"{DOC}: {name} -> unknown {allowed - set(graph)}"


def test_no_import_cycle():
    graph = import_graph()
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


def test_each_package_imports_only_what_its_row_lists():
    graph, table = import_graph(), arrow_table()
    broken = []
    for name, (allowed, _) in sorted(table.items()):
        everything_but_stages = set(graph) - {STAGES}
        extra = graph.get(name, set()) - (everything_but_stages if allowed is None else allowed)
        broken += [f"{name} -> {target}" for target in sorted(extra)]
    assert broken == [], f"imports that the arrow table of {DOC} does not draw: {', '.join(broken)}"


def test_nothing_in_mtk_imports_a_stage_and_the_no_notes_hold():
    table = arrow_table()
    found = []
    for path in _sources():
        unit = _unit(".".join(path.relative_to(REPO).with_suffix("").parts))
        if unit is None:
            continue
        imports = _imports(path)
        forbidden = set(table.get(unit, (None, set()))[1])
        if unit != STAGES:
            forbidden.add(STAGES)
        for module in forbidden:
            if any(name == module or name.startswith(module + ".") for name in imports):
                found.append(f"{path.relative_to(REPO)} imports {module}")
    assert found == [], "; ".join(found)


def test_the_table_reads_what_the_document_draws():
    table = arrow_table()
    assert table[STAGES][0] is None
    assert table["config"] == (set(), set())
    assert table["layers"] == ({"config"}, {"torch.distributed"})
    assert {"models", "layers", "config"} <= table["parallel"][0]
