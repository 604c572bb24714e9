"""The shape of the codebase: no import cycles, and the package boundaries the design fixes.

The import graph is built from the source with ``ast`` (every ``import`` statement, also the ones
inside functions; ``if TYPE_CHECKING:`` blocks are left out because they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "proxyorch", "device_tunnel", "rms", "marketplace_api")
DATA_PLANE = ("proxy", "device_tunnel")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if ".venv" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _project(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package it is in), if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = _resolve(module, path.name == "__init__.py", node)
                names = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for name in names:
                target = _project(name)
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


GRAPH = import_graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...],
                allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for module, targets in sorted(GRAPH.items()):
        if module.split(".")[0] not in sources:
            continue
        for target in sorted(targets):
            if target.split(".")[0] in forbidden and target not in allowed:
                bad.append(f"{module} -> {target}")
    return bad


def test_the_graph_sees_the_project() -> None:
    assert "proxy.server" in GRAPH and "proxy.session_core" in GRAPH["proxy.server"]
    assert "proxy.http_forward" in GRAPH["proxy.server"]
    assert "device_tunnel.replies" in GRAPH["proxy.session_core"]


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_projects_modules() -> None:
    """Route modules never import marketplace_api.app (it imports them): no edge is set aside."""
    assert _cycles(GRAPH) == []


def test_data_plane_imports_nothing_from_the_api() -> None:
    assert _violations(DATA_PLANE, ("marketplace_api",)) == []


def test_rms_does_not_import_proxy_internals() -> None:
    assert _violations(("rms",), ("proxy",)) == []


def test_device_tunnel_is_its_own_distribution() -> None:
    assert _violations(("device_tunnel",), ("proxy", "rms", "marketplace_api", "proxyorch")) == []


def test_http_forwarder_does_not_import_the_listener() -> None:
    assert "proxy.server" not in GRAPH["proxy.http_forward"]


SANS_IO = ["proxy.session_core", "proxy.session_policy", "proxy.session_actions", "proxy.socks5.protocol",
           "proxy.http_connect.forward", "device_tunnel.connection"]
CLOCK_CALLS = {"time", "monotonic", "monotonic_ns", "perf_counter", "time_ns", "now", "utcnow", "today", "sleep"}


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_cores_read_no_clock(module: str) -> None:
    if module not in MODULES:
        pytest.skip(f"{module} does not exist yet (the tunnel core is being written)")
    tree = ast.parse(MODULES[module].read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name in ("time", "asyncio", "socket") for a in node.names):
            bad.append(f"line {node.lineno}: import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "asyncio", "socket"):
            bad.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCK_CALLS:
            bad.append(f"line {node.lineno}: .{node.func.attr}()")
    assert bad == []


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_cores_import_neither_asyncio_nor_socket(module: str) -> None:
    if module not in MODULES:
        pytest.skip(f"{module} does not exist yet (the tunnel core is being written)")
    code = (f"import sys; import {module}; "
            "print(' '.join(m for m in ('asyncio', 'socket', 'selectors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
