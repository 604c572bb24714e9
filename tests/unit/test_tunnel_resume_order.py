"""Back-pressure signals stay consistent: a ``StreamResumed`` queued by a drain that ran inside another
stream's ``send_data`` must not un-pause a source that ``send_data`` paused again since.

The CI failure of ``test_relayed_clients_that_never_read_stall_without_growing_x_or_y``: on node Y the
relay link's transport resumed (``resume_writing`` defers the drain), device DATA for stream A drained
stream B below ``PENDING_HIGH`` (StreamResumed(B) queued, not yet dispatched), device DATA for B in the
same batch paused B again (``send_data`` True: the bridge withholds B's device credit), then the adapter
dispatched the stale StreamResumed(B): the bridge returned the device credit while the core still had
B paused, so every later ``send_data(B)`` returned False and Y acknowledged every byte the device sent
(20 GiB queued on the link stream)."""

from __future__ import annotations

import asyncio
import random

from tunnel_pair import Pair

from device_tunnel import frames
from device_tunnel.adapter import TunnelProtocol, TunnelStream
from device_tunnel.connection import PENDING_HIGH, Role
from device_tunnel.events import StreamResumed

KiB, MiB = 1024, 1024 * 1024


class Source:
    """What a stream's writer believes (the relay bridge's ``blocked``, the proxy's ``pause_reading``)."""

    def __init__(self, pair: Pair, sids: list[int]) -> None:
        self.conn = pair.agent.conn
        self.paused = dict.fromkeys(sids, False)

    def write(self, sid: int, n: int) -> None:
        if self.conn.send_data(sid, b"x" * n):
            self.paused[sid] = True

    def events(self) -> list[int]:
        resumed = []
        for ev in self.conn.pop_events():
            if isinstance(ev, StreamResumed):
                self.paused[ev.stream_id] = False
                resumed.append(ev.stream_id)
        return resumed


def stalled_pair(n: int) -> tuple[Pair, list[int]]:
    p = Pair()
    p.handshake()
    sids = [p.open() for _ in range(n)]
    p.node.stalled |= set(sids)  # X's clients do not read: X returns no credit
    return p, sids


def test_a_stale_resume_queued_before_a_new_pause_is_withdrawn():
    p, (a, b) = stalled_pair(2)
    y = p.agent.conn
    src = Source(p, [a, b])
    src.write(b, y.streams[b].send_credit - 10 * KiB)  # B has 10 KiB of X's credit left
    p.pump()
    y.send_paused = True                   # the link's transport is full
    src.write(a, 10 * KiB)
    src.write(b, 70 * KiB)
    assert src.paused[b] and y.streams[b].source_paused
    y.send_paused = False                  # resume_writing: the adapter's drain is deferred (call_soon)
    src.write(a, 1 * KiB)                  # DATA for A first: its send_data drains B below PENDING_HIGH
    assert y.stream_buffered(b) <= PENDING_HIGH and not y.streams[b].source_paused
    src.write(b, 20 * KiB)                 # DATA for B in the same batch: B is over PENDING_HIGH again
    assert src.paused[b] and y.streams[b].source_paused
    assert b not in src.events()           # the adapter's flush: no stale resume of B
    assert src.paused[b]
    # and so the writer stays paused; the queue holds what it held
    assert y.stream_buffered(b) == 80 * KiB


def test_the_writer_never_believes_a_paused_stream_is_resumed_under_adversarial_orders():
    """A relay-like model: per stream a device that sends within its window (256 KiB), credit returned
    only while the writer is not paused (all held credit on resume); X returns credit at random
    moments, then none (its clients stop reading); the link's transport pauses and resumes at random;
    drains and event dispatch happen in random orders. The link stream's queue stays bounded by what
    flow control allows, and whenever events are dispatched the writer agrees with the core."""
    device_window = 256 * KiB
    for seed in range(60):
        rng = random.Random(seed)
        p, sids = stalled_pair(4)
        y = p.agent.conn
        src = Source(p, sids)
        device_credit = dict.fromkeys(sids, device_window)
        held = dict.fromkeys(sids, 0)
        x_credit_left = 3 * MiB
        for step in range(3000):
            op = rng.random()
            if op < 0.55:  # device DATA for one stream (what the device's window lets it send)
                sid = rng.choice(sids)
                n = min(device_credit[sid], rng.choice((1 * KiB, 16 * KiB, 64 * KiB)))
                if n:
                    device_credit[sid] -= n
                    src.write(sid, n)
                    if src.paused[sid]:
                        held[sid] += n
                    else:
                        device_credit[sid] += n
            elif op < 0.65:
                y.send_paused = not y.send_paused
            elif op < 0.75 and x_credit_left > 0:  # X's client read some: WINDOW for a stream
                sid = rng.choice(sids)
                inc = rng.choice((4 * KiB, 32 * KiB, 128 * KiB))
                x_credit_left -= inc
                for ev in y.receive_data(frames.encode_window(sid, inc) + frames.encode_window(0, inc), p.now):
                    if isinstance(ev, StreamResumed):
                        src.paused[ev.stream_id] = False
            elif op < 0.9:  # the adapter's flush: write (drain) then dispatch
                y.data_to_send_list(True, p.now)
            for sid in src.events() if op >= 0.9 or rng.random() < 0.5 else ():
                device_credit[sid] += held[sid]
                held[sid] = 0
            for sid in sids:
                if not src.paused[sid]:  # the bridge's sink_ready: credit for what it held
                    device_credit[sid] += held[sid]
                    held[sid] = 0
                assert y.stream_buffered(sid) <= device_window + PENDING_HIGH + 64 * KiB, (seed, step, sid)
        src.events()
        for sid in sids:
            assert src.paused[sid] == y.streams[sid].source_paused, (seed, sid)


