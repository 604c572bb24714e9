"""Secret hashing, one module for both sides: proxy passwords (RMS writes, the data plane checks)
and API/device/agent tokens (accounts, the API and the tunnel's device check).

Proxy passwords are 16 random characters from a CSPRNG (~95 bits), so a keyed hash is enough: the
store keeps HMAC-SHA256(key = "proxyorch:" + connectionId, msg = password) and never the password.
"""

from __future__ import annotations

import hashlib
import hmac


def hash_password(connection_id: str, password: str) -> bytes:
    """The digest the data plane stores for a credential."""
    key = b"proxyorch:" + str(connection_id).lower().encode()
    return hmac.new(key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def verify_password(stored: bytes, connection_id: str, password: str) -> bool:
    """Constant-time comparison of ``password`` against the stored digest."""
    return hmac.compare_digest(stored, hash_password(connection_id, password))


def hash_token(token: str) -> bytes:
    """SHA-256 of an API or device token (tokens are 256-bit random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).digest()
