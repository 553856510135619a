"""The dependency rules of docs/architecture.md, checked on the import graph (every import
statement, including those inside functions), so a change that breaks one fails here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "rules":  # installed as onnxrep.rules
        parts = ["onnxrep", "rules"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import graph` imports a module
    return out


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


GRAPH = {_module_name(p): _imports(p) for p in _files("onnxrep", "rules")}


def _offenders(sources, forbidden) -> list[str]:
    bad = []
    for mod, deps in GRAPH.items():
        if not any(mod == s or mod.startswith(s + ".") for s in sources):
            continue
        for dep in deps:
            if any(dep == f or dep.startswith(f + ".") for f in forbidden):
                bad.append(f"{mod} imports {dep}")
    return sorted(bad)


def test_graph_is_not_empty():
    """The checks below are about something: the walk found the package and its rules."""
    assert "onnxrep.kernels" in GRAPH and "onnxrep.engine" in GRAPH
    assert any(m.startswith("onnxrep.rules.") for m in GRAPH)


def test_kernels_are_pure_numpy():
    allowed_roots = {"numpy", "math", "dataclasses", "functools", "itertools", "typing", "__future__"}
    bad = [d for d in GRAPH["onnxrep.kernels"] if d.split(".")[0] not in allowed_roots]
    assert not bad, bad


def test_library_never_imports_torch_models_tools_or_tests():
    assert not _offenders(["onnxrep"], ["torch", "models", "tools", "tests", "torchvision", "timm"])


def test_rules_never_import_the_cli_pipeline_or_bench():
    assert not _offenders(["onnxrep.rules"], ["onnxrep.cli", "onnxrep.optimizer", "onnxrep.bench",
                                              "onnxrep.verify", "onnxrep.io"])


def test_engine_knows_rules_only_through_the_registry():
    deps = {d for m, ds in GRAPH.items() if m == "onnxrep.engine" for d in ds}
    rule_modules = {d for d in deps if d.startswith("onnxrep.rules.") and d != "onnxrep.rules.REGISTRY"}
    assert not rule_modules, rule_modules


def test_graph_helpers_do_not_import_the_engine():
    """linear/graph/weights/patterns/kernels are what rules build with; the engine drives rules."""
    assert not _offenders(["onnxrep.linear", "onnxrep.graph", "onnxrep.weights", "onnxrep.patterns",
                           "onnxrep.kernels", "onnxrep.rewrite"], ["onnxrep.engine", "onnxrep.rules"])


def test_bench_does_not_depend_on_the_rules():
    assert not _offenders(["onnxrep.bench", "onnxrep.bench_worker", "onnxrep.bench_metrics"],
                          ["onnxrep.rules", "onnxrep.engine", "onnxrep.linear", "onnxrep.kernels",
                           "onnxrep.optimizer"])


@pytest.mark.parametrize("module, heavy", [
    ("onnxrep.kernels", ["onnxrep.optimizer", "onnxrep.engine", "onnx_graphsurgeon", "onnxruntime"]),
    ("onnxrep.shapes", ["onnxrep.optimizer", "onnx", "numpy"]),
])
def test_leaf_modules_are_cheap_to_import(module, heavy):
    """Importing a leaf module does not drag in the pipeline (onnxrep/__init__ is lazy)."""
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"
