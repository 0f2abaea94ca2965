"""ambient.grpclite: the pure helpers (table-tested) and the sans-I/O core against an h2 server.

The core is driven by a real h2 server-side connection in memory: bytes go back and forth,
nothing is mocked, and every assertion is about what either side observes on the wire.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.grpclite import (
    CallState,
    ClientCore,
    GrpcError,
    MessageDecoder,
    StatusCode,
    call_status,
    encode_timeout,
    frame_message,
    request_headers,
    response_problem,
    status_for_http,
    status_for_reset,
)

ROOT = Path(__file__).resolve().parents[2]

# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "value"), [
    (0.0, "1n"), (1e-9, "1n"), (0.05, "50000000n"), (0.1, "100000u"), (1.0, "1000000u"),
    (10.0, "10000000u"), (60.0, "60000000u"), (1000.0, "1000000m"), (100_000.0, "100000S"),
    (100_000_000.0, "1666667M"), (1e12, "99999999H"),
])
def test_encode_timeout(seconds: float, value: str) -> None:
    assert encode_timeout(seconds) == value


def test_encode_timeout_never_shortens_the_deadline() -> None:
    scale = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "S": 1.0, "M": 60.0, "H": 3600.0}
    for seconds in (0.3, 1.5, 2.999999, 7.25, 12345.678, 3e7):
        text = encode_timeout(seconds)
        assert len(text) <= 9 and int(text[:-1]) * scale[text[-1]] >= seconds * (1 - 1e-12)


def test_framing_round_trip_and_limits() -> None:
    wire = frame_message(b"abc") + frame_message(b"") + frame_message(b"x" * 300)
    assert wire[:5] == b"\x00\x00\x00\x00\x03"
    dec = MessageDecoder(limit=300)
    out: list[bytes] = []
    for i in range(len(wire)):  # one byte at a time
        out += dec.feed(wire[i:i + 1])
    assert out == [b"abc", b"", b"x" * 300] and not dec.partial
    with pytest.raises(GrpcError) as big:
        MessageDecoder(limit=299).feed(frame_message(b"x" * 300)[:5])
    assert big.value.code is StatusCode.RESOURCE_EXHAUSTED and "limit of 299" in big.value.details
    with pytest.raises(GrpcError, match="compressed") as comp:
        MessageDecoder().feed(b"\x01\x00\x00\x00\x01a")
    assert comp.value.code is StatusCode.INTERNAL


@given(st.lists(st.binary(max_size=70), max_size=8), st.lists(st.integers(1, 40), max_size=30))
def test_decoder_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame_message(m) for m in messages)
    dec, out, pos = MessageDecoder(limit=70), [], 0
    for n in cuts:
        out += dec.feed(wire[pos:pos + n])
        pos += n
    out += dec.feed(wire[pos:])
    assert out == messages and not dec.partial


def test_request_headers_and_metadata_validation() -> None:
    hdrs = request_headers("/s/M", "cp:15012", "https",
                           [("authorization", "Bearer t"), ("x_tenant", "a")], 1.0)
    assert hdrs[:6] == [(":method", "POST"), (":scheme", "https"), (":path", "/s/M"),
                        (":authority", "cp:15012"), ("content-type", "application/grpc"),
                        ("te", "trailers")]
    assert ("grpc-timeout", "1000000u") in hdrs and ("x_tenant", "a") in hdrs
    for bad in [("X-Upper", "v"), ("grpc-status", "0"), ("te", "x"), ("k-bin", "v"),
                (":path", "/x"), ("ok", "new\nline"), ("ok", "caf\u00e9")]:
        with pytest.raises(GrpcError) as e:
            request_headers("/s/M", "a:1", "http", [bad])
        assert e.value.code is StatusCode.INTERNAL and repr(bad[0]) in e.value.details


@pytest.mark.parametrize(("status", "code"), [
    (400, StatusCode.INTERNAL), (401, StatusCode.UNAUTHENTICATED),
    (403, StatusCode.PERMISSION_DENIED), (404, StatusCode.UNIMPLEMENTED),
    (429, StatusCode.UNAVAILABLE), (502, StatusCode.UNAVAILABLE), (503, StatusCode.UNAVAILABLE),
    (504, StatusCode.UNAVAILABLE), (500, StatusCode.UNKNOWN), (302, StatusCode.UNKNOWN),
])
def test_http_status_mapping(status: int, code: StatusCode) -> None:
    assert status_for_http(status) is code
    problem = response_problem({":status": str(status)})
    assert problem is not None and problem.code is code


@pytest.mark.parametrize(("error", "code"), [
    (h2.errors.ErrorCodes.NO_ERROR, StatusCode.INTERNAL),
    (h2.errors.ErrorCodes.PROTOCOL_ERROR, StatusCode.INTERNAL),
    (h2.errors.ErrorCodes.REFUSED_STREAM, StatusCode.UNAVAILABLE),
    (h2.errors.ErrorCodes.CANCEL, StatusCode.CANCELLED),
    (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, StatusCode.RESOURCE_EXHAUSTED),
    (h2.errors.ErrorCodes.INADEQUATE_SECURITY, StatusCode.PERMISSION_DENIED),
    (0x99, StatusCode.INTERNAL),
])
def test_reset_mapping(error: int, code: StatusCode) -> None:
    assert status_for_reset(error) is code


def test_response_headers_and_trailers() -> None:
    ok = {":status": "200", "content-type": "application/grpc+proto"}
    assert response_problem(ok) is None
    html = response_problem({":status": "200", "content-type": "text/html"})
    assert html is not None and html.code is StatusCode.UNKNOWN and "text/html" in html.details
    # Trailers-only: grpc-status decides, even beside a non-200 status.
    assert response_problem({":status": "503", "grpc-status": "7"}) is None
    assert call_status({"grpc-status": "7", "grpc-message": "no%20way%3A caf%C3%A9"}) == (
        StatusCode.PERMISSION_DENIED, "no way: caf\u00e9")
    assert call_status({"grpc-status": "0"}) == (StatusCode.OK, "")
    assert call_status({})[0] is StatusCode.UNKNOWN
    assert call_status(None)[0] is StatusCode.UNKNOWN
    assert call_status({"grpc-status": "99"})[0] is StatusCode.UNKNOWN
    assert call_status({"grpc-status": "x"})[0] is StatusCode.UNKNOWN


# -- the core against an in-memory h2 server ------------------------------------------------


class Server:
    """An h2 server connection wired to a ClientCore by explicit byte exchange."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        core.initiate()
        self.exchange()

    def exchange(self) -> list[CallState]:
        """Move bytes both ways until quiet; the calls the client saw change."""
        changed: list[CallState] = []
        for _ in range(50):
            c2s, s2c = self.core.data_to_send(), self.h2.data_to_send()
            if not c2s and not s2c:
                return changed
            if c2s:
                self.events += self.h2.receive_data(c2s)
            if s2c:
                changed += self.core.receive(s2c)
        raise AssertionError("the peers never went quiet")

    def of(self, kind: type) -> list[h2.events.Event]:
        return [e for e in self.events if isinstance(e, kind)]

    def respond(self, sid: int, end: bool = False, **extra: str) -> None:
        hdrs = [(":status", "200"), ("content-type", "application/grpc"), *extra.items()]
        self.h2.send_headers(sid, hdrs, end_stream=end)

    def trailers(self, sid: int, status: int = 0, message: str = "") -> None:
        hdrs = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
        self.h2.send_headers(sid, hdrs, end_stream=True)


