"""Structured property tests for HBONE beyond ``test_hbone_fuzz.py`` (which feeds random
frames): CONNECT header blocks, the ``:authority`` parser, client->server round trips, and
memory bounds under garbage and floods.
"""

from __future__ import annotations

import ipaddress
import tracemalloc

import hpack
import hyperframe.frame as hf
from fuzz.hypo import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from ambient.hbone.protocol import (
    ILLEGAL_PORTS,
    MAX_FRAME_SIZE,
    AuthorityError,
    ConnectRequest,
    HboneClientProtocol,
    HboneProtocolError,
    HboneServerProtocol,
    RequestRejected,
    format_authority,
    header_block_limit,
    parse_authority,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _server() -> HboneServerProtocol:
    srv = HboneServerProtocol()
    srv.initiate()
    srv.receive_data(PREFACE + hf.SettingsFrame(0).serialize(), 0.0)
    srv.data_to_send()
    return srv


# ---------------------------------------------------------------------------- :authority

ports = st.integers(1, 65535)


@fuzz_settings(300)
@given(st.ip_addresses(), ports)
def test_authority_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    assert parse_authority(format_authority(ip, port)) == (ip, port)


@fuzz_settings(300)
@given(st.text(max_size=80), st.booleans())
def test_authority_text_only_raises_authority_error(text: str, allow: bool) -> None:
    try:
        host, port = parse_authority(text, allow_hostname=allow)
    except AuthorityError as e:
        assert e.status == 400
        return
    assert 0 < port < 65536
    assert allow or not isinstance(host, str)


@fuzz_settings(200)
@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,8}){0,3}", fullmatch=True),
       ports)
def test_hostnames_only_when_allowed(name: str, port: int) -> None:
    auth = f"{name}:{port}"
    try:
        ipaddress.IPv4Address(name)
        return  # digits-and-dots names can be IPv4 addresses
    except ValueError:
        pass
    assert parse_authority(auth, allow_hostname=True) == (name, port)
    try:
        parse_authority(auth)
    except AuthorityError:
        return
    raise AssertionError(f"{auth} accepted without allow_hostname")


# ---------------------------------------------------------------------------- CONNECT heads

_NAMES = [":method", ":authority", ":path", ":scheme", ":protocol", ":status", "baggage",
          "forwarded", "traceparent", "Connection", "te", "x-Mixed", ""]
_VALUES = ["CONNECT", "GET", "10.0.0.2:8080", "[fd00::2]:80", "10.0.0.2:15008", "a:1",
           "10.0.0.2:0", "10.0.0.2", "", "/", "https", "x\x00y", "é"]
header = st.tuples(st.one_of(st.sampled_from(_NAMES), st.text(max_size=10)),
                   st.one_of(st.sampled_from(_VALUES), st.text(max_size=20)))


def _informational(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:  # h2.utilities.is_informational_response's rule
        if not name.startswith(":"):
            return False
        if name == ":status":
            return value.startswith("1")
    return False


@fuzz_settings(400)
@given(st.lists(header, max_size=8), st.booleans())
def test_any_request_head_gets_one_answer_and_spares_the_connection(
    headers: list[tuple[str, str]], end_stream: bool
) -> None:
    """Whatever head a stream opens with, the server answers that stream only: a
    ConnectRequest, or a rejection (status or reset); the connection stays usable.

    Except a head whose leading pseudo-headers include ``:status: 1xx``: h2 takes it for an
    informational response and fails the connection (test_fuzz_regressions.py, xfail).
    """
    if _informational(headers):
        headers = [h for h in headers if h[0] != ":status"]
    srv = _server()
    f = hf.HeadersFrame(1, data=hpack.Encoder().encode(headers))
    f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    evs = srv.receive_data(f.serialize(), 0.0)
    answers = [e for e in evs if isinstance(e, ConnectRequest | RequestRejected)]
    assert len(answers) == 1 and answers[0].stream_id == 1, evs
    assert not srv.closed
    if isinstance(answers[0], ConnectRequest):
        req = answers[0]
        assert dict(headers).get(":method") == "CONNECT" and req.port not in ILLEGAL_PORTS
        assert parse_authority(req.authority) == (req.host, req.port)
    ok = hf.HeadersFrame(3, data=hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.9:80")]))
    ok.flags.add("END_HEADERS")
    assert any(isinstance(e, ConnectRequest) for e in srv.receive_data(ok.serialize(), 0.0))


@fuzz_settings(200)
@given(st.ip_addresses(), st.integers(1, 65535).filter(lambda p: p not in ILLEGAL_PORTS),
       st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True),
                       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
                       max_size=4))
def test_client_to_server_round_trip(ip, port, extra: dict[str, str]) -> None:
    """What the client's CONNECT says is what the server's ConnectRequest reports."""
    extra = {k: v for k, v in extra.items() if k not in ("te", "connection", "host")}
    cli = HboneClientProtocol()
    cli.initiate()
    srv = HboneServerProtocol()
    srv.initiate()
    sid = cli.connect(format_authority(ip, port), list(extra.items()))
    evs = srv.receive_data(cli.data_to_send(), 0.0)
    [req] = [e for e in evs if isinstance(e, ConnectRequest)]
    assert (req.stream_id, req.host, req.port) == (sid, ip, port)
    # RFC 9110 §5.5: surrounding whitespace is not part of a field value (h2 strips it).
    assert {k: req.headers[k] for k in extra} == {k: v.strip(" \t") for k, v in extra.items()}


# ---------------------------------------------------------------------------- memory


@fuzz_settings(30)
@given(st.binary(min_size=64, max_size=64), st.booleans())
def test_ten_megabytes_of_garbage_are_not_kept(pattern: bytes, with_preface: bool) -> None:
    """10 MB of garbage, read 64 KiB at a time as the edge does: the connection fails and
    holds at most one frame's worth of it."""
    srv = HboneServerProtocol()
    srv.initiate()
    chunk = pattern * 1024
    tracemalloc.start()
    try:
        if with_preface:
            srv.receive_data(PREFACE + hf.SettingsFrame(0).serialize(), 0.0)
        for _ in range(160):  # 10 MiB
            try:
                srv.receive_data(chunk, 0.0)
            except HboneProtocolError:
                assert srv.closed
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < MAX_FRAME_SIZE + 2 * len(chunk)


@fuzz_settings(20)
@given(st.integers(1, 64), st.integers(1, 16_384))
def test_unfinished_header_blocks_are_bounded(frames: int, size: int) -> None:
    srv = _server()
    srv.receive_data(hf.HeadersFrame(1, data=b"\x82").serialize(), 0.0)
    held = 1
    for i in range(frames):
        try:
            srv.receive_data(hf.ContinuationFrame(1, data=b"\x82" * size).serialize(), 0.0)
        except HboneProtocolError:
            # our byte bound, or h2's own: at most 64 frames (HEADERS + 63 CONTINUATION)
            assert held + size > header_block_limit(16 * 1024) or i + 2 > 64
            return
        held += size
    assert held <= header_block_limit(16 * 1024)
