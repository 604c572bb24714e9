"""Byte-level tests of the tunnel frame codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_tunnel import frames
from device_tunnel.frames import Frame, FrameDecoder, FrameError, FrameType


def test_data_frame_layout_is_type_flags_stream_length_payload():
    raw = frames.encode(FrameType.DATA, 7, b"abc")
    assert raw == bytes([5, 0]) + struct.pack("!II", 7, 3) + b"abc"


def test_window_and_ping_have_fixed_payloads():
    assert frames.encode_window(3, 65536)[10:] == struct.pack("!I", 65536)
    ping = frames.encode_ping(42, ack=True)
    assert ping[1] == frames.FLAG_ACK and ping[10:] == struct.pack("!Q", 42)


def test_decoder_returns_every_complete_frame_in_order():
    stream = b"".join([frames.encode(FrameType.DATA, 1, b"x" * 10), frames.encode_window(1, 5),
                       frames.encode_json(FrameType.OPEN, 2, {"host": "a", "port": 1, "window": 9})])
    out = FrameDecoder().feed(stream)
    assert [f.type for f in out] == [FrameType.DATA, FrameType.WINDOW, FrameType.OPEN]
    assert out[2].json() == {"host": "a", "port": 1, "window": 9}


def test_truncated_input_is_buffered_until_complete_at_every_split():
    raw = frames.encode(FrameType.DATA, 9, b"hello world") + frames.encode(FrameType.FIN, 9)
    for cut in range(len(raw) + 1):
        dec = FrameDecoder()
        got = dec.feed(raw[:cut]) + dec.feed(raw[cut:])
        assert [(f.type, f.stream_id, f.payload) for f in got] == [
            (FrameType.DATA, 9, b"hello world"), (FrameType.FIN, 9, b"")]
        assert dec.buffered == 0


def test_oversized_data_frame_is_a_protocol_error_before_buffering_it():
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(struct.pack("!BBII", FrameType.DATA, 0, 1, frames.MAX_PAYLOAD + 1))


def test_oversized_json_frame_is_a_protocol_error():
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack("!BBII", FrameType.OPEN, 0, 1, frames.MAX_CONTROL_PAYLOAD + 1))


def test_unknown_frame_type_is_decoded_for_the_caller_to_ignore_but_size_limited():
    out = FrameDecoder().feed(struct.pack("!BBII", 200, 0, 1, 3) + b"abc" + frames.encode(FrameType.FIN, 1))
    assert [(f.type, f.payload) for f in out] == [(200, b"abc"), (FrameType.FIN, b"")]
    frames.validate(out[0])  # unknown types have no rules
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack("!BBII", 200, 0, 1, frames.MAX_CONTROL_PAYLOAD + 1))


def test_rst_carries_a_numeric_code_and_a_reason():
    raw = frames.encode_rst(5, 3, "too much")
    f = FrameDecoder().feed(raw)[0]
    frames.validate(f)
    assert frames.decode_rst(f.payload) == (3, "too much")
    with pytest.raises(FrameError):
        frames.validate(Frame(FrameType.RST, 0, 5, b"ab"))


def test_bad_json_payload_is_a_frame_error():
    f = Frame(FrameType.OPEN, 0, 1, b"{not json")
    with pytest.raises(FrameError):
        f.json()
    with pytest.raises(FrameError):
        Frame(FrameType.OPEN, 0, 1, b"[1,2]").json()


@pytest.mark.parametrize("frame", [
    Frame(FrameType.WINDOW, 0, 1, b"abc"),
    Frame(FrameType.PING, 0, 0, b"1234"),
    Frame(FrameType.PING, 0, 3, b"12345678"),
    Frame(FrameType.HELLO, 0, 5, b"{}"),
    Frame(FrameType.DATA, 0, 0, b"x"),
])
def test_validate_rejects_bad_fixed_payloads_and_wrong_streams(frame):
    with pytest.raises(FrameError):
        frames.validate(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_garbage_never_raises_anything_but_frame_error_and_stays_bounded(data, step):
    dec = FrameDecoder()
    try:
        for i in range(0, len(data), step):
            for f in dec.feed(data[i:i + step]):
                try:
                    frames.validate(f)
                except FrameError:
                    pass
    except FrameError:
        return
    assert dec.buffered <= frames.HEADER_SIZE + frames.MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FrameType.DATA, FrameType.FIN, FrameType.RST]),
                          st.integers(1, 2**32 - 1), st.binary(max_size=300)), max_size=10),
       st.integers(min_value=1, max_value=50))
def test_any_chunking_of_valid_frames_decodes_identically(items, step):
    raw = b"".join(frames.encode(t, sid, p) for t, sid, p in items)
    dec = FrameDecoder()
    got = []
    for i in range(0, len(raw), step):
        got += dec.feed(raw[i:i + step])
    assert [(f.type, f.stream_id, f.payload) for f in got] == [(t, s, p) for t, s, p in items]