def received(server: Server, sid: int) -> bytes:
    return b"".join(e.data for e in server.of(h2.events.DataReceived)  # type: ignore[attr-defined]
                    if e.stream_id == sid)  # type: ignore[attr-defined]


def test_unary_exchange_headers_and_status() -> None:
    core = ClientCore("cp:15012", "https")
    srv = Server(core)
    call = core.start_call("/pkg.S/M", [("authorization", "Bearer t")], timeout=2.0)
    core.send(call, b"req", end=True)
    srv.exchange()
    [req] = srv.of(h2.events.RequestReceived)
    headers = dict(req.headers)  # type: ignore[attr-defined]
    assert headers[":path"] == "/pkg.S/M" and headers["te"] == "trailers"
    assert headers["authorization"] == "Bearer t" and headers["grpc-timeout"] == "2000000u"
    assert received(srv, call.stream_id) == frame_message(b"req")
    assert srv.of(h2.events.StreamEnded)  # the client half-closed
    srv.respond(call.stream_id)
    srv.h2.send_data(call.stream_id, frame_message(b"resp"))
    srv.trailers(call.stream_id)
    assert call in srv.exchange()
    assert list(call.messages) == [b"resp"] and call.status == (StatusCode.OK, "")
    assert core.calls == {}


def test_trailers_only_error_and_http_error() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    first, second = core.start_call("/s/A"), core.start_call("/s/B")
    srv.exchange()
    srv.h2.send_headers(first.stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                          ("grpc-status", "16"), ("grpc-message", "bad%20token")],
                        end_stream=True)
    srv.h2.send_headers(second.stream_id, [(":status", "503"), ("content-type", "text/plain")])
    srv.h2.send_data(second.stream_id, b"<html>down</html>", end_stream=True)
    srv.exchange()
    assert first.status == (StatusCode.UNAUTHENTICATED, "bad token")
    assert second.status is not None and second.status[0] is StatusCode.UNAVAILABLE
    assert "HTTP 503" in second.status[1]
    # The client reset the stream it gave up on.
    assert [e.stream_id for e in srv.of(h2.events.StreamReset)] == [  # type: ignore[attr-defined]
        second.stream_id]


