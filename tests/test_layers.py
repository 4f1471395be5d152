"""The package's layering, checked on the source: no import cycles between potstill modules (lazy imports inside
functions included — they hide cycles, they do not remove them), and the lower layers (labels, registry, data,
losses) never import higher ones."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "potstill"
LOWER = ("potstill.labels", "potstill.registry", "potstill.io", "potstill.data", "potstill.losses")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """potstill modules imported anywhere in the file (``from potstill.x import y`` counts y if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("potstill")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("potstill"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
    return {m for m in found if m in known and m != "potstill"}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycles():
    edges, cycles = graph(), []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} → {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, f"import cycles: {cycles}"


def test_lower_layers_import_only_lower_layers():
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m.startswith(LOWER)
           for d in deps if not d.startswith(LOWER) and not d.startswith("potstill.builtin")]
    assert not bad, bad
