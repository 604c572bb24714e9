"""The clients people already use, through the proxy port and a real device agent.

curl (SOCKS5 with remote DNS, HTTP CONNECT, absolute-form, ``--proxy-anyauth``), wget, requests with
PySocks, httpx with its SOCKS extra, aiohttp with aiohttp-socks, proxychains-ng running programs
that know nothing of proxies, ``git clone`` over an HTTP proxy, and HTTPS through CONNECT and
SOCKS5 to a target with a self-signed certificate the clients trust. The agent binds its outgoing
connections to ``EXIT`` (127.0.0.31), so a target that echoes the peer address shows that the
request really left through the device, and every test also checks the bytes it got.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import aiohttp
import httpx
import pytest
import pytest_asyncio
import requests
from aiohttp import web
from aiohttp_socks import ProxyConnector
from targets import expected_digest

pytestmark = pytest.mark.asyncio(loop_scope="session")
EXIT = "127.0.0.31"
SIZE = 2_500_000  # a few tunnel windows, so flow control is exercised on every client
HELLO = b"hello through the tunnel\n"
PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "NO_PROXY"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(deployment, targets):
    """One device whose agent exits from EXIT (loopback targets allowed) and one connection to it."""
    _uid, token = await deployment.user("clients")
    device = await deployment.device(token)
    agent = await deployment.agent(device, "--allow-private", "--source-address", EXIT)
    conn = await deployment.connection(token, device["remote_device_id"], "clients")
    yield {"dep": deployment, "cid": conn["connectionId"], "pw": conn["password"],
           "port": deployment.node.proxy_port, "base": f"http://127.0.0.1:{targets.http_port}"}
    agent.kill(15)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without proxy variables: the proxy a program uses is the one the test gives."""
    return {**{k: v for k, v in os.environ.items() if k not in PROXY_VARS}, **extra}


async def run(*cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 120) -> tuple[int, bytes, bytes]:
    """Run a program to completion (killed if it overruns); (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(*cmd, env=env or clean_env(), cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out, err


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def proxy_url(world, scheme: str) -> str:
    return f"{scheme}://{world['cid']}:{world['pw']}@127.0.0.1:{world['port']}"


# -- curl -------------------------------------------------------------------------------------------
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    return await run("curl", "-sS", "--max-time", "60", *args)


async def curl_checks(world, *proxy_args: str, host: str = "127.0.0.1") -> bytes:
    """Fetch SIZE bytes and the peer address with the given proxy options; returns curl's stderr."""
    base = world["base"].replace("127.0.0.1", host)
    rc, body, err = await curl(*proxy_args, f"{base}/bytes/{SIZE}")
    assert rc == 0, err.decode()
    assert len(body) == SIZE and digest(body) == expected_digest(SIZE)
    rc, peer, err2 = await curl(*proxy_args, f"{base}/peer")
    assert rc == 0, err2.decode()
    assert peer.decode() == EXIT
    return err + err2


@needs_curl
async def test_curl_socks5h_resolves_on_the_device(world):
    await curl_checks(world, "--proxy", proxy_url(world, "socks5h"), host="localhost")


@needs_curl
async def test_curl_http_connect(world):
    await curl_checks(world, "--proxytunnel", "--proxy", proxy_url(world, "http"))


@needs_curl
async def test_curl_http_absolute_form(world):
    await curl_checks(world, "--proxy", proxy_url(world, "http"))


@needs_curl
@pytest.mark.parametrize("tunnel", [False, True], ids=["absolute-form", "connect"])
async def test_curl_proxy_anyauth_answers_the_407_challenge(world, tunnel):
    """--proxy-anyauth first asks without credentials; the 407 challenge tells it to use Basic."""
    args = ["-v", "--proxy-anyauth", "--proxy-user", f"{world['cid']}:{world['pw']}",
            "--proxy", f"http://127.0.0.1:{world['port']}"] + (["--proxytunnel"] if tunnel else [])
    err = await curl_checks(world, *args)
    assert b"< HTTP/1.1 407" in err and b"Proxy-Authenticate: Basic" in err, err.decode()
    assert b"Proxy-Authorization: Basic" in err


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget not installed")
async def test_wget_through_the_http_proxy(world):
    proxy = [f"--proxy-user={world['cid']}", f"--proxy-password={world['pw']}", "-e", "use_proxy=yes",
             "-e", f"http_proxy=http://127.0.0.1:{world['port']}", "-q", "-O", "-", "--tries=1", "--timeout=60"]
    rc, body, err = await run("wget", *proxy, f"{world['base']}/bytes/{SIZE}")
    assert rc == 0, err.decode()
    assert digest(body) == expected_digest(SIZE)
    rc, peer, err = await run("wget", *proxy, f"{world['base']}/peer")
    assert (rc, peer.decode()) == (0, EXIT), err.decode()


