"""Which exceptions mean "PostgreSQL is away" (a 503 with Retry-After) and which are bugs (a 500)."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import orjson
import pytest

from marketplace_api import store_errors
from marketplace_api.store_errors import is_store_unavailable


def _connect_error(url: str) -> BaseException:
    async def attempt() -> BaseException:
        try:
            await asyncpg.connect(url, timeout=5)
        except BaseException as exc:  # noqa: BLE001 - the very exception the pool would raise
            return exc
        raise AssertionError("connected to nothing")

    return asyncio.run(attempt())


def test_refused_tcp_connect_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        exc = _connect_error(f"postgresql://u@127.0.0.1:{port}/db")
    assert isinstance(exc, OSError) and is_store_unavailable(exc)


def test_missing_unix_socket_is_unavailable(tmp_path) -> None:
    exc = _connect_error(f"postgresql://u@/db?host={tmp_path}")  # the server stopped: no socket file
    assert isinstance(exc, OSError) and is_store_unavailable(exc)


@pytest.mark.parametrize("exc", [
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.exceptions._base.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
])
def test_store_outages(exc: BaseException) -> None:
    assert is_store_unavailable(exc)


@pytest.mark.parametrize("exc", [
    asyncpg.DataError("invalid input"), asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    ValueError("bug"), KeyError("bug"),
])
def test_bugs_and_bad_input_are_not_outages(exc: BaseException) -> None:
    assert not is_store_unavailable(exc)


def test_os_error_outside_asyncpg_is_not_an_outage(tmp_path) -> None:
    with pytest.raises(OSError) as info:
        open(tmp_path / "missing")  # noqa: SIM115
    assert not is_store_unavailable(info.value)


def test_an_error_raised_while_handling_an_outage_is_an_outage() -> None:
    try:
        try:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        except asyncpg.PostgresError:
            raise asyncpg.InterfaceError("cannot rollback; the transaction is in error state")  # noqa: B904
    except asyncpg.InterfaceError as exc:
        assert is_store_unavailable(exc)
    try:
        raise RuntimeError("wrapped") from asyncpg.AdminShutdownError("terminating connection")
    except RuntimeError as exc:
        assert is_store_unavailable(exc)


@pytest.mark.parametrize("body", [store_errors.API_V2_BODY, store_errors.ESCROW_BODY, store_errors.V1_BODY])
def test_response_is_503_with_retry_after_in_the_given_shape(body: dict) -> None:
    r = store_errors.response(body)
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1 and r.content_type == "application/json"
    assert orjson.loads(r.body) == body
