"""Fuzz harnesses for the data-plane parsers: HBONE (HTTP/2 + CONNECT), ZDS, the CNI plugin.

Each harness takes fuzzer bytes, drives one entry point the way its I/O edge does, and lets
any exception other than the entry point's documented error type escape: that is a finding.
It also asserts the documented invariants (state after an error, round trips, bounds).
"""

from __future__ import annotations

import io
import json
import socket

import hpack
import hyperframe.frame as hf

from ambient import zds
from ambient.hbone.protocol import (
    MAX_HEADER_LIST_SIZE,
    AuthorityError,
    ConnectRequest,
    ConnectResponse,
    HboneClientProtocol,
    HboneError,
    HboneProtocolError,
    HboneServerProtocol,
    StreamData,
    format_authority,
    parse_authority,
)
from cni import events, plugin
from fuzz.bytesource import ByteSource, json_like, mutate

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: What one connection may hold in a partly received header block (HEADERS + CONTINUATION).
HEADER_BLOCK_BOUND = 4 * MAX_HEADER_LIST_SIZE + 16 * 1024


# ---------------------------------------------------------------------------- HBONE


def _react(proto: HboneServerProtocol | HboneClientProtocol, evs: list[object]) -> None:
    """Use the caller-side API as an edge would; misuse of a gone stream is StreamGone."""
    for e in evs:
        try:
            if isinstance(e, ConnectRequest) and isinstance(proto, HboneServerProtocol):
                proto.respond(e.stream_id, 200 if e.stream_id % 3 else 401)
                proto.send_data(e.stream_id, b"x" * 1000)
            elif isinstance(e, StreamData):
                proto.acknowledge_received_data(e.stream_id, e.flow_controlled_length)
                if e.stream_id % 2:
                    proto.end_stream(e.stream_id)
            elif isinstance(e, ConnectResponse):
                proto.send_data(e.stream_id, b"y")
        except HboneError:
            pass


def _feed_hbone(proto: HboneServerProtocol | HboneClientProtocol, src: ByteSource,
                blob: bytes) -> None:
    # Read boundaries matter (a frame split anywhere must parse the same), but one byte at a
    # time over a whole input is slow; mix tiny, odd and whole-input chunks.
    step = src.choice((1, 7, 9, 64, 1000, 4096, 1 << 20))
    now = 0.0
    for i in range(0, len(blob), step):
        try:
            evs = proto.receive_data(blob[i : i + step], now)
        except HboneProtocolError:
            assert proto.closed, "HboneProtocolError left the connection open"
            assert proto.receive_data(b"\0" * 9, now) == [], "a dead connection produced events"
            proto.data_to_send()
            return
        _react(proto, list(evs))
        proto.data_to_send()
        now += 3.0
        proto.tick(now)
        pending = proto._h2.incoming_buffer._headers_buffer  # noqa: SLF001 - the bound under test
        held = sum(len(f.data) for f in pending)
        assert held <= HEADER_BLOCK_BOUND, f"{held} bytes of unfinished header block held"


def hbone_server(data: bytes) -> None:
    """``HboneServerProtocol.receive_data`` after the client preface and SETTINGS."""
    src = ByteSource(data)
    srv = HboneServerProtocol()
    srv.initiate()
    srv.data_to_send()
    head = src.u8()
    blob = src.rest()
    if head & 1:  # the bytes start after a well-formed preface + SETTINGS
        blob = PREFACE + hf.SettingsFrame(0).serialize() + blob
    _feed_hbone(srv, src, blob)


def hbone_client(data: bytes) -> None:
    """``HboneClientProtocol.receive_data`` with two CONNECTs open."""
    src = ByteSource(data)
    cli = HboneClientProtocol()
    cli.initiate()
    cli.connect("10.0.0.1:80")
    cli.connect("[fd00::1]:8080", [("baggage", "k=v")])
    cli.data_to_send()
    src.u8()
    _feed_hbone(cli, src, src.rest())


