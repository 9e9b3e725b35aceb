"""The package's shape: its import graph has no cycle, counting imports inside functions too (a
cycle hidden from Python by a late import is still one in the design), and no function outside
the synthetic cohort's subpackage (hipoa.synth) has a body over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "hipoa"


def _imports(path: Path, modules: set[str]) -> set[str]:
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hipoa":
            parts = node.module.split(".")
            deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.Import):
            deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hipoa.")}
    return deps


def _modules() -> dict[str, list[Path]]:
    """Module name -> its files: each top-level module, and each subpackage as one node."""
    modules = {p.stem: [p] for p in PACKAGE.glob("*.py")}
    for sub in PACKAGE.iterdir():
        if (sub / "__init__.py").is_file():
            modules[sub.name] = sorted(sub.rglob("*.py"))
    return modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: set().union(*(_imports(p, set(modules)) for p in paths)) - {m} for m, paths in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (``[a, b, ..., a]``), or ``[]``."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d in graph and d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert {"phenotypes", "release", "tables", "predict", "synth"} <= set(graph)
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_the_output_tables_are_defined_by_tables_alone():
    graph = _graph()
    assert "phenotypes" not in graph["release"]
    assert "tables" in graph["release"] and "tables" in graph["phenotypes"] and "tables" in graph["predict"]


def test_the_synthetic_cohort_is_its_own_subpackage_and_production_code_does_not_import_it():
    graph = _graph()
    assert (PACKAGE / "synth" / "anatomy.py").is_file() and not (PACKAGE / "anatomy.py").exists()
    assert [m for m, deps in graph.items() if "synth" in deps] == ["cli"]  # `hipoa synth`, imported when run


def test_no_function_body_over_80_lines_outside_the_synthetic_package():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert long == []
