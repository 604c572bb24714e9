"""Never an open proxy; brute force limits; SSRF refusals on the device; blacklist evasion attempts."""

from __future__ import annotations

import asyncio
import base64

import pytest
import pytest_asyncio
from conftest import fresh_deployment
from socks_client import socks5_code

pytestmark = pytest.mark.asyncio(loop_scope="session")
BASE = "/api/v2/proxy/connections"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(deployment):
    _uid, token = await deployment.user("sec")
    device = await deployment.device(token)
    await deployment.agent(device, "--allow-private")
    strict = await deployment.device(token)
    await deployment.agent(strict)  # default policy: refuses private targets
    a = await deployment.connection(token, device["remote_device_id"])
    b = await deployment.connection(token, device["remote_device_id"])
    s = await deployment.connection(token, strict["remote_device_id"])
    return {"dep": deployment, "token": token, "device": device, "a": a, "b": b, "strict": s}


async def raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    return data


def basic(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


# -- never an open proxy ----------------------------------------------------------------------------
async def test_no_auth_greeting_is_refused(world):
    reader, writer = await asyncio.open_connection("127.0.0.1", world["dep"].node.proxy_port)
    writer.write(b"\x05\x02\x00\x01")  # offers "no auth" and GSSAPI only
    assert await asyncio.wait_for(reader.read(), 5) == b"\x05\xff"
    writer.close()


async def test_empty_password_is_refused(world, targets):
    port = world["dep"].node.proxy_port
    assert await socks5_code(port, world["a"]["connectionId"], "", "127.0.0.1", targets.echo_port) == 0x101


async def test_password_of_another_connection_is_refused(world, targets):
    port = world["dep"].node.proxy_port
    code = await socks5_code(port, world["a"]["connectionId"], world["b"]["password"], "127.0.0.1", targets.echo_port)
    assert code == 0x101


async def test_deleted_dissociated_and_rotated_away_credentials_are_refused(world, targets):
    dep, token = world["dep"], world["token"]
    port = dep.node.proxy_port
    dev = world["device"]["remote_device_id"]
    deleted = await dep.connection(token, dev)
    dissociated = await dep.connection(token, dev)
    rotated = await dep.connection(token, dev)
    await dep.call("DELETE", f"{BASE}/{deleted['connectionId']}", token)
    await dep.call("DELETE", f"{BASE}/{dissociated['connectionId']}/device", token)
    await dep.call("POST", f"{BASE}/{rotated['connectionId']}/password", token)
    await asyncio.sleep(0.15)
    assert await socks5_code(port, deleted["connectionId"], deleted["password"], "127.0.0.1", targets.echo_port) == 0x101
    # dissociated: authenticates but can never route anywhere
    assert await socks5_code(port, dissociated["connectionId"], dissociated["password"], "127.0.0.1",
                             targets.echo_port) == 0x03
    assert await socks5_code(port, rotated["connectionId"], rotated["password"], "127.0.0.1", targets.echo_port) == 0x101


async def test_http_requests_without_proxy_authorization_get_407(world, targets):
    port = world["dep"].node.proxy_port
    for req in (f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET http://127.0.0.1:{targets.http_port}/hello HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET http://127.0.0.1:{targets.http_port}/hello HTTP/1.1\r\nProxy-Authorization: Basic "
                f"{basic(world['a']['connectionId'], 'wrongwrongwrong!')}\r\nHost: x\r\n\r\n",
                f"CONNECT 127.0.0.1:{targets.echo_port} HTTP/1.1\r\nProxy-Authorization: Bearer abc\r\n\r\n"):
        answer = await raw_http(port, req.encode())
        assert answer.startswith(b"HTTP/1.1 407"), answer[:60]
        assert b"Proxy-Authenticate: Basic" in answer


async def test_origin_form_request_to_the_proxy_is_not_forwarded(world):
    answer = await raw_http(world["dep"].node.proxy_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4")


async def test_garbage_on_the_proxy_port_gets_an_error_not_a_crash(world, targets):
    port = world["dep"].node.proxy_port
    for junk in (b"\x05\x00", b"\x05\x01\x02\x09\x09\x09", b"\x16\x03\x01\x02\x00", b"\x00" * 100,
                 b"GET http://x HTTP/9.9\r\n\r\n", b"A" * 70000):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(junk)
        try:
            await asyncio.wait_for(reader.read(), 20)
        except (ConnectionResetError, TimeoutError):
            pass
        writer.close()
    # the node is still serving
    assert await socks5_code(port, world["a"]["connectionId"], world["a"]["password"], "127.0.0.1",
                             targets.echo_port) == 0


# -- SSRF: the device refuses the owner's network ---------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "127.1", "0177.0.0.1", "::1",
                                  "::ffff:127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1", "172.16.5.4",
                                  "100.64.0.1", "0.0.0.0", "224.0.0.1", "fe80::1", "fd00::1"])
