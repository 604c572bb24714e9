"""Absolute-form HTTP forwarding (``GET http://host/path``), sans-I/O on top of h11.

A :class:`ForwardSession` owns one client connection. The caller feeds it bytes and end-of-stream
from the client and from the upstream connection, and carries out the actions it returns::

    NeedAuth(head)        check head.get("Proxy-Authorization"), then call auth_ok()
                          (or answer proxy_auth_required(...) and close the client itself)
    OpenUpstream(h, p)    open a stream to h:p, then call upstream_opened() or upstream_failed()
    SendUpstream / SendClient / CloseUpstream / CloseClient

Requests are rewritten to origin-form with hop-by-hop headers dropped and Host set from the URL;
h11 re-frames both directions (Content-Length, chunked, HEAD/204/304, close-delimited). One request
is in flight at a time; pipelined bytes wait (bounded) until the previous response has ended.
CONNECT is not handled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import h11

from proxy.http_connect.protocol import (
    HttpParseError,
    RequestHead,
    error_response,
    parse_absolute_url,
    strip_hop_by_hop,
)

__all__ = [
    "Action",
    "CloseClient",
    "CloseUpstream",
    "ForwardSession",
    "NeedAuth",
    "OpenUpstream",
    "SendClient",
    "SendUpstream",
]


@dataclass(frozen=True, slots=True)
class NeedAuth:
    head: RequestHead


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    pass


@dataclass(frozen=True, slots=True)
class CloseClient:
    pass


Action = NeedAuth | OpenUpstream | SendUpstream | SendClient | CloseUpstream | CloseClient


class _State(Enum):
    IDLE = "idle"  # waiting for a request head
    AUTH = "auth"  # NeedAuth emitted
    CONNECTING = "connecting"  # OpenUpstream emitted
    ACTIVE = "active"  # request and response flowing
    CLOSED = "closed"


def _decode_headers(event: h11.Request | h11.Response | h11.InformationalResponse) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers.raw_items()]


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _authority(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == 80 else f"{host}:{port}"


class ForwardSession:
    """One client connection doing absolute-form requests. Bytes in, actions out; never raises on input."""

    def __init__(self, max_head_bytes: int = 16384, max_buffered: int = 1 << 20) -> None:
        self._client = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._upstream: h11.Connection | None = None
        self._upstream_key: tuple[str, int] | None = None  # target of the open (or opening) upstream
        self._state = _State.IDLE
        self._max_buffered = max_buffered
        self._inbox = bytearray()  # client bytes not yet handed to h11
        self._client_eof = False
        self._eof_fed = False
        self._target: tuple[str, int] = ("", 0)
        self._request: h11.Request | None = None
        self._request_done = False
        self._response_started = False

    @property
    def client_backlog(self) -> int:
        """Client bytes held until the session can use them; pause reading the client when this is high."""
        return len(self._inbox)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    # -- client side -------------------------------------------------------------------------------

    def client_data(self, data: bytes) -> list[Action]:
        """Bytes from the client."""
        if self._state is _State.CLOSED:
            return []
        self._inbox += data
        actions = self._pump()
        if self._state is not _State.CLOSED and len(self._inbox) > self._max_buffered:
            actions += self._fail(413, "too much data sent ahead of the proxy")
        return actions

    def client_eof(self) -> list[Action]:
        """The client closed its sending side."""
        if self._state is _State.CLOSED:
            return []
        self._client_eof = True
        return self._pump()

    def auth_ok(self) -> list[Action]:
        """The request announced by the last NeedAuth is authorised: forward it."""
        if self._state is _State.CLOSED:
            return []
        self._expect(_State.AUTH, "auth_ok")
        upstream = self._upstream
        if (
            upstream is not None
            and self._upstream_key is not None
            and self._upstream_key[0].lower() == self._target[0].lower()
            and self._upstream_key[1] == self._target[1]
            and upstream.our_state is h11.IDLE
            and upstream.their_state is h11.IDLE
        ):
            return self._start_exchange()
        actions: list[Action] = []
        if self._upstream_key is not None:
            actions.append(CloseUpstream())
        self._upstream = None
        self._upstream_key = self._target
        self._state = _State.CONNECTING
        actions.append(OpenUpstream(*self._target))
        return actions

    # -- upstream side -----------------------------------------------------------------------------

    def upstream_opened(self) -> list[Action]:
        """The stream asked for by OpenUpstream is open."""
        if self._state is _State.CLOSED:
            return [CloseUpstream()]
        self._expect(_State.CONNECTING, "upstream_opened")
        self._upstream = h11.Connection(h11.CLIENT)
        return self._start_exchange()

    def upstream_failed(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> list[Action]:
        """The upstream could not be opened (or the target is refused): answer ``status`` (with
        ``headers``, e.g. ``Retry-After``) and close."""
        if self._state is _State.CLOSED:
            return []
        self._upstream = None
        self._upstream_key = None
        return self._fail(status, reason, headers)

    def upstream_data(self, data: bytes) -> list[Action]:
        """Bytes from the upstream."""
        if self._state is _State.CLOSED or self._upstream is None:
            return []
        if self._state is not _State.ACTIVE:
            return self._drop_upstream()  # nothing was asked: a desynchronised upstream is not reused
        try:
            self._upstream.receive_data(data)
        except h11.ProtocolError as exc:
            return self._fail(502, f"invalid response from upstream: {exc}")
        return self._pump_upstream()

    def upstream_eof(self) -> list[Action]:
        """The upstream closed its sending side."""
        if self._state is _State.CLOSED or self._upstream is None:
            return []
        if self._state is not _State.ACTIVE:
            return self._drop_upstream()
        try:
            self._upstream.receive_data(b"")
        except h11.ProtocolError as exc:
            return self._fail(502, f"invalid response from upstream: {exc}")
        return self._pump_upstream()

    # -- internals ---------------------------------------------------------------------------------

    def _expect(self, state: _State, method: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"{method}() called in state {self._state.value}")

    def _next_client_event(self) -> object:
        event = self._client.next_event()
        if event is h11.NEED_DATA and (self._inbox or (self._client_eof and not self._eof_fed)):
            if self._inbox:
                self._client.receive_data(bytes(self._inbox))
                self._inbox.clear()
            if self._client_eof and not self._eof_fed:
                self._eof_fed = True
                self._client.receive_data(b"")
            event = self._client.next_event()
        return event

    def _pump(self) -> list[Action]:
        """Process client input as far as the current state allows."""
        actions: list[Action] = []
        while self._state is _State.IDLE or (self._state is _State.ACTIVE and not self._request_done):
            try:
                event = self._next_client_event()
            except h11.RemoteProtocolError as exc:
                return actions + self._fail(exc.error_status_hint, f"malformed request: {exc}")
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                return actions + self._close_all()
            if self._state is _State.IDLE:
                if not isinstance(event, h11.Request):  # cannot happen: h11 yields a Request first
                    return actions + self._fail(400, "unexpected request event")
                actions += self._on_request(event)
                continue
            assert self._upstream is not None
            try:
                if isinstance(event, h11.Data):
                    data = self._upstream.send(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    data = self._upstream.send(h11.EndOfMessage())
                    self._request_done = True
                else:
                    continue
                if data:
                    actions.append(SendUpstream(data))
            except h11.ProtocolError as exc:
                return actions + self._fail(502, f"cannot forward request: {exc}")
        return actions

    def _on_request(self, request: h11.Request) -> list[Action]:
        headers = _decode_headers(request)
        head = RequestHead(
            method=request.method.decode("ascii"),
            target=request.target.decode("latin-1"),
            version="HTTP/" + request.http_version.decode("ascii"),
            headers=headers,
        )
        if head.method == "CONNECT":
            return self._fail(405, "CONNECT is not handled by the forwarder")
        if not head.target.lower().startswith("http://"):
            return self._fail(400, "request target must be an absolute http:// URL (this is a proxy)")
        try:
            host, port, path = parse_absolute_url(head.target)
            forwarded = [(n, v) for n, v in strip_hop_by_hop(headers) if n.lower() != "host"]
            self._request = h11.Request(
                method=request.method,
                target=path.encode("latin-1"),
                headers=[(b"Host", _authority(host, port).encode("latin-1")), *_encode_headers(forwarded)],
            )
        except HttpParseError as exc:
            return self._fail(exc.status, exc.reason)
        except h11.ProtocolError as exc:
            return self._fail(400, f"cannot forward request: {exc}")
        self._target = (host, port)
        self._state = _State.AUTH
        return [NeedAuth(head)]

    def _start_exchange(self) -> list[Action]:
        assert self._upstream is not None and self._request is not None
        self._state = _State.ACTIVE
        self._request_done = False
        self._response_started = False
        try:
            actions: list[Action] = [SendUpstream(self._upstream.send(self._request))]
        except h11.ProtocolError as exc:
            return self._fail(400, f"cannot forward request: {exc}")
        return actions + self._pump()

    def _pump_upstream(self) -> list[Action]:
        assert self._upstream is not None
        actions: list[Action] = []
        try:
            while True:
                event = self._upstream.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return actions
                if isinstance(event, h11.InformationalResponse):
                    if self._client.their_http_version != b"1.0":
                        informational = h11.InformationalResponse(
                            status_code=event.status_code,
                            headers=_encode_headers(strip_hop_by_hop(_decode_headers(event))),
                            reason=event.reason,
                        )
                        actions.append(SendClient(self._client.send(informational)))
                elif isinstance(event, h11.Response):
                    response = h11.Response(
                        status_code=event.status_code,
                        headers=_encode_headers(strip_hop_by_hop(_decode_headers(event))),
                        reason=event.reason,
                    )
                    self._response_started = True
                    actions.append(SendClient(self._client.send(response)))
                elif isinstance(event, h11.Data):
                    actions.append(SendClient(self._client.send(h11.Data(data=event.data))))
                elif isinstance(event, h11.EndOfMessage):  # trailers are dropped (Trailer is hop-by-hop)
                    data = self._client.send(h11.EndOfMessage())
                    if data:
                        actions.append(SendClient(data))
                    return actions + self._finish_exchange()
        except h11.ProtocolError as exc:
            return actions + self._fail(502, f"invalid response from upstream: {exc}")

    def _finish_exchange(self) -> list[Action]:
        """The response has been relayed: recycle both connections if possible, else close."""
        client, upstream = self._client, self._upstream
        assert upstream is not None
        if not (self._request_done and client.our_state is h11.DONE and client.their_state is h11.DONE):
            return self._close_all()
        client.start_next_cycle()
        actions: list[Action] = []
        if upstream.our_state is h11.DONE and upstream.their_state is h11.DONE:
            upstream.start_next_cycle()
        else:
            actions += self._drop_upstream()
        self._state = _State.IDLE
        self._request = None
        self._response_started = False
        return actions + self._pump()

    def _drop_upstream(self) -> list[Action]:
        self._upstream = None
        self._upstream_key = None
        return [CloseUpstream()]

    def _fail(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> list[Action]:
        actions: list[Action] = []
        if not self._response_started:
            actions.append(SendClient(error_response(status, reason, headers)))
        return actions + self._close_all()

    def _close_all(self) -> list[Action]:
        actions: list[Action] = []
        if self._upstream_key is not None:
            actions.append(CloseUpstream())
        actions.append(CloseClient())
        self._state = _State.CLOSED
        self._upstream = None
        self._upstream_key = None
        self._inbox.clear()
        return actions
