"""The house rules: every module sits in a layer, imports only its own layer or lower ones
(inside functions too), no module imports itself in a circle, and none grows past 500 lines.

The layer order is the one docs/architecture.md draws.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rnnkit"
MAX_LINES = 500

# lowest first; a module belongs to the first layer with a prefix that names it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config and utilities", ("rnnkit.version", "rnnkit.config", "rnnkit.hardware", "rnnkit.metrics",
                              "rnnkit.spans", "rnnkit.processes", "rnnkit.plots")),
    ("data", ("rnnkit.data",)),
    ("models", ("rnnkit.models",)),
    ("decoding", ("rnnkit.decoding",)),
    ("training", ("rnnkit.training", "rnnkit.gradient_flow")),
    ("tasks", ("rnnkit.tasks", "rnnkit.transfer", "rnnkit.runtime")),
    ("API", ("rnnkit.api", "rnnkit.runs", "rnnkit.reports")),
    ("serve, export and tune", ("rnnkit.serve", "rnnkit.export", "rnnkit.tune")),
    ("CLI", ("rnnkit.cli", "rnnkit.__main__")),
]
PACKAGE_INIT_LAYER = "API"     # ``import rnnkit`` runs rnnkit/__init__.py, which offers rnnkit.load


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    if module == "rnnkit":
        return next(i for i, (name, _) in enumerate(LAYERS) if name == PACKAGE_INIT_LAYER)
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise LookupError(module)


class _Imports(ast.NodeVisitor):
    """Every rnnkit module a module imports, at the top or inside functions, but not under
    ``if TYPE_CHECKING:``. ``from pkg import name`` counts as importing ``pkg.name`` when that
    is a module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package, self.found = module, is_package, set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found |= {a.name for a in node.names if a.name.split(".")[0] == "rnnkit"}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            here = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        if base.split(".")[0] != "rnnkit":
            return
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self.found.add(full if full in MODULES else base)


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
    return visitor.found - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = []
    for m in MODULES:
        try:
            layer_of(m)
        except LookupError:
            missing.append(m)
    assert not missing, f"place these modules in a layer (tests/test_architecture.py, docs/architecture.md): {missing}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in GRAPH.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def _cycle() -> list[str] | None:
    """One import circle among the modules, or None."""
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH.get(m, ())):
            # a package's __init__ re-exporting its own modules is not a circle of theirs
            if d not in GRAPH or (m.startswith(d + ".")):
                continue
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in GRAPH:
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    circle = _cycle()
    assert circle is None, " -> ".join(circle)


def test_the_checker_sees_an_upward_import_and_a_circle(monkeypatch):
    """The two checks above would fail on the kinds of import they are there to stop."""
    monkeypatch.setitem(GRAPH, "rnnkit.data.store", GRAPH["rnnkit.data.store"] | {"rnnkit.training.run_lock"})
    with pytest.raises(AssertionError, match="rnnkit.data.store .data. imports rnnkit.training.run_lock"):
        test_no_module_imports_a_higher_layer()
    monkeypatch.setitem(GRAPH, "rnnkit.runs", GRAPH["rnnkit.runs"] | {"rnnkit.api"})
    monkeypatch.setitem(GRAPH, "rnnkit.api", GRAPH["rnnkit.api"] | {"rnnkit.runs"})
    assert _cycle() is not None


def test_function_level_imports_are_read():
    visitor = _Imports("rnnkit.x", False)
    visitor.visit(ast.parse("def f():\n    from rnnkit.api import load\n"
                            "if TYPE_CHECKING:\n    from rnnkit.cli import app\n"))
    assert visitor.found == {"rnnkit.api"}


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_every_registered_task_names_what_it_plugs_in():
    """A task is registered once (``rnnkit.config.tasks``); every name there resolves, and the
    places that used to list tasks read the registry."""
    from rnnkit.api import Model
    from rnnkit.config.tasks import TASKS, exportable_tasks, resolve
    from rnnkit.runtime.base import Exported
    from rnnkit.runtime.manifest import EXPORTABLE
    from rnnkit.serve.app import ROUTES
    from rnnkit.tasks import task_module

    for name, task in TASKS.items():
        module = task_module(name)
        assert callable(module.build) and module.DataConfig is task.data and module.ModelConfig is task.model, name
        api = resolve(task.api)
        assert issubclass(api, Model), name
        assert (task.runtime is None) == (task.exporter is None), f"{name}: an export needs both"
        if task.runtime:
            runtime = resolve(task.runtime)
            assert issubclass(runtime, Exported) and callable(resolve(task.exporter)), name
        if task.route:
            assert name in ROUTES[task.route] and callable(getattr(api, {"generate": "generate", "translate":
                                                                          "translate", "predict": "predict",
                                                                          "forecast": "forecast"}[task.route]))
        if task.streams:
            # both backends of a streaming task open a book of streams
            built = [c for c in vars(module).values() if isinstance(c, type) and hasattr(c, "streams")]
            assert built and (not task.runtime or hasattr(resolve(task.runtime), "streams")), name
        else:
            assert task.no_streams, f"{name}: say in one line why it has no streams"
    assert EXPORTABLE == exportable_tasks() and set(EXPORTABLE) == {n for n, t in TASKS.items() if t.runtime}
    assert {n for names in ROUTES.values() for n in names} == {n for n, t in TASKS.items() if t.route}
