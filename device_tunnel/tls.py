"""TLS for the tunnel with the standard library only: contexts, certificate fingerprints, pin checks.

The node serves the tunnel port over TLS 1.3; the agent verifies the node either by a pinned
fingerprint (``sha256:`` + 64 lowercase hex digits of the SHA-256 of the DER certificate, what
``proxyorch admin tunnel-fingerprint`` prints) or by a CA file (then the host name or IP the agent
dials must match the certificate). Creating certificates is the node's business
(``proxyorch.tunnel_cert``); nothing here needs more than ``ssl`` and ``hashlib``, so the agent
distribution stays pure Python.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import ssl
from collections.abc import Callable

FINGERPRINT_PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Verifier = Callable[[asyncio.BaseTransport], None]


class TunnelTlsError(ConnectionError):
    """A TLS problem with a message that names the cause and the fix (the agent logs it and retries)."""


class PinMismatch(TunnelTlsError):
    """The node's certificate is not the pinned one."""


def fingerprint_der(der: bytes) -> str:
    """``sha256:<64 lowercase hex>`` of a DER certificate."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: str) -> str:
    """Fingerprint of the first certificate in a PEM text."""
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem[start:end]))


def parse_fingerprint(text: str) -> str:
    """Normalise a pin given by a person: ``sha256:HEX`` (case and ``:`` between bytes tolerated).

    Raises ValueError with the expected shape when it is not a SHA-256 fingerprint.
    """
    raw = text.strip()
    if not raw.lower().startswith(FINGERPRINT_PREFIX):
        raise ValueError(f"expected sha256:<64 hex digits> (from `proxyorch admin tunnel-fingerprint`), got {text!r}")
    digits = raw[len(FINGERPRINT_PREFIX):].replace(":", "").lower()
    if not _HEX64.match(digits):
        raise ValueError(f"expected sha256:<64 hex digits> (from `proxyorch admin tunnel-fingerprint`), got {text!r}")
    return FINGERPRINT_PREFIX + digits


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The node's context: TLS 1.3 at least, the given certificate chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_context(*, pin: str | None = None, ca_file: str | None = None) -> ssl.SSLContext:
    """The agent's context: with ``ca_file`` the chain and host name are checked by OpenSSL; with only
    ``pin`` the certificate is checked by :func:`pin_verifier` right after the handshake (before any
    tunnel byte is sent). One of the two is required: there is no unverified mode."""
    if not pin and not ca_file:
        raise ValueError("a TLS tunnel needs --server-fingerprint or --ca-file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # The pin is the trust anchor: chain and name are not what is checked, the exact certificate is.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_fingerprint(transport: asyncio.BaseTransport) -> str | None:
    """Fingerprint of the certificate the peer of a TLS transport presented (None if not TLS)."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    return fingerprint_der(der) if der else None


def pin_verifier(pin: str) -> Verifier:
    """A ``verify(transport)`` hook that raises :class:`PinMismatch` unless the node shows ``pin``."""
    expected = parse_fingerprint(pin)

    def verify(transport: asyncio.BaseTransport) -> None:
        got = peer_fingerprint(transport)
        if got is None:
            raise PinMismatch("the tunnel is not TLS but a fingerprint is pinned")
        if not hmac.compare_digest(got, expected):
            raise PinMismatch(
                f"node certificate {got} does not match --server-fingerprint {expected}; if the node's "
                f"certificate was rotated, run `proxyorch admin tunnel-fingerprint` on the node and pin the new "
                f"value")

    return verify


def explain_connect_error(exc: BaseException, *, tls: bool) -> str | None:
    """A log line naming the problem and the fix for a failed tunnel connect/handshake, or None when
    the error is an ordinary network failure (refused, unreachable, timeout)."""
    if isinstance(exc, TunnelTlsError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"node certificate not trusted: {exc.verify_message or exc}; check --ca-file and that the host "
                f"in --server matches the certificate, or pin it with --server-fingerprint")
    if isinstance(exc, ssl.SSLError):
        reason = (getattr(exc, "reason", None) or str(exc)).upper()
        if any(k in reason for k in ("WRONG_VERSION", "RECORD_LAYER", "PACKET_LENGTH", "UNKNOWN_PROTOCOL",
                                     "HTTP_REQUEST", "EOF", "UNEXPECTED")):
            return (f"TLS handshake failed ({exc}): the node does not speak TLS on this port; it may run with "
                    f"TUNNEL_TLS=0 (then run the agent with --plaintext, only where TLS is terminated in front "
                    f"of the node) or --server is not the node's tunnel port")
        if "VERSION" in reason or "PROTOCOL" in reason:
            return f"TLS handshake failed ({exc}): the node must offer TLS 1.3"
        return f"TLS handshake failed: {exc}"
    if not tls and "before WELCOME" in str(exc):
        return PLAINTEXT_CLOSED_HINT
    if tls and isinstance(exc, ConnectionResetError | BrokenPipeError):
        return ("the node dropped the connection during the TLS handshake: it probably runs with TUNNEL_TLS=0 "
                "(then run the agent with --plaintext, only where TLS is terminated in front of the node)")
    return None


PLAINTEXT_CLOSED_HINT = ("the node closed the tunnel before answering HELLO: with --plaintext this usually "
                         "means the node serves TLS on this port; drop --plaintext and pin it with "
                         "--server-fingerprint (from `proxyorch admin tunnel-fingerprint`)")