# -- Python clients -------------------------------------------------------------------------------
async def test_requests_with_pysocks(world):
    proxies = {"http": proxy_url(world, "socks5h"), "https": proxy_url(world, "socks5h")}

    def fetch() -> tuple[bytes, str]:
        with requests.Session() as s:
            s.trust_env = False
            body = s.get(f"{world['base']}/bytes/{SIZE}", proxies=proxies, timeout=60)
            peer = s.get(f"{world['base']}/peer", proxies=proxies, timeout=60)
            body.raise_for_status()
            return body.content, peer.text

    body, peer = await asyncio.to_thread(fetch)  # the targets run on this event loop
    assert digest(body) == expected_digest(SIZE)
    assert peer == EXIT


async def test_requests_through_the_http_proxy(world):
    proxies = {"http": proxy_url(world, "http")}

    def fetch() -> tuple[bytes, str]:
        with requests.Session() as s:
            s.trust_env = False
            body = s.post(f"{world['base']}/echo", data=HELLO * 1000, proxies=proxies, timeout=60)
            peer = s.get(f"{world['base']}/peer", proxies=proxies, timeout=60)
            return body.content, peer.text

    body, peer = await asyncio.to_thread(fetch)
    assert body == HELLO * 1000
    assert peer == EXIT


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
async def test_httpx_with_socks(world, scheme):
    async with httpx.AsyncClient(proxy=proxy_url(world, scheme), trust_env=False, timeout=60) as client:
        body = await client.get(f"{world['base']}/bytes/{SIZE}")
        peer = await client.get(f"{world['base']}/peer")
    assert body.status_code == 200 and digest(body.content) == expected_digest(SIZE)
    assert peer.text == EXIT


async def test_httpx_through_the_http_proxy(world):
    async with httpx.AsyncClient(proxy=proxy_url(world, "http"), trust_env=False, timeout=60) as client:
        body = await client.get(f"{world['base']}/bytes/{SIZE}")
        peer = await client.get(f"{world['base']}/peer")
    assert digest(body.content) == expected_digest(SIZE)
    assert peer.text == EXIT


