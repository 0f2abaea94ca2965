"""The receive-side DATA fast path (``ambient.hbone.rxframes``) is equivalent to h2.

Two servers get the same random frame sequences (interleaved streams, padding, END_STREAM,
empty frames, RST_STREAM both ways, WINDOW_UPDATE, PING, unknown streams, oversized frames,
flow-control violations, unfinished header blocks), one with the fast path and one parsing
everything with h2. Cut at random points, they must deliver the same bytes per stream, the
same other events in the same order, and fail with the same error code. Fed whole frames and
acknowledging everything, they must also write byte-identical output and end with identical
windows.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from typing import Any

import hpack
import hyperframe.frame as hf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.hbone.protocol import (
    HboneEvent,
    HboneProtocolError,
    HboneServerProtocol,
    HboneSettings,
    StreamData,
)
from ambient.hbone.rxframes import InboundFramer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROPS = settings(max_examples=int(os.environ.get("HBONE_FUZZ_EXAMPLES", "300")), deadline=5000,
                 suppress_health_check=[HealthCheck.too_slow])
SMALL = HboneSettings(stream_window=6000, connection_window=40_000, max_frame_size=16_384)


def make_server(fast: bool, cfg: HboneSettings = SMALL) -> HboneServerProtocol:
    srv = HboneServerProtocol(cfg)
    if not fast:
        srv._rx = None
    else:
        assert isinstance(srv._rx, InboundFramer)
    srv.initiate()
    srv.data_to_send()
    return srv


def frames(rng: random.Random) -> list[bytes]:
    """A random client frame sequence (each element one serialized frame)."""
    enc = hpack.Encoder()
    out = [PREFACE + hf.SettingsFrame(0).serialize()]
    opened: list[int] = []
    next_sid = 1
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.15 or not opened:
            sid = next_sid
            next_sid += 2
            opened.append(sid)
            block = enc.encode([(":method", "CONNECT"), (":authority", f"10.0.0.{sid % 250}:80")])
            f: Any = hf.HeadersFrame(sid, block)
            f.flags.add("END_HEADERS")
            if rng.random() < 0.01:
                f.flags.discard("END_HEADERS")  # unfinished block: a DATA next is an error
        elif r < 0.75:
            sid = rng.choice(opened) if rng.random() < 0.99 else rng.choice([0, next_sid, 2])
            size = rng.choice([0, 1, 7, 100, 1000, 2500]) if rng.random() < 0.995 else 17_000
            f = hf.DataFrame(sid or 1, rng.randbytes(size))
            if rng.random() < 0.2:
                f.flags.add("PADDED")
                f.pad_length = rng.randint(0, 40)
            if rng.random() < 0.05:
                f.flags.add("END_STREAM")
        elif r < 0.83:
            f = hf.RstStreamFrame(rng.choice(opened), error_code=rng.choice([0, 8]))
        elif r < 0.91:
            f = hf.WindowUpdateFrame(rng.choice([0, *opened]), window_increment=1000)
        else:
            f = hf.PingFrame(0, opaque_data=rng.randbytes(8))
        raw = f.serialize()
        if isinstance(f, hf.DataFrame) and sid == 0:  # hyperframe refuses to build this one
            raw = raw[:5] + bytes(4) + raw[9:]
        out.append(raw)
    return out


def cuts(rng: random.Random, data: bytes) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 3, 9, 10, 64, 700, 4096, 20_000])
        pieces.append(data[pos:pos + n])
        pos += n
    return pieces


class Outcome:
    """What a server made of a byte stream: data per stream, other events, the error."""

    def __init__(self) -> None:
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.events: list[HboneEvent] = []
        self.error: int | None = None

    def take(self, events: list[HboneEvent]) -> None:
        for ev in events:
            if isinstance(ev, StreamData):
                assert isinstance(ev.data, bytes) and len(ev.data) <= ev.flow_controlled_length
                self.data[ev.stream_id] += ev.data
            else:
                self.events.append(ev)


def run(srv: HboneServerProtocol, pieces: list[bytes], *, ack: bool) -> Outcome:
    o = Outcome()
    for piece in pieces:
        try:
            events = srv.receive_data(piece)
        except HboneProtocolError as e:
            o.error = e.error_code
            break
        o.take(events)
        if ack:
            for ev in events:
                if isinstance(ev, StreamData):
                    srv.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
    return o


@PROPS
@given(st.integers(0, 2**32))
def test_random_cuts_same_events_and_errors(seed: int) -> None:
    rng = random.Random(seed)
    data = b"".join(frames(rng))
    pieces = cuts(rng, data)
    fast, slow = run(make_server(True), pieces, ack=False), run(make_server(False), pieces,
                                                                ack=False)
    assert fast.error == slow.error
    if fast.error is None:  # after an error neither delivers that read's events
        assert fast.data == slow.data
        assert fast.events == slow.events


@PROPS
@given(st.integers(0, 2**32))
def test_whole_frames_identical_output_and_windows(seed: int) -> None:
    rng = random.Random(seed)
    pieces = frames(rng)
    servers = [make_server(True), make_server(False)]
    outs, wire = [], []
    for srv in servers:
        outs.append(run(srv, pieces, ack=True))
        wire.append(srv.data_to_send())
    fast, slow = outs
    assert (fast.error, dict(fast.data), fast.events) == (slow.error, dict(slow.data), slow.events)
    assert wire[0] == wire[1]
    a, b = (s._h2 for s in servers)
    assert a._inbound_flow_control_window_manager.current_window_size == \
        b._inbound_flow_control_window_manager.current_window_size
    for sid, stream in a.streams.items():
        other = b.streams[sid]
        assert stream.state_machine.state == other.state_machine.state
        assert stream._inbound_window_manager.current_window_size == \
            other._inbound_window_manager.current_window_size


def open_streams(srv: HboneServerProtocol, n: int) -> hpack.Encoder:
    enc = hpack.Encoder()
    wire = PREFACE + hf.SettingsFrame(0).serialize()
    for sid in range(1, 2 * n, 2):
        f = hf.HeadersFrame(sid, enc.encode([(":method", "CONNECT"), (":authority", "1.2.3.4:80")]))
        f.flags.add("END_HEADERS")
        wire += f.serialize()
    srv.receive_data(wire)
    return enc


def test_payload_delivered_as_it_arrives_without_copy() -> None:
    srv = make_server(True, HboneSettings())
    open_streams(srv, 1)
    payload = os.urandom(300_000)
    frame = hf.DataFrame(1, payload).serialize()
    head, middle, tail = frame[:1009], frame[1009:200_009], frame[200_009:]
    first = srv.receive_data(head)
    assert first == [StreamData(1, payload[:1000], 1000)]
    got = srv.receive_data(middle)
    assert len(got) == 1 and got[0].data is middle  # the read itself, not a copy
    last = srv.receive_data(tail)
    assert first[0].data + got[0].data + last[0].data == payload


def test_flow_control_violation_is_a_connection_error_with_goaway() -> None:
    srv = make_server(True)
    open_streams(srv, 1)
    srv.data_to_send()
    with pytest.raises(HboneProtocolError) as e:
        srv.receive_data(hf.DataFrame(1, b"x" * (SMALL.stream_window + 1)).serialize()[:20])
    assert e.value.error_code == 3  # FLOW_CONTROL_ERROR
    goaway = srv.data_to_send()
    assert goaway[3] == 0x7  # GOAWAY queued
    assert srv.receive_data(b"more") == []


def test_stream_reset_locally_mid_frame_drops_rest_and_returns_connection_window() -> None:
    srv = make_server(True, HboneSettings())
    open_streams(srv, 2)
    frame = hf.DataFrame(1, b"a" * 50_000).serialize()
    assert srv.receive_data(frame[:10_009])[0].data == b"a" * 10_000
    srv.reset_stream(1)
    assert srv.receive_data(frame[10_009:]) == []  # dropped, not delivered
    conn = srv._h2._inbound_flow_control_window_manager
    assert conn._bytes_processed == 40_000  # the dropped bytes were acknowledged
    srv.acknowledge_received_data(1, 10_000)
    assert srv.receive_data(hf.DataFrame(3, b"b").serialize()) == [StreamData(3, b"b", 1)]