async def test_device_refuses_private_targets_by_default(world, targets, host):
    dep, s = world["dep"], world["strict"]
    code = await socks5_code(dep.node.proxy_port, s["connectionId"], s["password"], host, targets.echo_port)
    assert code == 0x02, host


# -- blacklist evasion -----------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def blocked(world):
    dep, token, cid = world["dep"], world["token"], world["a"]["connectionId"]
    status, _ = await dep.call("POST", f"{BASE}/{cid}/blacklist", token,
                               json={"domains": ["evil.test", "bücher.test", "127.0.0.0/8", "::1"]})
    assert status == 200
    yield world
    await dep.call("DELETE", f"{BASE}/{cid}/blacklist", token,
                   json={"domains": ["evil.test", "bücher.test", "127.0.0.0/8", "::1"]})


@pytest.mark.parametrize("host", ["evil.test", "EVIL.test", "evil.test.", "a.b.evil.TEST.", "xn--bcher-kva.test",
                                  "BÜCHER.test", "shop.bücher.test", "127.0.0.1", "127.1", "2130706433",
                                  "::1", "::ffff:127.0.0.1"])
async def test_socks_targets_cannot_dodge_the_blacklist(blocked, host):
    a = blocked["a"]
    assert await socks5_code(blocked["dep"].node.proxy_port, a["connectionId"], a["password"], host, 80) == 0x02, host


@pytest.mark.parametrize("target", ["evil.test:443", "EVIL.TEST.:443", "[::1]:443", "127.0.0.1:443",
                                    "sub.evil.test:8443"])
async def test_http_connect_targets_cannot_dodge_the_blacklist(blocked, target):
    a = blocked["a"]
    req = f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Basic {basic(a['connectionId'], a['password'])}\r\n\r\n"
    answer = await raw_http(blocked["dep"].node.proxy_port, req.encode())
    assert answer.startswith(b"HTTP/1.1 403"), (target, answer[:80])


@pytest.mark.parametrize("url", ["http://evil.test/", "http://user:pw@evil.test/x", "http://EVIL.test.:80/",
                                 "http://good.test@evil.test/", "http://[::1]/", "http://127.0.0.1:8080/"])
async def test_absolute_form_urls_cannot_dodge_the_blacklist(blocked, url):
    a = blocked["a"]
    req = (f"GET {url} HTTP/1.1\r\nHost: good.test\r\n"
           f"Proxy-Authorization: Basic {basic(a['connectionId'], a['password'])}\r\n\r\n")
    answer = await raw_http(blocked["dep"].node.proxy_port, req.encode())
    assert answer.startswith(b"HTTP/1.1 403"), (url, answer[:80])


# -- brute force -----------------------------------------------------------------------------------
async def test_failed_logins_are_rate_limited_per_address_and_per_id(pg_root, tmp_path, targets):
    dep = await fresh_deployment(pg_root, tmp_path, AUTH_FAIL_LIMIT="5", AUTH_FAIL_WINDOW_S="60")
    try:
        _uid, token = await dep.user("victim")
        device = await dep.device(token)
        await dep.agent(device, "--allow-private")
        conn = await dep.connection(token, device["remote_device_id"])
        other = await dep.connection(token, device["remote_device_id"])
        port, cid, pw = dep.node.proxy_port, conn["connectionId"], conn["password"]
        # The legitimate user connects once from 127.0.0.9 (a known address for this id).
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.9") == 0
        # An attacker on 127.0.0.5 guesses.
        for _ in range(5):
            assert await socks5_code(port, cid, "guess-guess-gue", "127.0.0.1", 80, local_addr="127.0.0.5") == 0x101
        # Now even the right password is refused from the attacker's address...
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.5") == 0x101
        # ...and from a fresh address, since the id itself is under attack...
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.7") == 0x101
        # ...but the legitimate user's known address is unaffected, and so are other credentials.
        assert await socks5_code(port, cid, pw, "127.0.0.1", targets.echo_port, local_addr="127.0.0.9") == 0
        assert await socks5_code(port, other["connectionId"], other["password"], "127.0.0.1", targets.echo_port,
                                 local_addr="127.0.0.8") == 0
        m = await dep.metrics()
        assert m["proxyorch_auth_failures_total"] >= 7 and m["proxyorch_auth_rate_limited_total"] >= 2
    finally:
        await dep.close()
        await dep.node.stop()