async def test_aiohttp_with_aiohttp_socks(world):
    connector = ProxyConnector.from_url(proxy_url(world, "socks5"), rdns=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{world['base'].replace('127.0.0.1', 'localhost')}/bytes/{SIZE}") as r:
            body = await r.read()
        async with http.get(f"{world['base']}/peer") as r:
            peer = await r.text()
    assert digest(body) == expected_digest(SIZE)
    assert peer == EXIT


async def test_aiohttp_through_the_http_proxy(world):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{world['base']}/bytes/{SIZE}", proxy=proxy_url(world, "http")) as r:
            body = await r.read()
        async with http.get(f"{world['base']}/peer", proxy=proxy_url(world, "http")) as r:
            peer = await r.text()
    assert digest(body) == expected_digest(SIZE)
    assert peer == EXIT


# -- HTTPS through CONNECT (what browsers and most scrapers do) ---------------------------------------
def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_target(tmp_path_factory):
    """An HTTPS target (/bytes/{size}, /peer) with a self-signed certificate the clients trust."""
    import ssl

    from targets import body_chunk

    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def peer(request: web.Request) -> web.Response:
        return web.Response(text=request.remote or "")

    async def blob(request: web.Request) -> web.StreamResponse:
        size, sent, i = int(request.match_info["size"]), 0, 0
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        while sent < size:
            chunk = body_chunk(i)[: size - sent]
            await resp.write(chunk)
            sent, i = sent + len(chunk), i + 1
        return resp

    app = web.Application()
    app.router.add_get("/peer", peer)
    app.router.add_get("/bytes/{size}", blob)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield {"base": f"https://localhost:{port}", "cafile": str(cert)}
    await runner.cleanup()


@needs_curl
@pytest.mark.parametrize("scheme", ["http", "socks5h"], ids=["connect", "socks5h"])
async def test_curl_https(world, tls_target, scheme):
    args = ["--cacert", tls_target["cafile"], "--proxy", proxy_url(world, scheme)]
    rc, body, err = await curl(*args, f"{tls_target['base']}/bytes/{SIZE}")
    assert rc == 0, err.decode()
    assert digest(body) == expected_digest(SIZE)
    rc, peer, err = await curl(*args, f"{tls_target['base']}/peer")
    assert (rc, peer.decode()) == (0, EXIT), err.decode()


async def test_requests_https_through_connect(world, tls_target):
    proxies = {"https": proxy_url(world, "http")}

    def fetch() -> tuple[bytes, str]:
        with requests.Session() as s:
            s.trust_env = False
            body = s.get(f"{tls_target['base']}/bytes/{SIZE}", proxies=proxies, verify=tls_target["cafile"],
                         timeout=60)
            peer = s.get(f"{tls_target['base']}/peer", proxies=proxies, verify=tls_target["cafile"], timeout=60)
            return body.content, peer.text

    body, peer = await asyncio.to_thread(fetch)
    assert digest(body) == expected_digest(SIZE)
    assert peer == EXIT


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_httpx_https(world, tls_target, scheme):
    import ssl

    ctx = ssl.create_default_context(cafile=tls_target["cafile"])
    async with httpx.AsyncClient(proxy=proxy_url(world, scheme), verify=ctx, trust_env=False, timeout=60) as client:
        body = await client.get(f"{tls_target['base']}/bytes/{SIZE}")
        peer = await client.get(f"{tls_target['base']}/peer")
    assert digest(body.content) == expected_digest(SIZE)
    assert peer.text == EXIT


async def test_aiohttp_https_through_connect(world, tls_target):
    import ssl

    ctx = ssl.create_default_context(cafile=tls_target["cafile"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{tls_target['base']}/bytes/{SIZE}", proxy=proxy_url(world, "http"), ssl=ctx) as r:
            body = await r.read()
        async with http.get(f"{tls_target['base']}/peer", proxy=proxy_url(world, "http"), ssl=ctx) as r:
            peer = await r.text()
    assert digest(body) == expected_digest(SIZE)
    assert peer == EXIT


# -- proxychains-ng: programs that know nothing of proxies -------------------------------------------
needs_proxychains = pytest.mark.skipif(shutil.which("proxychains4") is None, reason="proxychains4 not installed")


def proxychains_conf(world, tmp_path: Path, kind: str) -> Path:
    conf = tmp_path / f"proxychains-{kind}.conf"
    conf.write_text("strict_chain\nproxy_dns\ntcp_read_time_out 30000\ntcp_connect_time_out 10000\n"
                    f"[ProxyList]\n{kind} 127.0.0.1 {world['port']} {world['cid']} {world['pw']}\n")
    return conf


@needs_proxychains
@needs_curl
@pytest.mark.parametrize("kind", ["socks5", "http"])
async def test_proxychains_runs_plain_curl_through_the_proxy(world, tmp_path, kind):
    conf = proxychains_conf(world, tmp_path, kind)
    rc, body, err = await run("proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--max-time", "60",
                              f"{world['base']}/bytes/{SIZE}")
    assert rc == 0, err.decode()
    assert digest(body) == expected_digest(SIZE)
    rc, peer, err = await run("proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--max-time", "60",
                              f"{world['base']}/peer")
    assert rc == 0, err.decode()
    assert peer.decode() == EXIT


@needs_proxychains
async def test_proxychains_runs_plain_python_through_the_proxy(world, tmp_path):
    conf = proxychains_conf(world, tmp_path, "socks5")
    code = ("import hashlib, urllib.request, sys\n"
            "op = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            f"body = op.open('{world['base']}/bytes/{SIZE}', timeout=60).read()\n"
            f"peer = op.open('{world['base']}/peer', timeout=60).read().decode()\n"
            "print(hashlib.sha256(body).hexdigest(), peer)\n")
    rc, out, err = await run("proxychains4", "-q", "-f", str(conf), sys.executable, "-c", code)
    assert rc == 0, err.decode()
    assert out.decode().split() == [expected_digest(SIZE), EXIT]


# -- git clone over an HTTP proxy ----------------------------------------------------------------
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


async def git(*args: str, cwd: Path, home: Path, **env: str) -> bytes:
    rc, out, err = await run("git", "-c", "user.name=t", "-c", "user.email=t@example.test",
                             "-c", "init.defaultBranch=main", *args, cwd=cwd,
                             env=clean_env(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", **env))
    assert rc == 0, (args, err.decode())
    return out


@pytest_asyncio.fixture(loop_scope="session")
async def git_server(tmp_path):
    """A bare repository served over dumb HTTP (``git update-server-info`` + static files),
    recording the peer address of every request."""
    home = tmp_path / "home"
    src, served = tmp_path / "src", tmp_path / "served"
    for d in (home, src, served):
        d.mkdir()
    payload = os.urandom(300_000).hex()  # 600 kB of text: several packs' worth of tunnel windows
    (src / "README").write_text("cloned through a phone\n")
    (src / "data.txt").write_text(payload)
    await git("init", "-q", ".", cwd=src, home=home)
    await git("add", ".", cwd=src, home=home)
    await git("commit", "-q", "-m", "first", cwd=src, home=home)
    await git("clone", "-q", "--bare", str(src), str(served / "repo.git"), cwd=tmp_path, home=home)
    await git("update-server-info", cwd=served / "repo.git", home=home)
    peers: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler):  # noqa: ANN001, ANN202
        peers.append(request.remote or "")
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.router.add_static("/git", served)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield {"url": f"http://127.0.0.1:{port}/git/repo.git", "payload": payload, "peers": peers, "home": home}
    await runner.cleanup()


@needs_git
async def test_git_clone_over_the_http_proxy(world, git_server, tmp_path):
    dest = tmp_path / "clone"
    await git("-c", f"http.proxy={proxy_url(world, 'http')}", "clone", "-q", git_server["url"], str(dest),
              cwd=tmp_path, home=git_server["home"])
    assert (dest / "data.txt").read_text() == git_server["payload"]
    assert (dest / "README").read_text() == "cloned through a phone\n"
    assert git_server["peers"] and set(git_server["peers"]) == {EXIT}, git_server["peers"]


@needs_git
async def test_git_clone_over_socks5h(world, git_server, tmp_path):
    dest = tmp_path / "clone"
    await git("-c", f"http.proxy={proxy_url(world, 'socks5h')}", "clone", "-q",
              git_server["url"].replace("127.0.0.1", "localhost"), str(dest), cwd=tmp_path, home=git_server["home"])
    assert (dest / "data.txt").read_text() == git_server["payload"]
    assert set(git_server["peers"]) == {EXIT}, git_server["peers"]


# -- what the README's Troubleshooting section says a new user sees -------------------------------
@needs_curl
async def test_curl_messages_of_the_troubleshooting_section(deployment, targets):
    dep = deployment
    _uid, token = await dep.user("troubled")
    strict = await dep.device(token)
    agent = await dep.agent(strict)  # default policy: private targets refused
    offline = await dep.device(token)  # no agent runs for it
    cases = {"private": await dep.connection(token, strict["remote_device_id"]),
             "offline": await dep.connection(token, offline["remote_device_id"]),
             "no device": await dep.connection(token, offline["remote_device_id"])}
    status, _ = await dep.call("DELETE", f"/api/v2/proxy/connections/{cases['no device']['connectionId']}/device",
                               token)
    assert status == 200
    expected = {"private": (2, 403, "target address is private, loopback or link-local"),
                "offline": (3, 502, "device offline"),
                "no device": (3, 403, "no device associated with this connection")}
    url = f"http://127.0.0.1:{targets.http_port}/hello"
    try:
        for case, conn in cases.items():
            code, status, reason = expected[case]
            auth = f"{conn['connectionId']}:{conn['password']}@127.0.0.1:{dep.node.proxy_port}"
            rc, _out, err = await curl("--proxy", f"socks5h://{auth}", url)
            assert rc == 97 and f"Can't complete SOCKS5 connection to 127.0.0.1. ({code})".encode() in err, err
            rc, out, err = await curl("-i", "--proxy", f"http://{auth}", url)
            assert rc == 0, err
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), out
            assert json.loads(body) == {"error": reason}
    finally:
        agent.kill(15)
