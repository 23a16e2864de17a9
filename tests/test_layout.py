"""The layout is the architecture (pure, reads the source): each part imports only the
parts below it, and the API never imports Docker or the workers."""

from __future__ import annotations

import ast
import builtins
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


def test_no_module_of_the_product_is_over_300_lines() -> None:
    """A module a reader can hold at once: past 300 lines it does two jobs."""
    files = [*modules().values(), *(ROOT / "bench").glob("*.py"), ROOT / "celeryconfig.py",
             ROOT / "titan-plugins.py"]
    assert {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 300} == {}


def test_no_two_modules_share_a_name() -> None:
    """A module's name says its step: two of one name (an `events` of the API and one of
    the core) leave a reader asking which."""
    names: dict[str, list[str]] = {}
    for name in modules():
        if not name.endswith(("__init__", "__main__")) and name.count(".") > 0:
            names.setdefault(name.rsplit(".", 1)[1], []).append(name)
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_every_error_is_a_titan_error() -> None:
    """One error tree (manager.core.errors.TitanError): each error carries a stable code
    and its details, wherever it is raised."""
    builtin = {n for n, v in vars(builtins).items()
               if isinstance(v, type) and issubclass(v, BaseException)}
    bases: dict[str, list[str]] = {}
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else ast.unparse(b)
                                    for b in node.bases]

    def is_error(name: str) -> bool:
        return name in builtin or any(is_error(b) for b in bases.get(name, ()))

    def in_tree(name: str) -> bool:
        return name == "TitanError" or any(in_tree(b) for b in bases.get(name, ()))

    outside = [n for n in bases if n not in builtin and is_error(n) and not in_tree(n)]
    assert outside == []


def test_settings_are_read_from_the_environment_in_one_place() -> None:
    """TITAN_* is read by the settings' classes alone (manager.core.config, and the CLI
    client's group, manager.core.client_config); every other module is handed them."""
    readers = {"manager.core.config", "manager.core.client_config"}

    def titan(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and str(node.value).startswith("TITAN_")

    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            read = ((isinstance(node, ast.Call) and node.args and titan(node.args[0])
                     and ("environ" in ast.unparse(node.func) or "getenv" in
                          ast.unparse(node.func)))
                    or (isinstance(node, ast.Subscript) and titan(node.slice)
                        and "environ" in ast.unparse(node.value))
                    or (isinstance(node, ast.Compare) and titan(node.left)
                        and "environ" in ast.unparse(node.comparators[0])))
            if read and name not in readers:
                found.append(f"{name}: {ast.unparse(node)}")
    assert found == []


def test_no_two_classes_share_a_name() -> None:
    """One name per thing: a class name says which thing wherever it is read (private
    bases, `_Model`, and the programs that run inside a container, which import
    nothing of ours, aside)."""
    inside = {"workers.zygote", "manager.plugins.opener"}
    where: dict[str, list[str]] = {}
    for name, path in modules().items():
        if name in inside:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(name)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}


# A process reads its settings once, at its entry point, and hands each part the group it
# reads (manager.core.groups, manager.core.run_groups). These take the whole Settings:
# the processes' entry points and what each process is wired with, the CLI's local run
# (one command, one process), scaffolding (its template names every ceiling), and the
# attempt's preparing step (the payload's roots, the ceilings, the runtime, the network).
WHOLE_SETTINGS = {
    "manager.service:__init__", "manager.core.wiring:connect", "manager.api.app:_auth",
    "manager.cli.local:local_engine", "manager.cli.local:_execute",
    "manager.plugins.scaffold:scaffold", "workers.prepare:prepare", "workers.attempt:attempt",
}


def annotated(node: ast.expr | None) -> str | None:
    """An annotation's name, written bare or (with postponed annotations) as a string."""
    if isinstance(node, ast.Name):
        return node.id
    return node.value if isinstance(node, ast.Constant) else None


def test_the_whole_settings_go_to_entry_points_alone() -> None:
    taking = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                if any(annotated(a.annotation) == "Settings" for a in args):
                    taking.add(f"{name}:{node.name}")
    assert taking == WHOLE_SETTINGS, (sorted(taking - WHOLE_SETTINGS),
                                      sorted(WHOLE_SETTINGS - taking))
