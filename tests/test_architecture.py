"""The layout's rules, read from the code itself (docs/house.md draws them): no import cycle between the
package's modules nor between its parts (subpackages and top modules), nor in bench/ (imports inside
functions and under TYPE_CHECKING count: both are dependencies a reader must follow); engines load and
export makes (engines/ imports nothing of export/); the host's half (http/, text/) imports nothing of
the engine side; a worker and the supervisor start without torch or transformers; errors carry nothing
of HTTP; and each setting, logging set-up and error status has one home."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

from conftest import ROOT
from nerserve import errors
from nerserve.config import Settings
from nerserve.http.responses import HEADERS, STATUS

PACKAGE = ROOT / "packages" / "nerserve"
ENGINE_SIDE = ("nerserve.engine", "nerserve.engines", "nerserve.export")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: Collection[str]) -> set[str]:
    """The `modules` that module `name` (at `path`) imports anywhere in it (functions and TYPE_CHECKING
    blocks included): each imported module, a `from X import y` module y, and the packages whose
    __init__ an import runs."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                prefix = ".".join(parts[:end])
                if prefix in modules and prefix != name:
                    found.add(prefix)
    return found


GRAPH = {name: imports_of(name, path, MODULES) for name, path in MODULES.items()}


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage (`nerserve.http`), or itself for a top module."""
    return ".".join(module.split(".")[:2])


#: the parts' graph: part -> the other parts its modules import (the package's own __init__ left out: it
#: holds the version, which every part may read)
PARTS = {
    part: {part_of(t) for m in GRAPH if part_of(m) == part for t in GRAPH[m]} - {part, "nerserve"}
    for part in {part_of(m) for m in GRAPH} - {"nerserve"}
}
BENCH = {path.stem: path for path in (ROOT / "bench").glob("*.py")}
BENCH_GRAPH = {name: imports_of(name, path, BENCH) for name, path in BENCH.items()}


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_package_has_no_import_cycle_counting_imports_inside_functions() -> None:
    assert len(GRAPH) > 40 and any(GRAPH.values())  # the graph was read: the rule is not vacuous
    assert cycles_of(GRAPH) == []


def test_the_package_parts_have_no_import_cycle() -> None:
    """Subpackages and top modules as nodes: `text` may use `schemas`, or the reverse, never both."""
    assert {"nerserve.http", "nerserve.engines", "nerserve.export", "nerserve.schemas", "nerserve.evaluation"} <= set(
        PARTS
    )
    assert cycles_of(PARTS) == []


def test_bench_has_no_import_cycle() -> None:
    assert {"run", "load", "check_packed"} <= set(BENCH) and any(BENCH_GRAPH.values())
    assert cycles_of(BENCH_GRAPH) == []


def test_engines_load_and_export_makes() -> None:
    """engines/ (what loads and runs an engine folder) imports nothing of export/ (what makes one); the
    folder's format is below both (engine_folder.py), and export/ may import engines/ to check its work."""
    crossing = {m: sorted(t for t in GRAPH[m] if part_of(t) == "nerserve.export") for m in GRAPH}
    engines = {m: targets for m, targets in crossing.items() if part_of(m) == "nerserve.engines" and targets}
    assert "nerserve.engines.ort_engine" in GRAPH and engines == {}
    assert "nerserve.engine_folder" in PARTS["nerserve.engines"] & PARTS["nerserve.export"]


def test_the_evaluator_imports_nothing_of_the_package() -> None:
    """evaluation/ (gold readers, the tag scheme, the scores) stands alone, so the build's F1 check
    (export/), `nerserve tag --format conll` and `nerserve eval` (tag/) share it without a cycle."""
    assert {"nerserve.evaluation.scores", "nerserve.evaluation.gold"} <= set(GRAPH)
    assert PARTS["nerserve.evaluation"] == set()
    assert "nerserve.evaluation" in PARTS["nerserve.export"] & PARTS["nerserve.tag"]


def test_the_host_half_imports_nothing_of_the_engine_side() -> None:
    host = [name for name in GRAPH if name.startswith(("nerserve.http", "nerserve.text"))]
    assert "nerserve.http.worker" in host and "nerserve.text.frontend" in host
    crossing = {name: sorted(t for t in GRAPH[name] if t.startswith(ENGINE_SIDE)) for name in host}
    assert {name: targets for name, targets in crossing.items() if targets} == {}


def test_the_optional_presidio_recognizer_is_imported_by_nothing_of_the_package() -> None:
    """presidio is an optional extra: the server, the CLI and every other part must start without it."""
    assert "presidio_analyzer" in (PACKAGE / "presidio.py").read_text()  # the module read is the recognizer
    assert PARTS["nerserve.presidio"] == set()
    assert sorted(name for name, targets in GRAPH.items() if "nerserve.presidio" in targets) == []


@pytest.mark.parametrize(
    "modules",
    [
        ["nerserve.http.worker"],  # a worker's entry
        ["nerserve.cli", "nerserve.server", "nerserve.engine.process", "nerserve.http.worker"],  # the supervisor's
    ],
    ids=["worker", "supervisor"],
)
def test_an_entry_point_imported_fresh_leaves_torch_and_transformers_out(modules: list[str]) -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_errors_carry_no_http_and_one_place_maps_every_kind() -> None:
    kinds = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    assert len(kinds) >= 10
    for kind in kinds:
        assert not {"status", "headers", "status_code"} & set(vars(kind)), kind
        assert kind in STATUS, f"{kind.__name__} has no status in http/responses.py"
    assert set(HEADERS) <= set(kinds)
    assert list(inspect.signature(errors.ApiError).parameters) == ["message"]  # no headers to hand in


def _string_constants(path: Path) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_every_nerserve_variable_is_read_through_settings_and_documented() -> None:
    """Only config.py names NERSERVE_ variables (the prefix, and config.yaml's own location); the README's
    configuration table has a row for every setting."""
    naming = {
        module_name(path): [s for s in _string_constants(path) if s.startswith("NERSERVE_")]
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: found for name, found in naming.items() if found} == {
        "nerserve.config": ["NERSERVE_", "NERSERVE_CONFIG"]
    }
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    missing = [
        field.name
        for field in dataclasses.fields(Settings)
        if field.name not in ("mounts",) and f"`{field.name}`" not in table
    ]
    assert missing == []


def test_logging_is_set_up_in_one_place() -> None:
    calling = [
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(
            isinstance(node, ast.Attribute) and node.attr == "basicConfig"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert calling == ["nerserve.logs"]
