"""Coverage-guided fuzzing (atheris) of the three parsers. Optional, not part of the test run.

    pip install atheris
    python tests/fuzz/fuzz_parsers.py -atheris_runs=200000          # all parsers, one input each
    python tests/fuzz/fuzz_parsers.py -max_total_time=120 corpus/   # time-boxed, with a corpus

Each input is split by its first byte into chunks (every split of valid input is reachable) and fed
to the SOCKS5 server, the HTTP request-head parser, the absolute-form forwarder and the tunnel frame
decoder. Any exception other than the parser's own defined error is a finding.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from device_tunnel.frames import FrameDecoder, FrameError, validate
    from proxy.http_connect.forward import ForwardSession
    from proxy.http_connect.protocol import HttpParseError, RequestHeadParser
    from proxy.socks5.protocol import Credentials, Greeting, Request, Socks5ServerConnection


def chunks(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    step = max(1, data[0] % 17)
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


def fuzz_socks(parts: list[bytes]) -> None:
    conn = Socks5ServerConnection()
    for part in parts:
        for ev in conn.receive_data(part):
            if isinstance(ev, Greeting):
                conn.select_method(ev)
            elif isinstance(ev, Credentials):
                conn.auth_reply(len(ev.password) % 2 == 0)
            elif isinstance(ev, Request):
                conn.reply(0, ev.host, ev.port)


def fuzz_http(parts: list[bytes]) -> None:
    parser = RequestHeadParser()
    try:
        for part in parts:
            if parser.receive_data(part) is not None:
                break
    except HttpParseError:
        pass
    fwd = ForwardSession()
    for part in parts:
        fwd.client_data(part)
    fwd.client_eof()


def fuzz_frames(parts: list[bytes]) -> None:
    dec = FrameDecoder()
    try:
        for part in parts:
            for frame in dec.feed(part):
                try:
                    validate(frame)
                except FrameError:
                    pass
    except FrameError:
        pass
    assert dec.buffered <= 10 + 256 * 1024


def test_one_input(data: bytes) -> None:
    parts = chunks(data)
    fuzz_socks(parts)
    fuzz_http(parts)
    fuzz_frames(parts)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