def _frame(kind: str, sid: int, **kw: object) -> bytes:
    f: hf.Frame
    if kind == "headers":
        f = hf.HeadersFrame(sid, data=hpack.Encoder().encode(kw["headers"]))  # type: ignore[arg-type]
        f.flags.add("END_HEADERS")
    elif kind == "data":
        f = hf.DataFrame(sid, data=kw.get("data", b"hello"))  # type: ignore[arg-type]
    elif kind == "window":
        f = hf.WindowUpdateFrame(sid, window_increment=kw.get("inc", 1000))  # type: ignore[arg-type]
    elif kind == "rst":
        f = hf.RstStreamFrame(sid, error_code=8)
    elif kind == "ping":
        f = hf.PingFrame(0, opaque_data=b"12345678")
    elif kind == "goaway":
        f = hf.GoAwayFrame(0, last_stream_id=sid, error_code=0)
    else:
        f = hf.SettingsFrame(0, settings={4: 1 << 20, 3: 100})
    for flag in kw.get("flags", ()):  # type: ignore[attr-defined]
        f.flags.add(flag)
    return f.serialize()


CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080"), ("traceparent", "00-1-2-00"),
           ("forwarded", 'for="10.0.0.1:4000"'), ("baggage", "k8s.namespace.name=a")]


def hbone_server_seeds() -> list[bytes]:
    req = _frame("headers", 1, headers=CONNECT)
    bad = _frame("headers", 3, headers=[(":method", "GET"), (":authority", "a:1"),
                                        (":path", "/"), (":scheme", "http")])
    self_call = _frame("headers", 5,
                       headers=[(":method", "CONNECT"), (":authority", "1.1.1.1:15008")])
    split = hf.HeadersFrame(7, data=hpack.Encoder().encode(CONNECT)).serialize()
    cont = hf.ContinuationFrame(7, data=b"")
    cont.flags.add("END_HEADERS")
    return [
        b"\x07" + req,
        b"\x05" + req + _frame("data", 1) + _frame("window", 1)
        + _frame("data", 1, flags=["END_STREAM"]),
        b"\x03" + req + bad + self_call + _frame("rst", 1) + _frame("ping", 0),
        b"\x01" + split + cont.serialize() + _frame("goaway", 7),
        b"\x00" + PREFACE + _frame("settings", 0) + req,
    ]


def hbone_client_seeds() -> list[bytes]:
    ok = _frame("headers", 1, headers=[(":status", "200")])
    no = _frame("headers", 3, headers=[(":status", "503"), ("x", "y")], flags=["END_STREAM"])
    return [
        b"\x07\x00" + _frame("settings", 0) + ok + _frame("data", 1) + no,
        b"\x01\x00" + _frame("settings", 0) + ok + _frame("window", 0, inc=1 << 20)
        + _frame("goaway", 1),
    ]


def hbone_authority(data: bytes) -> None:
    """``parse_authority`` (IPs; hostnames too when allowed) and its round trip."""
    text = data[1:].decode("utf-8", "replace")
    allow = bool(data[:1] and data[0] & 1)
    try:
        host, port = parse_authority(text, allow_hostname=allow)
    except AuthorityError as e:
        assert e.status == 400
        return
    assert 0 < port < 65536
    assert parse_authority(format_authority(host, port), allow_hostname=allow) == (host, port)


def hbone_authority_seeds() -> list[bytes]:
    return [b"\x00" + s for s in (b"10.0.0.1:80", b"[fd00::1]:15008", b"[fe80::1%eth0]:80",
                                   b"1.2.3.4:65536", b"a.b.svc:80")] + [b"\x01web.ns.svc:8080"]


# ---------------------------------------------------------------------------- ZDS

_FLAGS = (0, socket.MSG_TRUNC, socket.MSG_CTRUNC, socket.MSG_EOR)


