"""The layout is the architecture (pure, reads the source): each part imports only the
parts below it, and the API never imports Docker or the workers."""

from __future__ import annotations

import ast
from pathlib import Path

from manager.core.config import ROOT

# A part may import itself and the parts of a lower rank (workers run beside the bus).
RANKS = {"manager.core": 0, "manager.plugins": 1, "manager.egress": 1, "manager.bus": 2,
         "workers": 2, "manager.api": 3, "manager.cli": 4, "manager.service": 5,
         "manager.__main__": 6}


def part_of(module: str) -> str | None:
    return next((p for p in sorted(RANKS, key=len, reverse=True)
                 if module == p or module.startswith(p + ".")), None)


def imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def modules() -> dict[str, Path]:
    files = [*(ROOT / "manager").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in files}


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for name, path in modules().items():
        mine = part_of(name)
        if mine is None:
            continue
        for target in imports(path):
            theirs = part_of(target)
            if theirs and theirs != mine and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_the_api_never_touches_docker_or_the_workers() -> None:
    for name, path in modules().items():
        if part_of(name) == "manager.api":
            assert not [t for t in imports(path) if t.split(".")[0] in ("docker", "workers")], name


def test_only_the_observer_moves_metrics() -> None:
    """Metrics are moved by manager.core.observer alone (each part tells it what happened);
    the manager's service imports them only to serve /metrics."""
    readers = {"manager.core.observer", "manager.service"}
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            named = (isinstance(node, ast.ImportFrom) and (
                node.module == "manager.core.metrics" or (node.module == "manager.core"
                and any(a.name == "metrics" for a in node.names)))) or (
                isinstance(node, ast.Import)
                and any(a.name == "manager.core.metrics" for a in node.names))
            if named and name not in readers:
                found.append(name)
    assert not found, found
    service = (ROOT / "manager" / "service.py").read_text()
    assert "metrics.registry_for" in service and ".inc(" not in service


def test_no_module_imports_itself_in_a_circle() -> None:
    graph = {name: {t for t in imports(path) if t in modules()}
             for name, path in modules().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt)
                               and reaches(nxt, goal, seen)):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []
