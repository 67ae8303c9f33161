"""The package's layers: no import runs upward, and no two modules import each other.

Every module of the worker package is read with ``ast`` (nothing is imported, so
no side effect runs) and every ``import`` in it counts, the ones inside functions
included: a lazy import is still a dependency, it only comes later.

A module may import modules of its own layer and of the layers below it. The
layers, bottom first, and what belongs in each:

- bottom: what everything shares, importing nothing above it: errors, exit
  codes, settings, the Redis key names, the dataclasses, parsing records,
  checksums, sharding, the SQL text, secrets read from files, the TLS checks
  of the settings, and the Flower guard (standard library, click, exit_codes
  and secret_files only; see worker/flower_guard.py).
- stores: the connections to PostgreSQL and Redis, the two stores, migrations.
- engines: backup, restore and verify, plain Python over the two stores.
- runs: a run from start to finish (record, scope, batches, outcome), the
  services a run works with, the worker process's pools, restore drills.
- celery: the Celery app and its configuration, and the tasks, thin wrappers
  over the run layer. worker.celery imports the Flower guard (bottom) so that
  `celery -A worker flower` stops before Flower opens its port.
- devstack: `dnd-client dev`, which starts servers and Celery's processes.
- cli: the `dnd-client` command line, the top: nothing imports it but
  ``python -m worker``.

A new module must be placed in ``LAYERS`` before this test passes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "worker"

# Bottom first: the modules of each layer, named inside the package; a
# subpackage (cli, devstack, sql) with all its modules; __init__ is the package root.
LAYERS: tuple[tuple[str, str], ...] = (
    (
        "bottom",
        "__init__ errors exit_codes settings keys models records checksums sharding sql "
        "flower_guard lag secret_files tls",
    ),
    ("stores", "connections pg_history pg_store redis_store cluster_swap watch_cluster migrate"),
    ("engines", "engine backup_plan backup restore verify"),
    (
        "runs",
        "services runner runs supervise process drill continuous health metrics beat_presence",
    ),
    ("celery", "celery_config celery celery_runs tasks celery_health watch"),
    ("devstack", "devstack"),
    ("cli", "cli __main__"),
)

# Imports allowed to close a cycle, each with the reason it is needed. None is
# today; an entry is (importer, imported).
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str
    line: int
    implicit: bool = False  # the parent package, which Python runs first

    def where(self) -> str:
        path = module_paths()[self.importer].relative_to(PACKAGE.parent)
        return f"{path}:{self.line}"


def module_paths() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS; None when it is not placed."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, names) in enumerate(LAYERS):
        if name in names.split():
            return index
    return None


def _self_and_parents(module: str) -> Iterator[str]:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])


def _is_package(module: str) -> bool:
    return module_paths()[module].name == "__init__.py"


def imports_of(module: str) -> Iterator[Import]:
    """What ``module`` imports of the package, at any depth in its code."""
    modules = module_paths()
    tree = ast.parse(modules[module].read_text(encoding="utf-8"), str(modules[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _resolve(module, alias.name, None, node.lineno, modules)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.module, node.level)
            for alias in node.names:
                yield from _resolve(module, base, alias.name, node.lineno, modules)
    # Importing a module runs its packages' __init__ first.
    for parent in list(_self_and_parents(module))[1:]:
        yield Import(module, parent, 1, implicit=True)


def _absolute(module: str, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{name}" if name else base


def _resolve(
    importer: str, base: str, name: str | None, line: int, modules: dict[str, Path]
) -> Iterator[Import]:
    if base != "worker" and not base.startswith("worker."):
        return
    # `from worker import exit_codes` imports the module worker.exit_codes.
    target = f"{base}.{name}" if name and f"{base}.{name}" in modules else base
    assert target in modules, f"{importer} line {line}: no module {target} in the package"
    yield Import(importer, target, line)


def all_imports() -> list[Import]:
    return [found for module in module_paths() for found in imports_of(module)]


# -- the tests ---------------------------------------------------------------------


def test_every_module_has_a_layer():
    unplaced = [module for module in module_paths() if layer_of(module) is None]
    assert not unplaced, f"place these modules in LAYERS of {__file__}: {unplaced}"


def test_no_import_runs_upward():
    upward = []
    for found in all_imports():
        low, high = layer_of(found.importer), layer_of(found.imported)
        if low is None or high is None or high <= low:
            continue
        upward.append(
            f"{found.where()}: {found.importer} ({LAYERS[low][0]}) imports "
            f"{found.imported} ({LAYERS[high][0]})"
        )
    assert not upward, "imports running upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module: set() for module in module_paths()}
    for found in all_imports():
        if (found.importer, found.imported) not in ALLOWED_CYCLE_EDGES:
            graph[found.importer].add(found.imported)
    cycles = [sorted(group) for group in _strongly_connected(graph) if _is_cycle(group, graph)]
    assert not cycles, f"modules that import each other (directly or round about): {cycles}"


def test_allowed_cycle_edges_are_still_imports():
    edges = {(found.importer, found.imported) for found in all_imports()}
    stale = [edge for edge in ALLOWED_CYCLE_EDGES if edge not in edges]
    assert not stale, f"no longer imported: remove from ALLOWED_CYCLE_EDGES: {stale}"


def _is_cycle(group: list[str], graph: dict[str, set[str]]) -> bool:
    return len(group) > 1 or group[0] in graph[group[0]]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that all reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


# -- the checker checks ------------------------------------------------------------


def test_the_checker_sees_imports_inside_functions():
    found = {(i.importer, i.imported) for i in imports_of("worker.cli.dispatch")}
    # run_on_workers imports the Celery app only when it is called.
    assert ("worker.cli.dispatch", "worker.celery") in found


def test_the_checker_resolves_from_package_import_module():
    found = {i.imported for i in imports_of("worker.celery")}
    assert {"worker.flower_guard", "worker.process", "worker.celery_config"} <= found


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("worker", "bottom"),
        ("worker.exit_codes", "bottom"),
        ("worker.flower_guard", "bottom"),
        ("worker.pg_store", "stores"),
        ("worker.runs", "runs"),
        ("worker.tasks", "celery"),
        ("worker.devstack.stack", "devstack"),
        ("worker.cli.main", "cli"),
        ("worker.unplaced", None),
    ],
)
def test_layer_of(module, layer):
    index = layer_of(module)
    assert (LAYERS[index][0] if index is not None else None) == layer


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    cycles = sorted(sorted(g) for g in _strongly_connected(graph) if _is_cycle(g, graph))
    assert cycles == [["a", "b", "c"], ["d"]]
