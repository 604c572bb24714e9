"""Run pproxy on a uvloop event loop.

pproxy 2.7.9 calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``, which uvloop ≥ 0.22 refuses
("no current event loop"). This sets the uvloop loop up first and makes ``install`` a no-op; pproxy itself
is unchanged. ``python -m benchmarks.pproxy_uvloop -l socks5://127.0.0.1:PORT#user:pass``
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


def main() -> None:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    uvloop.install = lambda: None  # type: ignore[assignment]
    from pproxy.server import main as pproxy_main

    sys.argv = ["pproxy", *sys.argv[1:]]
    pproxy_main()


if __name__ == "__main__":
    main()
