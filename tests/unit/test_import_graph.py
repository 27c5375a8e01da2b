"""The import graph of clipsam: no cycles, no import from a lower layer to a higher one.

Read from the source (``ast``), function-level imports included (a cycle through a function is a
cycle a refactor can trip on); imports under ``if TYPE_CHECKING:`` are annotations only and an
import of a module's own parent package is implied by Python anyway, so neither counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clipsam"

#: modules every part may use; they import no other clipsam module except each other
FOUNDATION = {"clipsam.errors", "clipsam.io", "clipsam.inputs", "clipsam.settings", "clipsam.registry"}
#: never imported by the layers below them
APPLICATION = {
    "clipsam.pipeline",
    "clipsam.module",
    "clipsam.evaluation",
    "clipsam.checkpoints",
    "clipsam.model_config",
    "clipsam.api",
    "clipsam.export",
    "clipsam.onnx_export",
    "clipsam.watch",
    "clipsam.serve",
    "clipsam.loading",
    "clipsam.cli",
    "clipsam.lightning_cli",
    "clipsam.benchmark",
    "clipsam.runs",
    "clipsam.callbacks",
    "clipsam.data.cli",
}
#: shared helpers a method may import from its own package
METHOD_SHARED = {"clipsam.methods", "clipsam.methods.base", "clipsam.methods._openclip"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    own = {m for m in found if m in known}
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return own - ancestors - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers(graph: dict[str, set[str]]) -> None:
    wrong = []
    for name, deps in graph.items():
        for dep in deps:
            if name in FOUNDATION and dep not in FOUNDATION:
                wrong.append(f"{name} (foundation) imports {dep}")
            if name.startswith("clipsam.models") and dep.startswith(("clipsam.methods", "clipsam.refiners")):
                wrong.append(f"{name} (models) imports {dep}")
            below_app = name not in APPLICATION and name.startswith(("clipsam.models", "clipsam.methods", "clipsam.refiners", "clipsam.data", "clipsam.metrics"))
            if below_app and dep in APPLICATION:
                wrong.append(f"{name} imports the application layer {dep}")
            if name.startswith("clipsam.methods.") and dep.startswith("clipsam.methods") and dep not in METHOD_SHARED:
                wrong.append(f"method {name} imports another method {dep}")
            if name.startswith("clipsam.methods") and dep.startswith("clipsam.refiners"):
                wrong.append(f"method {name} imports refiner {dep}")
            if name.startswith("clipsam.refiners") and dep.startswith("clipsam.methods"):
                wrong.append(f"refiner {name} imports method {dep}")
    assert wrong == []


def test_the_lightning_module_names_no_method() -> None:
    """Glue asks the method; the method names live in the registries and the alias table."""
    text = (PACKAGE / "module.py").read_text()
    assert '"april_gan"' not in text
    assert len(text.splitlines()) < 300


def test_every_module_imports_in_a_fresh_process() -> None:
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in _modules() if not n.endswith("__main__")))
def test_each_module_imports_on_its_own(name: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