def zds_datagram(data: bytes) -> None:
    """``decode_request`` / ``decode_ack`` / ``decode_hello`` with fuzzed fds and flags."""
    src = ByteSource(data)
    head = src.u8()
    fds = list(range(3, 3 + head % 4))
    flags = _FLAGS[(head >> 2) % 4]
    dgram = src.rest()
    try:
        got = zds.decode_request(dgram, fds, flags)
    except zds.ZdsProtocolError:
        pass
    else:  # what decodes re-encodes to something that decodes to the same thing
        again = zds.decode_request(zds.encode_request(got.request), fds, 0)
        assert again == got, (again, got)
        zds.describe(got.request)
    for decode in (zds.decode_ack, zds.decode_hello):
        try:
            decode(dgram, fds, flags)
        except zds.ZdsProtocolError:
            pass


def zds_seeds() -> list[bytes]:
    info = zds.WorkloadInfo("web-1", "default", "web")
    reqs = [zds.Add("uid-1", info), zds.Keep("uid-2"), zds.Del("uid-3"), zds.SnapshotSent()]
    out = [bytes([1]) + zds.encode_request(r) for r in reqs]
    out += [b"\x00" + zds.encode_ack("cannot bind"), b"\x00" + zds.encode_hello()]
    return out


# ---------------------------------------------------------------------------- CNI

_CNI_KEYS = ("cniVersion", "name", "type", "prevResult", "plugin_log_level", "cni_agent_run_dir",
             "ambient_enabled", "exclude_namespaces", "agent_timeout_s", "ips", "interfaces",
             "address", "sandbox", "version", "gateway", "routes", "dns", "mac", "interface",
             "runtimeConfig", "pod_namespace", "native_nftables")
BASE_CONF = {
    "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambient-cni",
    "cni_agent_run_dir": "/nonexistent", "exclude_namespaces": ["kube-system"],
    "prevResult": {"cniVersion": "1.0.0",
                   "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                   "ips": [{"address": "10.0.0.5/24", "interface": 0}]},
}


def _cni_sender(src: ByteSource):  # type: ignore[no-untyped-def]
    mode = src.u8() % 4

    def send(event: events.PluginEvent) -> events.AgentReply:
        events.encode_frame(event)  # the plugin must only build events the wire can carry
        if mode == 0:
            raise events.AgentUnreachable("fuzz: no agent")
        if mode == 1:
            raise events.FrameError("fuzz: garbage reply")
        return events.AgentReply(ok=mode == 2, code=src.int(-2, 200), message=src.text())
    return send


def cni_plugin(data: bytes) -> None:
    """``cni.plugin.run(env, stdin, send)``: never raises; prints JSON; exit 0 or 1."""
    src = ByteSource(data)
    env = {"CNI_COMMAND": src.choice(("ADD", "DEL", "CHECK", "VERSION", "", "add", "ADD ")),
           "CNI_CONTAINERID": src.choice(("abc", "", "x" * 100)),
           # os.environ turns non-UTF-8 bytes into lone surrogates ("\udcff")
           "CNI_NETNS": src.choice(("/var/run/netns/x", "", "/var/run/netns/\udcff")),
           "CNI_IFNAME": src.choice(("eth0", "")),
           "CNI_ARGS": src.choice(("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u",
                                   "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a",
                                   "K8S_POD_NAMESPACE=default;K8S_POD_NAME=w\udcff",
                                   "", src.text(80)))}
    send = _cni_sender(src)
    mode = src.u8() % 3
    if mode == 0:
        stdin = src.rest()
    else:
        conf = dict(BASE_CONF)
        for _ in range(src.int(0, 4)):
            key = src.choice(_CNI_KEYS)
            conf[key] = json_like(src, _CNI_KEYS)
        stdin = json.dumps(conf).encode()
        if mode == 2:
            stdin = mutate(src, stdin)
    code, out = plugin.run(env, stdin, send, io.StringIO())
    assert code in (0, 1), code
    if out:
        json.loads(out)  # the runtime parses whatever we print
    if code == 1:
        assert "code" in json.loads(out)


def cni_plugin_seeds() -> list[bytes]:
    conf = json.dumps(BASE_CONF).encode()
    return [b"\x00\x00\x00\x00\x02\x00" + conf, b"\x03\x00\x00\x00\x01\x02\x00" + conf,
            b"\x01\x00\x00\x00\x03\x01\x00", b"\x02\x00\x00\x00\x02\x00" + conf]


def cni_frames(data: bytes) -> None:
    """``FrameDecoder.feed`` in fuzzed chunks: FrameError only, broken for good, bounded."""
    src = ByteSource(data)
    step = src.int(1, 512)
    body = src.rest()
    dec = events.FrameDecoder()
    for i in range(0, len(body), step):
        try:
            msgs = dec.feed(body[i : i + step])
        except events.FrameError:
            assert dec.pending <= events.HEADER.size + events.MAX_FRAME
            try:
                dec.feed(b"")
            except events.FrameError:
                return
            raise AssertionError("a broken FrameDecoder accepted more bytes") from None
        assert dec.pending <= events.HEADER.size + events.MAX_FRAME
        for m in msgs:
            assert events.FrameDecoder().feed(events.encode_frame(m)) == [m]


def cni_frames_seeds() -> list[bytes]:
    ev = events.PluginEvent("add", "c1", "/var/run/netns/x", "eth0", "web", "default", "u",
                            ["10.0.0.5"], ["eth0"])
    rep = events.AgentReply(ok=False, enrolled=True, code=100, message="refused")
    return [b"\x07" + events.encode_frame(ev) + events.encode_frame(rep),
            b"\x01" + events.encode_frame(rep)]


def grpc_client(data: bytes) -> None:
    """``ambient.grpclite.ClientCore.receive`` (ztunnel's xDS and CA client) with two calls
    open, one of them sending: server bytes may only end calls with a status, never raise."""
    from ambient.grpclite import ClientCore, StatusCode

    src = ByteSource(data)
    core = ClientCore("istiod:15012", "https")
    core.initiate()
    a = core.start_call("/svc/Unary", [("authorization", "Bearer t")], timeout=5.0, limit=4096)
    b = core.start_call("/svc/Stream")
    core.send(a, b"x" * src.choice((0, 10, 70000)), end=True)
    core.send(b, b"hello")
    core.data_to_send()
    blob = src.rest()
    step = src.choice((1, 9, 64, 4096, 1 << 20)) if blob else 1
    for i in range(0, len(blob), step):
        for call in core.receive(blob[i : i + step]):
            while call.messages:
                assert len(call.messages.popleft()) <= 4096 or call is not a
                core.consumed(call)
            if call.status is not None:
                assert isinstance(call.status[0], StatusCode) and isinstance(call.status[1], str)
        core.data_to_send()
        if core.closed:
            assert all(c.status is not None for c in (a, b)), "a call outlived its connection"
            return


def grpc_client_seeds() -> list[bytes]:
    ok = [(":status", "200"), ("content-type", "application/grpc")]
    trailers = [("grpc-status", "0")]
    msg = b"\x00\x00\x00\x00\x05hello"
    return [
        b"\x00" + _frame("settings", 0) + _frame("headers", 1, headers=ok)
        + _frame("data", 1, data=msg) + _frame("headers", 1, headers=trailers,
                                                 flags=["END_STREAM"]),
        b"\x01" + _frame("settings", 0) + _frame("headers", 3, headers=ok + [
            ("grpc-status", "7"), ("grpc-message", "denied%20here")], flags=["END_STREAM"])
        + _frame("window", 0, inc=1 << 20) + _frame("goaway", 1),
        b"\x02" + _frame("settings", 0) + _frame("rst", 1) + _frame("ping", 0),
    ]
