"""Pins as people paste them, and the agent distribution's version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def test_fingerprint_parsing_accepts_what_people_paste_and_rejects_the_rest():
    from device_tunnel.tls import parse_fingerprint

    hexd = "0123456789abcdef" * 4
    assert parse_fingerprint(f"sha256:{hexd}") == f"sha256:{hexd}"
    assert parse_fingerprint(f" SHA256:{hexd.upper()} ") == f"sha256:{hexd}"
    colons = ":".join(hexd[i:i + 2] for i in range(0, 64, 2))
    assert parse_fingerprint(f"sha256:{colons}") == f"sha256:{hexd}"
    for bad in ("", hexd, f"sha1:{hexd}", f"sha256:{hexd[:-1]}", f"sha256:{hexd}00", f"sha256:{hexd[:-1]}g"):
        with pytest.raises(ValueError):
            parse_fingerprint(bad)


def test_agent_distribution_version_is_the_project_version():
    import tomllib

    import device_tunnel

    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert device_tunnel.__version__ == main
    out = subprocess.run([sys.executable, "-m", "device_tunnel", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.strip() == f"proxyorch-agent {main}"


def test_self_signed_certificate_is_created_once_even_by_racing_processes(tmp_path):
    import stat
    from concurrent.futures import ThreadPoolExecutor

    from proxyorch.config import load_settings
    from proxyorch.tunnel_cert import load_or_create

    settings = load_settings({"DATA_DIR": str(tmp_path), "PUBLIC_TUNNEL_ADDR": "tunnel.example.net:443"})
    with ThreadPoolExecutor(8) as ex:
        certs = list(ex.map(lambda _i: load_or_create(settings), range(8)))
    assert len({c.fingerprint for c in certs}) == 1
    assert sum(c.created for c in certs) >= 1
    again = load_or_create(settings)
    assert again.fingerprint == certs[0].fingerprint and not again.created
    assert stat.S_IMODE(Path(again.key_file).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tunnel-tls"]  # no temporary folder left behind
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(again.cert_file).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "tunnel.example.net" in names.get_values_for_type(x509.DNSName)
    ctx = again.context()
    import ssl

    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_half_configured_certificate_is_refused_with_a_clear_error(tmp_path):
    from proxyorch.config import load_settings
    from proxyorch.tunnel_cert import TunnelCertError, load_or_create

    with pytest.raises(TunnelCertError, match="TUNNEL_TLS_CERT and TUNNEL_TLS_KEY"):
        load_or_create(load_settings({"DATA_DIR": str(tmp_path), "TUNNEL_TLS_CERT": str(tmp_path / "c.pem")}))
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(TunnelCertError, match="cannot use the tunnel certificate"):
        load_or_create(load_settings({"DATA_DIR": str(tmp_path), "TUNNEL_TLS_CERT": str(tmp_path / "c.pem"),
                                      "TUNNEL_TLS_KEY": str(tmp_path / "k.pem")}))


def test_agent_refuses_to_build_an_unverified_tls_or_implicit_plaintext_config():
    from device_tunnel.agent import AgentConfig, DeviceAgent
    from device_tunnel.tls import client_context

    with pytest.raises(ValueError):
        client_context()
    with pytest.raises(ValueError):
        DeviceAgent(AgentConfig(host="127.0.0.1", port=1, device_id="d", token="t"))