class _Recorder:
    def __init__(self) -> None:
        self.resumed = 0

    def stream_data(self, data) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_closed(self, error) -> None: ...
    def pause_source(self) -> None: ...
    def sink_ready(self) -> bool:
        return True

    def resume_source(self) -> None:
        self.resumed += 1


class _Adapter(TunnelProtocol):
    role = Role.AGENT


async def test_the_adapter_drops_a_resume_for_a_stream_paused_again_since_it_was_taken():
    """Events already taken from the core (a list being dispatched) can be stale too."""
    p, (sid,) = stalled_pair(1)
    t = _Adapter(p.agent.conn.config, None)
    t.conn = p.agent.conn
    handler = _Recorder()
    t.handles[sid] = TunnelStream(t, sid, handler)
    t.conn.streams[sid].source_paused = True
    t.dispatch([StreamResumed(sid)])
    assert handler.resumed == 0
    t.conn.streams[sid].source_paused = False
    t.dispatch([StreamResumed(sid)])
    assert handler.resumed == 1
    await asyncio.sleep(0)


# -- defense in depth: a hard cap on a stream's outbound queue ------------------------------------
def test_a_source_that_ignores_the_pause_is_reset_at_the_queue_cap_not_grown():
    from device_tunnel.connection import TunnelConfig
    from device_tunnel.errors import ErrorCode
    from device_tunnel.events import StreamReset

    p = Pair(agent_config=TunnelConfig(pending_max=1 * MiB))
    p.handshake()
    sid, other = p.open(), p.open()
    p.node.stalled |= {sid, other}
    y = p.agent.conn
    written = 0
    while sid in y.streams:  # a writer that never pauses
        y.send_data(sid, b"x" * 64 * KiB)
        written += 64 * KiB
        assert written < 4 * MiB
    # the first write left at once (the output had room); the queue passed the cap on the 17th after it
    assert written == 64 * KiB + 1 * MiB + 64 * KiB
    assert y.queue_overflows == 1 and y.stream_buffered(sid) == 0  # the queue is freed
    assert y.buffered_bytes < 64 * KiB + 200  # what is left: the first frame and the RST
    reset = [e for e in y.pop_events() if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.code, e.remote) for e in reset] == [(sid, ErrorCode.INTERNAL_ERROR, False)]
    assert "outbound queue over 1048576 bytes" in reset[0].reason
    p.pump()
    peer_reset = p.node.of(StreamReset)
    assert [(e.stream_id, e.code, e.remote) for e in peer_reset] == [(sid, ErrorCode.INTERNAL_ERROR, True)]
    # the tunnel and its other streams are untouched
    assert not y.send_data(other, b"y" * KiB) and other in y.streams and not y.closed


def test_the_default_cap_is_far_above_what_flow_control_queues():
    from device_tunnel.connection import TunnelConfig, TunnelConnection
    from device_tunnel.windows import WindowSettings

    conn = TunnelConnection(Role.AGENT, 0.0, TunnelConfig(windows=WindowSettings(max_window=8 * MiB)))
    assert conn.pending_max >= 2 * (8 * MiB + PENDING_HIGH)


async def test_the_adapter_counts_queue_overflows_and_warns_once(caplog):
    from device_tunnel import adapter
    from device_tunnel.connection import TunnelConfig

    p = Pair(agent_config=TunnelConfig(pending_max=256 * KiB))
    p.handshake()
    sids = [p.open(), p.open()]
    t = _Adapter(p.agent.conn.config, None)
    t.conn = p.agent.conn
    handlers = {}
    for sid in sids:
        handlers[sid] = _Closed()
        t.handles[sid] = TunnelStream(t, sid, handlers[sid])
    before = adapter.QUEUE_OVERFLOWS["tunnel"]
    adapter._overflow_warned = False
    for sid in sids:
        for _ in range(32):
            t.handles[sid].write(b"x" * 64 * KiB) if sid in t.handles else None
    t._flush()
    assert adapter.QUEUE_OVERFLOWS["tunnel"] == before + 2
    assert all(h.error and "outbound queue over" in h.error for h in handlers.values())
    warnings = [r for r in caplog.records if "outbound queue passed" in r.getMessage()]
    assert len(warnings) == 1


