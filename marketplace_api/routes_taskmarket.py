"""The agent task market of seed 003 at /v1: registers its routes, its error middleware and the
trace listener. See taskmarket_* modules for the routes and quality_gate for the scorer."""

from __future__ import annotations

from aiohttp import web

from . import idempotency, taskmarket_agents, taskmarket_stream, taskmarket_tasks, taskmarket_work
from .taskmarket_common import v1_errors


def setup(app: web.Application) -> None:
    """Add the /v1 surface to ``app`` (its middleware is scoped to /v1 paths)."""
    app.middlewares.append(v1_errors)
    idempotency.setup(app)
    taskmarket_work.setup(app)  # first: /v1/tasks/available before /v1/tasks/{id}
    taskmarket_agents.setup(app)
    taskmarket_tasks.setup(app)
    taskmarket_stream.setup(app)