def push(srv: Server, sid: int, data: bytes) -> bytes:
    """Send what the server's window allows; the rest."""
    while data:
        n = min(srv.h2.local_flow_control_window(sid), 16384, len(data))
        if n <= 0:
            break
        srv.h2.send_data(sid, data[:n])
        data = data[n:]
    return data


def test_receive_flow_control_follows_the_reader() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    eager, stalled = core.start_call("/s/A"), core.start_call("/s/B")
    srv.exchange()
    srv.respond(eager.stream_id)
    srv.respond(stalled.stream_id)
    srv.exchange()
    assert srv.h2.local_flow_control_window(eager.stream_id) == 1 << 20  # our window
    msgs = [bytes([i]) * 400_000 for i in range(3)]  # 1.2 MB: more than one window
    wire = b"".join(frame_message(m) for m in msgs)

    # A reader that keeps up: acknowledgements flow and everything arrives.
    rest, got = wire, []
    for _ in range(500):
        rest = push(srv, eager.stream_id, rest)
        srv.exchange()
        while eager.messages:
            got.append(eager.messages.popleft())
            core.consumed(eager)
        srv.exchange()
        if not rest:
            break
    assert got == msgs and eager.unacked == 0

    # A reader that does not read: once messages wait, the server runs out of window.
    rest = wire
    for _ in range(500):
        before = len(rest)
        rest = push(srv, stalled.stream_id, rest)
        srv.exchange()
        if len(rest) == before:
            break
    assert rest and len(stalled.messages) >= 2 and stalled.unacked > 0
    while stalled.messages:  # reading hands the window back; the rest can come
        stalled.messages.popleft()
        core.consumed(stalled)
    srv.exchange()
    assert stalled.unacked == 0
    rest = push(srv, stalled.stream_id, rest)
    srv.exchange()
    assert not rest and len(stalled.messages) >= 1


def test_send_waits_for_the_servers_window() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)  # the server keeps h2's default 65535-byte windows
    call = core.start_call("/s/Up")
    payload = b"p" * 200_000
    core.send(call, payload, end=True)
    srv.exchange()
    assert call.sending and len(received(srv, call.stream_id)) == 65535
    acked = 0
    for _ in range(10):  # the server reads and hands the window back, several rounds
        got = len(received(srv, call.stream_id))
        srv.h2.acknowledge_received_data(got - acked, call.stream_id)
        acked = got
        srv.exchange()
        if not call.sending:
            break
    assert received(srv, call.stream_id) == frame_message(payload)
    assert not call.sending and srv.of(h2.events.StreamEnded)


