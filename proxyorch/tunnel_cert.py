"""The node's tunnel certificate: ``TUNNEL_TLS_CERT``/``TUNNEL_TLS_KEY``, or a self-signed one created
once under ``DATA_DIR/tunnel-tls/`` (key file 0600) and reused across restarts.

Creating a certificate needs ``cryptography``, a server dependency: this module is node-side so the
agent distribution (``device_tunnel``) never imports it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_tunnel.tls import fingerprint_pem, server_context

from .config import Settings

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


class TunnelCertError(RuntimeError):
    """The configured certificate cannot be used (missing key, unreadable file, bad PEM)."""


@dataclass(frozen=True)
class TunnelCert:
    cert_file: str
    key_file: str
    fingerprint: str
    created: bool = False

    def context(self) -> ssl.SSLContext:
        """The TLS 1.3 server context for the tunnel listener."""
        return server_context(self.cert_file, self.key_file)


def cert_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "tunnel-tls"


def _names(settings: Settings) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    dns = ["localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.ip_address("127.0.0.1"),
                                                                ipaddress.ip_address("::1")]
    hosts = [settings.node_name, settings.bind_host]
    if settings.public_tunnel_addr:
        hosts.append(settings.public_tunnel_addr.rpartition(":")[0].strip("[]") or settings.public_tunnel_addr)
    for h in hosts:
        if not h or h in ("0.0.0.0", "::"):
            continue
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            if h not in dns:
                dns.append(h)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def _create(folder: Path, settings: Settings) -> None:
    """Write a fresh key + self-signed certificate into ``folder`` (which must not exist yet)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"proxyorch tunnel {settings.node_name}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    dns, ips = _names(settings)
    san = x509.SubjectAlternativeName([*(x509.DNSName(d) for d in dns), *(x509.IPAddress(i) for i in ips)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tunnel-tls-", dir=parent))  # 0700
    try:
        fd = os.open(tmp / KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (tmp / CERT_NAME).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        try:
            os.rename(tmp, folder)  # atomic; fails when another process created it first
        except OSError:
            if not (folder / CERT_NAME).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_create(settings: Settings) -> TunnelCert:
    """The certificate the tunnel port serves (created on first use when none is configured)."""
    if settings.tunnel_tls_cert or settings.tunnel_tls_key:
        if not (settings.tunnel_tls_cert and settings.tunnel_tls_key):
            raise TunnelCertError("TUNNEL_TLS_CERT and TUNNEL_TLS_KEY must be set together")
        cert_file, key_file, created = settings.tunnel_tls_cert, settings.tunnel_tls_key, False
    else:
        folder = cert_dir(settings)
        created = not (folder / CERT_NAME).exists()
        if created:
            _create(folder, settings)
        cert_file, key_file = str(folder / CERT_NAME), str(folder / KEY_NAME)
    try:
        pem = Path(cert_file).read_text()
        fingerprint = fingerprint_pem(pem)
        server_context(cert_file, key_file)  # fail at start, not at the first agent
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise TunnelCertError(f"cannot use the tunnel certificate {cert_file} / key {key_file}: {exc}") from exc
    return TunnelCert(cert_file, key_file, fingerprint, created)


def public_tunnel_addr(settings: Settings, port: int | None = None) -> str:
    """``PUBLIC_TUNNEL_ADDR`` or ``BIND_HOST:TUNNEL_PORT``: what an agent's ``--server`` is."""
    if settings.public_tunnel_addr:
        return settings.public_tunnel_addr
    host = settings.bind_host
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or settings.tunnel_port}"


def agent_command(settings: Settings, device_id: str, token: str, fingerprint: str | None,
                  port: int | None = None) -> str:
    """A ready-to-paste ``proxyorch-agent`` command line for one device."""
    parts = ["proxyorch-agent", "--server", public_tunnel_addr(settings, port), "--device-id", device_id,
             "--token", token]
    parts += ["--server-fingerprint", fingerprint] if fingerprint else ["--plaintext"]
    return " ".join(parts)
