"""The EMFILE-safe listener: at the descriptor limit accepting pauses (no busy loop) and resumes.

Runs in a subprocess, whose RLIMIT_NOFILE it lowers, once with asyncio's loop and once with uvloop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import asyncio, os, resource, socket, sys, time
    from device_tunnel.listener import Listener

    class Proto(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            t.write(b"hi")

    async def main():
        held = []
        listener = Listener(Proto)
        await listener.start("127.0.0.1", 0)
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 20, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        clients = []
        for _ in range(12):  # each takes 2 descriptors here (client + accepted): the limit is hit
            s = socket.socket(); s.setblocking(False)
            try:
                s.connect(("127.0.0.1", listener.port))
            except (BlockingIOError, OSError):
                pass
            clients.append(s)
        await asyncio.sleep(0.5)
        c0, t0 = os.times(), time.monotonic()
        await asyncio.sleep(1.5)
        c1, t1 = os.times(), time.monotonic()
        cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
        paused = listener.exhausted_pauses
        for s in clients:
            s.close()
        await asyncio.sleep(1.5)  # descriptors free again: the listener resumes
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        got = await asyncio.wait_for(reader.readexactly(2), 10)
        print(paused, round(cpu, 3), got == b"hi", listener.accepted)

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_accepting_pauses_at_emfile_without_spinning_and_resumes(loop):
    out = subprocess.run([sys.executable, "-c", SCRIPT, loop], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    paused, cpu, served, accepted = out.stdout.split()
    assert int(paused) >= 1
    assert float(cpu) < 0.2, f"{cpu} of a core at EMFILE"
    assert served == "True" and int(accepted) >= 1