def test_oversized_message_resets_the_stream() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    call = core.start_call("/s/Big", limit=1000)
    srv.exchange()
    srv.respond(call.stream_id)
    srv.h2.send_data(call.stream_id, frame_message(b"z" * 1001)[:200])
    srv.exchange()
    assert call.status is not None and call.status[0] is StatusCode.RESOURCE_EXHAUSTED
    [reset] = srv.of(h2.events.StreamReset)
    assert reset.error_code == h2.errors.ErrorCodes.CANCEL  # type: ignore[attr-defined]


def test_server_reset_and_cancel() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    a, b = core.start_call("/s/A"), core.start_call("/s/B")
    srv.exchange()
    srv.h2.reset_stream(a.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    core.cancel(b)
    srv.exchange()
    assert a.status is not None and a.status[0] is StatusCode.UNAVAILABLE
    assert "REFUSED_STREAM" in a.status[1]
    assert b.status == (StatusCode.CANCELLED, "the call was cancelled")
    resets = {e.stream_id: e.error_code for e in srv.of(h2.events.StreamReset)}  # type: ignore
    assert resets == {b.stream_id: h2.errors.ErrorCodes.CANCEL}


def test_ping_from_the_server_is_acknowledged() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    srv.h2.ping(b"12345678")
    srv.exchange()
    [ack] = srv.of(h2.events.PingAckReceived)
    assert ack.ping_data == b"12345678"  # type: ignore[attr-defined]
    core.ping(b"abcdefgh")
    srv.exchange()
    assert core.ping_acks == [b"abcdefgh"]


def test_graceful_goaway_lets_accepted_calls_finish() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    a, b = core.start_call("/s/A"), core.start_call("/s/B")
    srv.exchange()
    srv.h2.close_connection(last_stream_id=a.stream_id)  # NO_ERROR, b not accepted
    srv.exchange()
    assert not core.accepting and a.status is None
    assert b.status is not None and b.status[0] is StatusCode.UNAVAILABLE
    assert "retry" in b.status[1]
    with pytest.raises(GrpcError) as e:
        core.start_call("/s/C")
    assert e.value.code is StatusCode.UNAVAILABLE and "GOAWAY" in e.value.details
    # h2's server side refuses to send after its own GOAWAY, so the draining server's last
    # frames for the accepted call are built by hand.
    from hyperframe.frame import DataFrame, HeadersFrame

    enc = srv.h2.encoder
    hf = HeadersFrame(a.stream_id)
    hf.data = enc.encode([(":status", "200"), ("content-type", "application/grpc")])
    hf.flags.add("END_HEADERS")
    df = DataFrame(a.stream_id)
    df.data = frame_message(b"done")
    tf = HeadersFrame(a.stream_id)
    tf.data = enc.encode([("grpc-status", "0")])
    tf.flags.add("END_HEADERS")
    tf.flags.add("END_STREAM")
    core.receive(hf.serialize() + df.serialize() + tf.serialize())
    assert a.status == (StatusCode.OK, "") and list(a.messages) == [b"done"]


def test_goaway_with_an_error_ends_every_call() -> None:
    core = ClientCore("a:1", "http")
    srv = Server(core)
    a = core.start_call("/s/A")
    srv.exchange()
    srv.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                            additional_data=b"too_many_pings", last_stream_id=a.stream_id)
    srv.exchange()
    assert core.closed and a.status is not None and a.status[0] is StatusCode.UNAVAILABLE
    assert "ENHANCE_YOUR_CALM: too_many_pings" in a.status[1]


def test_protocol_violation_and_connection_loss_fail_calls() -> None:
    core = ClientCore("a:1", "http")
    Server(core)
    a = core.start_call("/s/A")
    assert core.receive(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00") == [a]
    assert core.closed and a.status is not None and "broke HTTP/2" in a.status[1]
    core2 = ClientCore("a:1", "http")
    Server(core2)
    b = core2.start_call("/s/B")
    assert core2.connection_lost("reset by peer") == [b]
    assert b.status == (StatusCode.UNAVAILABLE, "reset by peer")


def test_ztunnel_main_does_not_import_grpcio_or_the_local_sources() -> None:
    # Memory (perf/README.md): grpcio ~10 MB; YAML and the translator only for local config.
    probe = ("import ztunnel.main, sys; "
             "print(sorted({'grpc', 'yaml', 'ztunnel.sources'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr
