"""Sans-I/O HBONE protocol: authority parsing, request validation, statuses, half-close,
flow control, keepalive and the settings we send. A raw ``h2`` connection plays the peer."""

from __future__ import annotations

import ipaddress

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from ambient.hbone.protocol import (
    CONNECTION_WINDOW,
    ILLEGAL_PORTS,
    AuthorityError,
    ConnectionLost,
    ConnectRequest,
    ConnectResponse,
    ErrorCode,
    HboneClientProtocol,
    HboneServerProtocol,
    HboneSettings,
    RequestRejected,
    StreamData,
    StreamEnded,
    StreamGone,
    StreamReset,
    StreamWritable,
    build_request_headers,
    format_authority,
    make_traceparent,
    parse_authority,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# -- authority ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("10.0.0.1:80", V4("10.0.0.1"), 80),
        ("127.0.0.1:65535", V4("127.0.0.1"), 65535),
        ("[::1]:8080", V6("::1"), 8080),
        ("[fd00:10:244::5]:9090", V6("fd00:10:244::5"), 9090),
        ("[::ffff:10.0.0.1]:1", V6("::ffff:10.0.0.1"), 1),
    ],
)
def test_parse_authority_valid(authority: str, host: object, port: int) -> None:
    assert parse_authority(authority) == (host, port)
    assert parse_authority(format_authority(host, port)) == (host, port)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "authority",
    [
        "", "10.0.0.1", "10.0.0.1:", ":80", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:99999999",
        "10.0.0.1:http", "10.0.0.1:+80", "10.0.0.1:-1", "10.0.0.1: 80", " 10.0.0.1:80",
        "10.0.0.256:80", "010.0.0.1:80", "::1:80", "[::1]", "[::1:80", "::1]:80",
        "[10.0.0.1]:80", "[fe80::1%eth0]:80", "example.com:80", "10.0.0.1:80:80", "[]:80",
        "10.0.0.1:٨٠",
    ],
)
def test_parse_authority_invalid(authority: str) -> None:
    with pytest.raises(AuthorityError) as ei:
        parse_authority(authority)
    assert ei.value.status == 400


def test_parse_authority_hostnames_only_when_allowed() -> None:
    assert parse_authority("Svc.NS.svc.cluster.local:80", allow_hostname=True) == (
        "svc.ns.svc.cluster.local", 80)
    with pytest.raises(AuthorityError):
        parse_authority("bad_name!:80", allow_hostname=True)


def test_request_headers_and_traceparent() -> None:
    tp = make_traceparent()
    parts = tp.split("-")
    assert [len(p) for p in parts] == [2, 32, 16, 2] and parts[0] == "00"
    assert make_traceparent() != tp
    h = dict(build_request_headers("10.0.0.1:80", baggage="k8s.namespace.name=a",
                                   forwarded_for="10.0.0.9:5555", traceparent=tp))
    assert h == {":method": "CONNECT", ":authority": "10.0.0.1:80",
                 "baggage": "k8s.namespace.name=a", "forwarded": 'for="10.0.0.9:5555"',
                 "traceparent": tp}
    assert ":path" not in h and ":scheme" not in h


# -- harness --------------------------------------------------------------------------------


def raw_peer(client_side: bool) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=client_side, header_encoding=None, validate_outbound_headers=False,
        validate_inbound_headers=False))
    c.initiate_connection()
    return c


def exchange(ours, peer: h2.connection.H2Connection, now: float = 0.0):
    """Move bytes both ways until quiet; returns (our events, peer events)."""
    mine: list = []
    theirs: list = []
    for _ in range(50):
        a = peer.data_to_send()
        if a:
            mine += ours.receive_data(a, now)
        b = ours.data_to_send()
        if b:
            theirs += peer.receive_data(b)
        if not a and not b:
            break
    return mine, theirs


def server_with_raw_client():
    srv = HboneServerProtocol()
    srv.initiate()
    cli = raw_peer(client_side=True)
    exchange(srv, cli)
    return srv, cli


def pair():
    cli, srv = HboneClientProtocol(), HboneServerProtocol()
    cli.initiate()
    srv.initiate()
    pump(cli, srv)
    return cli, srv


def pump(cli, srv, now: float = 0.0):
    ce: list = []
    se: list = []
    for _ in range(100):
        a = cli.data_to_send()
        if a:
            se += srv.receive_data(a, now)
        b = srv.data_to_send()
        if b:
            ce += cli.receive_data(b, now)
        if not a and not b:
            break
    return ce, se


# -- request validation ------------------------------------------------------------------


OK = "ok"
RESET = "reset"