class _Closed(_Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.error: str | None = None

    def stream_closed(self, error) -> None:
        self.error = error


def test_every_write_over_the_mark_says_pause_so_a_lost_pause_heals():
    """A writer that missed the first True (e.g. one that ignored it) is told again by its next write."""
    p, (sid,) = stalled_pair(1)
    y = p.agent.conn
    y.send_paused = True
    assert y.send_data(sid, b"x" * (PENDING_HIGH + 1))
    assert y.send_data(sid, b"x")  # still over the mark: pause again (idempotent for the writer)
    y.send_paused = False
    y.data_to_send_list(True, p.now)  # drained: the queue is below the mark
    assert [e.stream_id for e in y.pop_events() if isinstance(e, StreamResumed)] == [sid]
    assert not y.send_data(sid, b"x")


def test_one_large_write_of_a_writer_not_yet_paused_is_queued_not_reset():
    """The cap is for writes after the pause: a caller may hand one large buffer (its own memory)."""
    from device_tunnel.connection import TunnelConfig

    p = Pair(agent_config=TunnelConfig(pending_max=1 * MiB))
    p.handshake()
    sid = p.open()
    y = p.agent.conn
    assert y.send_data(sid, b"x" * 4 * MiB) and sid in y.streams and y.queue_overflows == 0
    y.send_data(sid, b"x")  # but the next one, while paused and over the cap, resets it
    assert sid not in y.streams and y.queue_overflows == 1


# -- the relay bridge itself (node Y): the real _End handlers and adapter dispatch, no sockets -----
class _NodeAdapter(TunnelProtocol):
    role = Role.NODE


class _NoBridge:
    def done(self) -> None: ...


async def test_relay_bridge_keeps_the_device_credit_withheld_through_a_stale_resume():
    """Y between X (link, whose clients never read) and the device: two relayed streams, the CI order
    of events. Y must never return the device more credit than the link stream can take."""
    from device_tunnel.relay import _End

    link, dev = Pair(), Pair()  # link: node = X, agent = Y's link end; dev: node = Y, agent = the device
    link.handshake()
    dev.handshake()
    y_link, y_dev = _Adapter(link.agent.conn.config, None), _NodeAdapter(dev.node.conn.config, None)
    y_link.conn, y_dev.conn = link.agent.conn, dev.node.conn
    legs = []
    for _ in range(2):
        ls, ds = link.open(), dev.open()
        link.node.stalled.add(ls)
        le, de = _End(_NoBridge()), _End(_NoBridge())  # type: ignore[arg-type]
        le.other, de.other = de, le
        le.stream = y_link.handles[ls] = TunnelStream(y_link, ls, le)
        de.stream = y_dev.handles[ds] = TunnelStream(y_dev, ds, de)
        legs.append((ls, ds))
    (a_link, a_dev), (b_link, b_dev) = legs
    device = dev.agent.conn

    def wire() -> None:
        """The device's bytes reach Y's device tunnel (one read: one batch of events); Y's WINDOW
        frames reach the device; Y's link output reaches X (which returns no credit)."""
        if out := device.data_to_send():
            y_dev.data_received(out)
        dev.agent.take(device.receive_data(dev.node.conn.data_to_send(), 0.0))
        if out := b"".join(y_link.conn.data_to_send_list(False, 0.0)):
            link.node.take(link.node.conn.receive_data(out, 0.0))

    device.send_data(b_dev, b"b" * (y_link.conn.streams[b_link].send_credit - 10 * KiB))
    wire()                                   # B has 10 KiB of X's credit left on the link
    y_link.pause_writing()                   # the link's TLS transport is full
    device.send_data(a_dev, b"a" * 10 * KiB)
    device.send_data(b_dev, b"b" * 70 * KiB)
    wire()                                   # B's link queue over PENDING_HIGH: its device credit withheld
    y_link.resume_writing()                  # the drain is only scheduled (call_soon)
    device.send_data(a_dev, b"a" * 1 * KiB)  # one read on the device tunnel: A's DATA then B's
    device.send_data(b_dev, b"b" * 20 * KiB)
    wire()
    y_link._flush()                          # the scheduled drain and its events
    for _ in range(40):                      # the device sends all the credit Y gives it
        device.send_data(b_dev, b"b" * max(1, device.streams[b_dev].send_credit))
        wire()
        y_link._flush()
        queued = y_link.conn.stream_buffered(b_link)
        assert queued <= dev.node.conn.streams[b_dev].recv.window + PENDING_HIGH + 64 * KiB, queued
    await asyncio.sleep(0)


def test_an_optimistic_open_over_the_queue_cap_fails_its_open():
    """Node side, a stream still opening (early data): its opener waits for an outcome, so it gets one."""
    from device_tunnel.connection import TunnelConfig
    from device_tunnel.events import StreamOpenFailed

    p = Pair(node_config=TunnelConfig(pending_max=512 * KiB))
    p.handshake()
    node = p.node.conn
    sid = node.open_stream("example.com", 443, early=True)
    while sid in node.streams:
        node.send_data(sid, b"x" * 64 * KiB)
    failed = [e for e in node.pop_events() if isinstance(e, StreamOpenFailed)]
    assert [(e.stream_id, e.reason) for e in failed] == [(sid, "outbound queue over 524288 bytes")]
    assert node.queue_overflows == 1
