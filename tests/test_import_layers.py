"""The layers point one way: ``benchmarks`` → ``jaxpaged`` → ``models`` → ``pallas_kernels``, and no
module takes part in an import cycle.

Every import statement of every module is read with ``ast`` — top level, inside functions, under
``if``/``try`` alike — so a function-local import cannot hide an upward edge or a cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("pallas_kernels", "models", "jaxpaged", "benchmarks")  # lowest first


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file under the layered packages."""
    mods = {}
    for pkg in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            rel = os.path.relpath(dirpath, ROOT).split(os.sep)
            for f in sorted(filenames):
                if f.endswith(".py"):
                    parts = rel if f == "__init__.py" else rel + [f[:-3]]
                    mods[".".join(parts)] = os.path.join(dirpath, f)
    return mods


def _resolve(name: str, mods: dict[str, str]) -> str | None:
    """The repository module an import of ``name`` loads (its longest prefix that is a module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in mods:
            return cand
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules its import statements name (all of them, nested included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # ``from pkg import sub`` loads pkg.sub when that is a module, else pkg itself.
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, mods)
                if target is not None and target != mod:
                    edges.add(target)
        graph[mod] = edges
    return graph


def _layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[0])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_checker_sees_nested_and_relative_imports(tmp_path):
    """The checker itself: a function-local upward import and a cycle through one are reported."""
    graph = {
        "pallas_kernels.a": {"pallas_kernels.b"},
        "pallas_kernels.b": {"pallas_kernels.a", "models.x"},
        "models.x": set(),
    }
    assert upward_imports(graph) == ["pallas_kernels.b -> models.x"]
    assert cycles(graph) == [["pallas_kernels.a", "pallas_kernels.b"]]
    src = "def f():\n    from jaxpaged.llm import LLM\n"
    assert isinstance(ast.parse(src).body[0].body[0], ast.ImportFrom)  # what ast.walk visits


def test_graph_covers_the_packages():
    graph = import_graph()
    assert "jaxpaged.model_runner" in graph and "models.llama" in graph and "pallas_kernels.attention_router" in graph
    assert "models.attention_metadata" in graph["jaxpaged.model_runner"]
    # A function-local import is an edge too (the engine's lazy imports of its parts).
    assert "jaxpaged.model_runner" in graph["jaxpaged.llm_engine"]


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_engine_args_import_stays_jax_free():
    """The server's CLI parses arguments before it pays for JAX: engine_args (and the backend list it
    validates against) import without it."""
    code = "import sys, jaxpaged.engine_args; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("pkg", LAYERS)
def test_every_layer_has_modules(pkg):
    assert any(m.split(".")[0] == pkg for m in import_graph())