@pytest.mark.parametrize(
    ("headers", "expect"),
    [
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80")], OK),
        ([(":method", "CONNECT"), (":authority", "[fd00::1]:80"), ("baggage", "a=b")], OK),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"),
          (":authority", "10.0.0.1:80")], 400),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"),
          (":authority", "10.0.0.1:80")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")], RESET),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":scheme", "https")], RESET),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":protocol", "x")], RESET),
        ([(":method", "CONNECT")], RESET),
        ([(":authority", "10.0.0.1:80")], RESET),
        ([("x", "y"), (":method", "CONNECT"), (":authority", "10.0.0.1:80")], RESET),
        ([(":method", "CONNECT"), (":method", "CONNECT"), (":authority", "10.0.0.1:80")],
         RESET),
        ([(":method", "CONNECT"), (":authority", "example.com:80")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:0")], 400),
        *[([(":method", "CONNECT"), (":authority", f"10.0.0.1:{p}")], 503)
          for p in sorted(ILLEGAL_PORTS)],
    ],
)
def test_request_validation(headers: list[tuple[str, str]], expect: object) -> None:
    srv, cli = server_with_raw_client()
    cli.send_headers(1, headers)
    events, peer_events = exchange(srv, cli)
    if expect == OK:
        (req,) = events
        assert isinstance(req, ConnectRequest)
        assert req.authority == dict(headers)[":authority"]
        assert req.headers == {k: v for k, v in headers if not k.startswith(":")}
        return
    (rej,) = events
    assert isinstance(rej, RequestRejected) and rej.reason
    if expect == RESET:
        assert rej.status is None and rej.error_code == ErrorCode.PROTOCOL_ERROR
        resets = [e for e in peer_events if isinstance(e, h2.events.StreamReset)]
        assert resets and resets[0].error_code == ErrorCode.PROTOCOL_ERROR
    else:
        assert rej.status == expect
        (resp,) = [e for e in peer_events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == str(expect).encode()
        assert any(isinstance(e, h2.events.StreamEnded) for e in peer_events)
    # the connection is still usable for the next stream
    cli.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    events, _ = exchange(srv, cli)
    assert [type(e) for e in events] == [ConnectRequest]


# -- statuses and half-close -------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 401, 503])
def test_status_round_trip(status: int) -> None:
    cli, srv = pair()
    sid = cli.connect("10.0.0.1:80", [("traceparent", make_traceparent())])
    _, se = pump(cli, srv)
    assert isinstance(se[0], ConnectRequest) and se[0].stream_id == sid
    srv.respond(sid, status, [("baggage", "k8s.cluster.name=c1")])
    ce, _ = pump(cli, srv)
    resp = ce[0]
    assert isinstance(resp, ConnectResponse)
    assert (resp.status, resp.headers) == (status, {"baggage": "k8s.cluster.name=c1"})
    if status == 200:
        assert ce[1:] == []
    else:
        assert ce[1:] == [StreamEnded(sid)]
        with pytest.raises(StreamGone):
            srv.send_data(sid, b"x")


def test_respond_rejects_odd_status() -> None:
    cli, srv = pair()
    sid = cli.connect("10.0.0.1:80")
    pump(cli, srv)
    with pytest.raises(ValueError):
        srv.respond(sid, 302)


def _open(cli, srv) -> int:
    sid = cli.connect("10.0.0.1:80")
    pump(cli, srv)
    srv.respond(sid, 200)
    pump(cli, srv)
    return sid


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_each_direction(first: str) -> None:
    cli, srv = pair()
    sid = _open(cli, srv)
    a, b = (cli, srv) if first == "client" else (srv, cli)
    a.send_data(sid, b"last words")
    a.end_stream(sid)
    ce, se = pump(cli, srv)
    got = se if first == "client" else ce
    assert got == [StreamData(sid, b"last words", 10), StreamEnded(sid)]
    # the other direction still flows
    b.send_data(sid, b"reply")
    ce, se = pump(cli, srv)
    got = ce if first == "client" else se
    assert got == [StreamData(sid, b"reply", 5)]
    b.end_stream(sid)
    ce, se = pump(cli, srv)
    assert (ce if first == "client" else se) == [StreamEnded(sid)]
    with pytest.raises(StreamGone):
        a.send_data(sid, b"too late")


def test_reset_reaches_peer() -> None:
    cli, srv = pair()
    sid = _open(cli, srv)
    cli.send_data(sid, b"x" * (5 << 20))
    cli.reset_stream(sid, ErrorCode.CANCEL)
    assert cli.buffered(sid) == 0
    _, se = pump(cli, srv)
    assert StreamReset(sid, ErrorCode.CANCEL, True) in se


# -- flow control --------------------------------------------------------------------------


def test_send_beyond_window_buffers_and_resumes_on_window_update() -> None:
    cli, srv = pair()
    sid = _open(cli, srv)
    total = 10 * 1024 * 1024
    assert cli.available_window(sid) == 4 * 1024 * 1024
    cli.send_data(sid, b"a" * total)
    cli.end_stream(sid)  # deferred until the buffer drains
    assert cli.buffered(sid) == total - 4 * 1024 * 1024
    assert cli.available_window(sid) == 0
    received = 0
    writable = False
    ended = False
    for _ in range(100):
        ce, se = pump(cli, srv)
        writable |= StreamWritable(sid) in ce
        for e in se:
            if isinstance(e, StreamData):
                received += len(e.data)
                srv.acknowledge_received_data(sid, e.flow_controlled_length)
            ended |= isinstance(e, StreamEnded)
        if ended:
            break
    assert received == total and ended and writable and cli.buffered(sid) == 0


def test_no_ack_means_sender_stalls() -> None:
    cli, srv = pair()
    sid = _open(cli, srv)
    cli.send_data(sid, b"b" * (6 << 20))
    _, se = pump(cli, srv)
    assert sum(len(e.data) for e in se if isinstance(e, StreamData)) == 4 << 20
    pump(cli, srv)
    assert cli.buffered(sid) == 2 << 20  # nothing moves until the receiver acknowledges


# -- keepalive -----------------------------------------------------------------------------


def test_ping_after_idle_and_connection_lost_without_ack() -> None:
    srv = HboneServerProtocol(now=0.0)
    srv.initiate()
    peer = raw_peer(client_side=True)
    exchange(srv, peer, now=0.0)
    srv.data_to_send()
    assert srv.tick(9.9) == [] and srv.data_to_send() == b""
    assert srv.next_tick_at() == pytest.approx(10.0)
    assert srv.tick(10.0) == []
    pings = [e for e in peer.receive_data(srv.data_to_send())
             if isinstance(e, h2.events.PingReceived)]
    assert len(pings) == 1
    peer.clear_outbound_data_buffer()  # the peer's ack is lost
    assert srv.tick(29.9) == []
    assert srv.tick(30.0) == [ConnectionLost("no PING ack within 20s")]
    assert srv.closed


def test_ping_ack_keeps_connection() -> None:
    cli = HboneClientProtocol(now=0.0)
    cli.initiate()
    peer = raw_peer(client_side=False)
    exchange(cli, peer, now=0.0)
    cli.tick(10.0)
    exchange(cli, peer, now=11.0)  # the peer's h2 acks automatically
    assert cli.tick(40.0) == []  # 29 s idle since the ack: a new PING goes out, no loss
    assert not cli.closed
    assert any(isinstance(e, h2.events.PingReceived) for e in peer.receive_data(
        cli.data_to_send()))


def test_traffic_postpones_ping() -> None:
    srv, cli = server_with_raw_client()
    srv.data_to_send()
    cli.ping(b"12345678")
    srv.receive_data(cli.data_to_send(), 8.0)
    srv.data_to_send()
    assert srv.tick(12.0) == [] and srv.data_to_send() == b""
    assert srv.next_tick_at() == pytest.approx(18.0)


# -- settings on the wire ------------------------------------------------------------------


def _settings_seen_by_peer(ours) -> tuple[dict[int, int], int]:
    peer = raw_peer(client_side=not ours.client_side)
    ours.initiate()
    events = peer.receive_data(ours.data_to_send())
    (settings,) = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    values = {int(k): v.new_value for k, v in settings.changed_settings.items()}
    conn_window = sum(e.delta for e in events
                      if isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0)
    return values, conn_window


def test_server_settings_frame() -> None:
    values, conn_window = _settings_seen_by_peer(HboneServerProtocol())
    S = h2.settings.SettingCodes
    assert values[S.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
    assert values[S.MAX_FRAME_SIZE] == 1024 * 1024
    assert values[S.MAX_HEADER_LIST_SIZE] == 16 * 1024
    assert values[S.MAX_CONCURRENT_STREAMS] == 200
    assert values[S.ENABLE_PUSH] == 0
    assert S.ENABLE_CONNECT_PROTOCOL not in values
    assert conn_window + 65_535 == CONNECTION_WINDOW


def test_client_settings_frame() -> None:
    values, conn_window = _settings_seen_by_peer(HboneClientProtocol())
    S = h2.settings.SettingCodes
    assert values[S.INITIAL_WINDOW_SIZE] == 4 * 1024 * 1024
    assert values[S.MAX_FRAME_SIZE] == 1024 * 1024
    assert values[S.ENABLE_PUSH] == 0
    assert conn_window + 65_535 == CONNECTION_WINDOW


def test_client_respects_server_max_concurrent_streams() -> None:
    cli = HboneClientProtocol()
    srv = HboneServerProtocol(HboneSettings(max_concurrent_streams=2))
    cli.initiate()
    srv.initiate()
    pump(cli, srv)
    assert cli.peer_max_concurrent_streams == 2
    cli.connect("10.0.0.1:80")
    assert cli.can_open_stream
    cli.connect("10.0.0.1:80")
    assert not cli.can_open_stream
