"""Property tests: untrusted bytes and frame sequences into the HBONE protocol never raise
anything but ``HboneProtocolError`` and always return (no hang)."""

from __future__ import annotations

import os

import hpack
import hyperframe.frame as hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.hbone.protocol import (
    ConnectRequest,
    ConnectResponse,
    HboneClientProtocol,
    HboneError,
    HboneProtocolError,
    HboneServerProtocol,
    StreamData,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HBONE_FUZZ_EXAMPLES=5000 for a deeper local run.
FUZZ = settings(max_examples=int(os.environ.get("HBONE_FUZZ_EXAMPLES", "300")), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow])


def _feed(proto, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            events = proto.receive_data(chunk, 0.0)
        except HboneProtocolError:
            assert proto.closed
            assert proto.receive_data(b"\x00" * 9, 0.0) == []  # stays quiet afterwards
            proto.data_to_send()
            return
        _react(proto, events)
        proto.data_to_send()
        proto.tick(100.0)


def _react(proto, events) -> None:
    """Exercise the caller-side API the way an edge would, tolerating StreamGone."""
    for e in events:
        try:
            if isinstance(e, ConnectRequest):
                proto.respond(e.stream_id, 200 if e.stream_id % 3 else 401)
                proto.send_data(e.stream_id, b"x" * 70_000)
            elif isinstance(e, StreamData):
                proto.acknowledge_received_data(e.stream_id, e.flow_controlled_length)
                proto.end_stream(e.stream_id)
            elif isinstance(e, ConnectResponse):
                proto.send_data(e.stream_id, b"y")
        except HboneError:
            pass


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_server_random_bytes(chunks: list[bytes]) -> None:
    srv = HboneServerProtocol()
    srv.initiate()
    _feed(srv, [PREFACE, *chunks])


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_client_random_bytes(chunks: list[bytes]) -> None:
    cli = HboneClientProtocol()
    cli.initiate()
    cli.connect("10.0.0.1:80")
    _feed(cli, chunks)


_HEADER_CHOICES = [
    (":method", "CONNECT"), (":method", "GET"), (":authority", "10.0.0.1:80"),
    (":authority", "[::1]:15008"), (":authority", "bad"), (":path", "/"), (":scheme", "https"),
    (":protocol", "websocket"), (":status", "200"), ("baggage", "a=b"), ("Forwarded", "x"),
    ("te", "trailers"), ("connection", "close"), ("", ""), (":authority", ""),
]

_stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])
_flags = st.sets(st.sampled_from(["END_STREAM", "END_HEADERS", "ACK", "PADDED", "PRIORITY"]))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(
        ["headers", "headers", "data", "rst", "window", "settings", "ping", "goaway",
         "priority", "continuation", "push"]))
    sid = draw(_stream_ids)
    if kind == "headers":
        f = hf.HeadersFrame(sid or 1)
        hdrs = draw(st.lists(st.sampled_from(_HEADER_CHOICES), max_size=6))
        f.data = hpack.Encoder().encode(hdrs)
        f.flags = set(draw(st.sets(st.sampled_from(["END_STREAM", "END_HEADERS"]))))
    elif kind == "data":
        f = hf.DataFrame(sid or 1, data=draw(st.binary(max_size=100)))
        f.flags = set(draw(st.sets(st.sampled_from(["END_STREAM"]))))
    elif kind == "rst":
        f = hf.RstStreamFrame(sid or 1, error_code=draw(st.integers(0, 15)))
    elif kind == "window":
        f = hf.WindowUpdateFrame(sid, window_increment=draw(st.integers(0, 2**31 - 1)))
    elif kind == "settings":
        ack = draw(st.booleans())
        f = hf.SettingsFrame(0, settings={} if ack else draw(st.dictionaries(
            st.integers(1, 9), st.integers(0, 2**32 - 1), max_size=4)))
        if ack:
            f.flags.add("ACK")
    elif kind == "ping":
        f = hf.PingFrame(0, opaque_data=draw(st.binary(min_size=8, max_size=8)))
    elif kind == "goaway":
        f = hf.GoAwayFrame(0, last_stream_id=draw(st.integers(0, 9)),
                           error_code=draw(st.integers(0, 15)))
    elif kind == "priority":
        f = hf.PriorityFrame(sid or 1, depends_on=draw(_stream_ids))
    elif kind == "continuation":
        f = hf.ContinuationFrame(sid or 1, data=draw(st.binary(max_size=20)))
    else:
        f = hf.PushPromiseFrame(sid or 1, promised_stream_id=2)
    return f.serialize()


@FUZZ
@given(st.lists(frames(), max_size=25), st.integers(1, 64))
def test_server_random_frame_sequences(seq: list[bytes], split: int) -> None:
    srv = HboneServerProtocol()
    srv.initiate()
    blob = PREFACE + hf.SettingsFrame(0).serialize() + b"".join(seq)
    # deliver in arbitrary chunk sizes: framing must not depend on read boundaries
    chunks = [blob[i : i + split * 7] for i in range(0, len(blob), split * 7)]
    _feed(srv, chunks)


@FUZZ
@given(st.lists(frames(), max_size=25))
def test_client_random_frame_sequences(seq: list[bytes]) -> None:
    cli = HboneClientProtocol()
    cli.initiate()
    cli.connect("10.0.0.1:80")
    cli.connect("10.0.0.2:80")
    _feed(cli, [hf.SettingsFrame(0).serialize(), *seq])
