"""The package's layering: no import cycles among the project's modules, and the core never imports the converter.

Imports are read from the source with `ast` (function-level imports included), so a lazy import cannot hide a cycle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("indexcache_jax", "pallas_kernels", "checkpoints_convert")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its source (`from pkg import submodule` counts as the
    submodule)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            # `from pkg import a, b` names the package only when some name is not a submodule of it.
            targets = submodules + ([module] if any(s not in known for s in submodules) else [])
        else:
            continue
        for target in targets:
            # The nearest project module that the import resolves to (a package's __init__ counts).
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                out.add(".".join(parts))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; iterative DFS with colours."""
    colour = {node: 0 for node in graph}
    for root in graph:
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_known_edges():
    graph = _graph()
    assert "indexcache_jax.model.config" in graph["indexcache_jax.model.model"]
    assert "indexcache_jax.checkpoint" in graph["checkpoints_convert.convert"]
    assert "pallas_kernels" in graph["indexcache_jax.inference.kernels"]


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("core", [m for m in _modules() if m.startswith("indexcache_jax")])
def test_core_never_imports_the_converter(core):
    graph = _graph()
    assert not any(dep.startswith("checkpoints_convert") for dep in graph[core]), graph[core]


def test_pallas_kernels_stand_alone():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("pallas_kernels"):
            assert all(dep.startswith("pallas_kernels") for dep in deps), (name, deps)


def test_folders_hold_the_layers():
    """model <- inference <- methods: the model definition imports neither the engine nor the methods."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("indexcache_jax.model"):
            bad = [d for d in deps if d.startswith(("indexcache_jax.methods", "indexcache_jax.checkpoint",
                                                    "indexcache_jax.cli", "indexcache_jax.inference.engine"))]
            assert not bad, (name, bad)
