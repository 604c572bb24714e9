"""Encryption at rest of RMS passwords: AES-256-GCM with a key from ``RMS_KEY`` or a key file."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12


def load_or_create_key(rms_key: str, data_dir: str) -> bytes:
    """The 32-byte key: base64 ``RMS_KEY`` if set, else ``DATA_DIR/rms.key`` (created 0600 once)."""
    if rms_key:
        key = base64.b64decode(rms_key)
        if len(key) != 32:
            raise ValueError("RMS_KEY must be 32 bytes, base64-encoded")
        return key
    path = Path(data_dir) / "rms.key"
    if path.exists():
        return base64.b64decode(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key).decode())
    return key


class PasswordBox:
    """Seals and opens connection passwords; the connection id is bound as associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, connection_id: str, password: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, password.encode(), connection_id.encode())

    def open(self, connection_id: str, blob: bytes) -> str:
        return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], connection_id.encode()).decode()
