"""Mutual authentication of a node-to-node relay link, sans-I/O (bytes in, bytes out, no clock).

Before the tunnel protocol starts on a relay link the two nodes prove they share ``CLUSTER_SECRET``
with an HMAC-SHA256 challenge in three JSON lines (each at most ``MAX_LINE`` bytes):

1. listener -> dialer: ``{"relay": 1, "node": <listener>, "nonce": <32 hex bytes>}``
2. dialer -> listener: ``{"node": <dialer>, "nonce": <nd>, "proof": HMAC(secret, "dial|nl|nd|dialer")}``
3. listener -> dialer: ``{"ok": true, "proof": HMAC(secret, "listen|nd|nl|listener")}`` or
   ``{"ok": false}`` (then the listener closes).

The secret never crosses the wire and each proof is bound to both nonces, so a recorded exchange
cannot be replayed. After line 3 the bytes that follow are tunnel frames: the listener plays the
device role (sends HELLO), the dialer the node role (opens streams).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

MAX_LINE = 1024
VERSION = 1


class RelayAuthError(Exception):
    """The peer does not know the secret or does not speak the relay handshake."""


def _proof(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _line(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class _LineReader:
    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> dict | None:
        self.buf += data
        nl = self.buf.find(b"\n")
        if nl < 0:
            if len(self.buf) > MAX_LINE:
                raise RelayAuthError("handshake line too long")
            return None
        if nl > MAX_LINE:
            raise RelayAuthError("handshake line too long")
        raw, rest = bytes(self.buf[:nl]), bytes(self.buf[nl + 1:])
        self.buf = bytearray(rest)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RelayAuthError("handshake line is not JSON") from None
        if not isinstance(body, dict):
            raise RelayAuthError("handshake line is not a JSON object")
        return body

    def rest(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class ListenerAuth:
    """The accepting node. ``start()`` gives line 1; ``receive(data)`` returns (done, out, rest)."""

    def __init__(self, node: str, secret: str, nonce: str | None = None) -> None:
        self.node, self.secret = node, secret
        self.nonce = nonce or secrets.token_hex(16)
        self.peer = ""
        self.done = False
        self._reader = _LineReader()

    def start(self) -> bytes:
        return _line({"relay": VERSION, "node": self.node, "nonce": self.nonce})

    def receive(self, data: bytes) -> tuple[bool, bytes, bytes]:
        """Feed bytes; ``(True, line3, leftover)`` once the dialer proved the secret. Raises
        RelayAuthError for a wrong proof or garbage (send ``refusal()``, then close)."""
        if self.done:
            return True, b"", data
        body = self._reader.feed(data)
        if body is None:
            return False, b"", b""
        peer, nonce, proof = body.get("node"), body.get("nonce"), body.get("proof")
        if not (isinstance(peer, str) and isinstance(nonce, str) and isinstance(proof, str)) or not peer:
            raise RelayAuthError("malformed relay handshake")
        if not self.secret or not hmac.compare_digest(proof, _proof(self.secret, "dial", self.nonce, nonce, peer)):
            raise RelayAuthError(f"relay peer {peer[:64]!r} did not prove the cluster secret")
        self.peer, self.done = peer, True
        return True, _line({"ok": True, "proof": _proof(self.secret, "listen", nonce, self.nonce, self.node)}), \
            self._reader.rest()

    @staticmethod
    def refusal() -> bytes:
        return _line({"ok": False})


class DialerAuth:
    """The connecting node. ``receive(data)`` returns (done, out, rest); out is line 2 once."""

    def __init__(self, node: str, secret: str, nonce: str | None = None) -> None:
        self.node, self.secret = node, secret
        self.nonce = nonce or secrets.token_hex(16)
        self.peer = ""
        self.done = False
        self._peer_nonce: str | None = None
        self._reader = _LineReader()

    def receive(self, data: bytes) -> tuple[bool, bytes, bytes]:
        """Feed bytes; raises RelayAuthError when the listener refuses or cannot prove the secret."""
        if self.done:
            return True, b"", data
        out = b""
        while True:
            body = self._reader.feed(data)
            data = b""
            if body is None:
                return False, out, b""
            if self._peer_nonce is None:
                peer, nonce = body.get("node"), body.get("nonce")
                if body.get("relay") != VERSION or not isinstance(peer, str) or not isinstance(nonce, str):
                    raise RelayAuthError("not a relay listener")
                self.peer, self._peer_nonce = peer, nonce
                out += _line({"node": self.node, "nonce": self.nonce,
                              "proof": _proof(self.secret, "dial", nonce, self.nonce, self.node)})
                continue
            if body.get("ok") is not True:
                raise RelayAuthError(f"relay peer {self.peer!r} refused this node (cluster secret differs)")
            proof = body.get("proof")
            expected = _proof(self.secret, "listen", self.nonce, self._peer_nonce, self.peer)
            if not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
                raise RelayAuthError(f"relay peer {self.peer!r} did not prove the cluster secret")
            self.done = True
            return True, out, self._reader.rest()
