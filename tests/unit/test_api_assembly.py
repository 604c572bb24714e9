"""How the API is put together: one way, checked on the source (ast) and on pure pieces."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from marketplace_api.bodies import MAX_JSON_DEPTH, json_depth_exceeds, parse_json_object
from marketplace_api.errors import ApiError
from marketplace_api.ratelimit import RateLimiter
from proxyorch.tasks import TaskSet

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "marketplace_api"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in API.glob("*.py")}


def test_no_route_module_imports_app() -> None:
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level == 1 and target == "app" or target == "marketplace_api.app":
                    pytest.fail(f"marketplace_api/{name}.py imports app.py")
                if node.level == 1 and target == "" and any(a.name == "app" for a in node.names):
                    pytest.fail(f"marketplace_api/{name}.py imports app.py")


def test_no_import_error_is_swallowed() -> None:
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                assert not names & {"ImportError", "ModuleNotFoundError"}, f"{name}.py swallows an ImportError"


def test_the_whole_node_is_reached_only_through_typed_keys() -> None:
    """``NODE`` (the untyped node) is defined in context.py and re-exported by app.py; no route uses it."""
    for name, tree in _modules().items():
        if name in ("context", "app"):
            continue
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "NODE" not in used, f"{name}.py reads the whole node"


def test_every_route_module_registers_one_way() -> None:
    from marketplace_api import app

    for module in app.ROUTE_MODULES:
        assert hasattr(module, "routes") or callable(getattr(module, "setup", None)), module.__name__


def test_json_depth_limit() -> None:
    def nested(levels: int) -> object:
        value: object = 1
        for _ in range(levels):
            value = [value]
        return value

    assert not json_depth_exceeds(nested(MAX_JSON_DEPTH))
    assert json_depth_exceeds(nested(MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds({"a": [{"b": 1}] * 1000})
    assert list(parse_json_object(b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}")) == ["a"]   # 64 levels
    with pytest.raises(ApiError) as err:
        parse_json_object(b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}")
    assert err.value.status == 400


def test_rate_limiter_allows_the_burst_then_the_rate() -> None:
    rl = RateLimiter(rate=2.0, burst=4)
    assert [rl.acquire("k", 0.0) for _ in range(4)] == [0.0] * 4
    assert rl.acquire("k", 0.0) == pytest.approx(0.5)      # next token in 1/rate seconds
    assert rl.acquire("other", 0.0) == 0.0                   # keys are independent
    assert rl.acquire("k", 0.5) == 0.0                       # refilled
    assert rl.acquire("k", 0.5) > 0
    assert rl.acquire("k", 100.0) == 0.0                     # never more than the burst banked
    assert [rl.acquire("k", 100.0) for _ in range(4)].count(0.0) == 3


def test_rate_limiter_memory_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_keys=100)
    for i in range(10_000):
        rl.acquire(f"key{i}", float(i))
    assert len(rl) == 100


async def test_task_set_owns_and_cancels_its_tasks() -> None:
    tasks = TaskSet("test")
    started = asyncio.Event()
    cancelled = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def quick() -> int:
        return 1

    tasks.spawn(forever())
    done = tasks.spawn(quick())
    await started.wait()
    await done
    await asyncio.sleep(0)           # done callbacks run on the next loop iteration
    assert len(tasks) == 1           # finished tasks are let go, running ones are held
    await tasks.close()
    assert cancelled == [True] and len(tasks) == 0
    with pytest.raises(RuntimeError):
        tasks.spawn(quick())
