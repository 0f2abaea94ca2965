"""The waypoint's HTTP/1.1 codec (``waypoint.h1wire``): tables of what it accepts and refuses,
and properties: any bytes give a head, None or ``WireError`` (nothing else); a body cut at any
points decodes to the same bytes; encoded messages parse back; and where ``h11`` (the
reference parser we replaced) accepts a request, we read the same head and body."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waypoint.h1wire import (
    BodyDecoder,
    WireError,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
    parse_request_head,
    parse_response_head,
)

MAX = 4096


def req(raw: bytes):  # type: ignore[no-untyped-def]
    out = parse_request_head(bytearray(raw), MAX)
    assert out is not None
    return out


@pytest.mark.parametrize("raw, method, target, length, chunked, keep", [
    (b"GET /a?b=c HTTP/1.1\r\nHost: w\r\n\r\n", "GET", "/a?b=c", 0, False, True),
    (b"GET / HTTP/1.1\nhost: w\n\n", "GET", "/", 0, False, True),  # bare LF lines
    (b"\r\nGET / HTTP/1.1\r\nHost: w\r\n\r\n", "GET", "/", 0, False, True),  # stray CRLF
    (b"POST /p HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\n\r\n", "POST", "/p", 3, False,
     True),
    (b"POST /p HTTP/1.1\r\nHost: w\r\nContent-Length: 3, 3\r\n\r\n", "POST", "/p", 3, False,
     True),
    (b"PUT / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: Chunked\r\n\r\n", "PUT", "/", None,
     True, True),
    (b"GET / HTTP/1.1\r\nHost: w\r\nConnection: keep-alive, Close\r\n\r\n", "GET", "/", 0,
     False, False),
    (b"GET / HTTP/1.0\r\n\r\n", "GET", "/", 0, False, False),  # 1.0: no Host needed, closes
    (b"OPTIONS * HTTP/1.1\r\nHost: w\r\nX-A:  spaced  value \t\r\n\r\n", "OPTIONS", "*", 0,
     False, True),
])
def test_request_heads_accepted(raw: bytes, method: str, target: str, length: int | None,
                                chunked: bool, keep: bool) -> None:
    head, used = req(raw)
    assert (head.method, head.target, head.length, head.chunked, head.keep_alive) == (
        method, target, length, chunked, keep)
    assert used == len(raw)
    assert all(k == k.lower() for k, _ in head.headers)


def test_header_values_are_trimmed_and_latin1() -> None:
    head, _ = req(b"GET / HTTP/1.1\r\nHost: w\r\nX-A:  v w \t\r\nX-B: caf\xe9\r\n\r\n")
    assert ("x-a", "v w") in head.headers and ("x-b", "caf\xe9") in head.headers


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nhost: a\r\nbad header line\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),  # bare CR
    (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: w\r\nx-big: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: w\r\nx-big: " + b"a" * 10_000, 431),  # unfinished, too long
])
def test_request_heads_refused(raw: bytes, status: int) -> None:
    with pytest.raises(WireError) as e:
        parse_request_head(bytearray(raw), MAX)
    assert e.value.status == status and str(e.value)


def test_incomplete_head_needs_more() -> None:
    assert parse_request_head(bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n"), MAX) is None
    assert parse_request_head(bytearray(b""), MAX) is None


@pytest.mark.parametrize("raw, method, status, length, chunked, close_delimited, keep", [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", "GET", 200, 3, False, False, True),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", "GET", 200, None, True, False,
     True),
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET", 200, None, False, True, False),  # until close
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", "HEAD", 200, 0, False, False, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", 204, 0, False, False, True),
    (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n", "GET", 304, 0, False, False,
     True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", "GET", 200, 0,
     False, False, False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", "GET", 200, 0, False, False, False),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "POST", 100, 0, False, False, True),
    (b"HTTP/1.1 599\r\ncontent-length: 0\r\n\r\n", "GET", 599, 0, False, False, True),
])
def test_response_heads(raw: bytes, method: str, status: int, length: int | None,
                        chunked: bool, close_delimited: bool, keep: bool) -> None:
    out = parse_response_head(bytearray(raw), MAX, method)
    assert out is not None
    head, used = out
    assert used == len(raw)
    assert (head.status, head.length, head.chunked, head.until_close, head.keep_alive) == (
        status, length, chunked, close_delimited, keep)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
])
def test_bad_responses_are_502(raw: bytes) -> None:
    with pytest.raises(WireError) as e:
        parse_response_head(bytearray(raw), MAX, "GET")
    assert e.value.status == 502


def decode(dec: BodyDecoder, pieces: list[bytes]) -> bytes:
    buf = bytearray()
    out = b""
    for p in pieces:
        buf += p
        out += b"".join(dec.feed(buf))
    return out


def test_chunked_body_with_extensions_and_trailers() -> None:
    dec = BodyDecoder(None, True)
    buf = bytearray(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT")
    assert b"".join(dec.feed(buf)) == b"hello world"
    assert dec.done and dec.trailers == [("x-t", "1")] and buf == b"NEXT"


@pytest.mark.parametrize("raw", [b"zz\r\n", b"5\r\nhelloXX", b"1" * 2000])
def test_bad_chunks_refused(raw: bytes) -> None:
    with pytest.raises(WireError):
        BodyDecoder(None, True).feed(bytearray(raw))


def test_length_body_leaves_the_next_message() -> None:
    dec = BodyDecoder(3, False)
    buf = bytearray(b"abcGET")
    assert dec.feed(buf) == [b"abc"] and dec.done and buf == b"GET"


def test_eof_ends_only_close_delimited_bodies() -> None:
    d = BodyDecoder(None, False, until_close=True)
    assert d.feed(bytearray(b"xy")) == [b"xy"] and not d.done
    d.eof()
    assert d.done
    with pytest.raises(WireError):
        BodyDecoder(5, False).eof()


@pytest.mark.parametrize("headers", [
    [("x-a", "v\r\nx-injected: 1")], [("bad name", "v")], [("x", "\x00")], [("x", "\u20ac")],
])
def test_encoders_refuse_splitting(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(WireError):
        encode_response_head(200, headers)
    with pytest.raises(WireError):
        encode_request_head("GET", "/", headers)


def test_encoder_refuses_bad_request_line() -> None:
    for method, target in (("GET", "/a b"), ("G T", "/"), ("GET", "/\r\n"), ("GET", "")):
        with pytest.raises(WireError):
            encode_request_head(method, target, [])


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_parsers_only_return_or_raise_wire_error(data: bytes) -> None:
    for parse in (lambda b: parse_request_head(b, 256),
                  lambda b: parse_response_head(b, 256, "GET")):
        try:
            out = parse(bytearray(data))
        except WireError:
            continue
        if out is not None:
            assert 0 < out[1] <= len(data)
    dec = BodyDecoder(None, True)
    try:
        dec.feed(bytearray(data))
    except WireError:
        pass


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                               blacklist_characters="\x7f"), max_size=30).map(str.strip)


@settings(max_examples=300)
@given(st.lists(st.tuples(_token.filter(lambda t: t not in (
           "content-length", "transfer-encoding", "host", "connection")), _value),
           max_size=8),
       st.binary(max_size=3000), st.lists(st.integers(1, 400), max_size=8), st.booleans(),
       st.lists(st.tuples(_token.filter(lambda t: t not in (
           "content-length", "transfer-encoding")), _value), max_size=3))
def test_encoded_messages_parse_back(headers: list[tuple[str, str]], body: bytes,
                                     cuts: list[int], chunked: bool,
                                     trailers: list[tuple[str, str]]) -> None:
    hs = [("host", "w"), *headers]
    hs.append(("transfer-encoding", "chunked") if chunked else ("content-length",
                                                                   str(len(body))))
    wire = encode_request_head("POST", "/x?y=1", hs)
    if chunked:
        pieces = [body[i:i + 700] for i in range(0, len(body), 700)]
        wire += b"".join(encode_chunk(p) for p in pieces) + encode_last_chunk(trailers)
    else:
        wire += body
    wire += b"GET /next HTTP/1.1\r\nHost: w\r\n\r\n"
    buf = bytearray(wire)
    out = parse_request_head(buf, 8192)
    assert out is not None
    head, used = out
    del buf[:used]
    assert head.headers == hs and head.target == "/x?y=1"
    dec = BodyDecoder(head.length, head.chunked)
    # the body fed in arbitrary pieces decodes to the same bytes
    rest = bytes(buf)
    bounds = sorted({min(c, len(rest)) for c in cuts} | {len(rest)})
    got, prev, feed = b"", 0, bytearray()
    for b in bounds:
        feed += rest[prev:b]
        prev = b
        got += b"".join(dec.feed(feed))
    assert dec.done and got == body
    if chunked:
        assert dec.trailers == trailers
    nxt = parse_request_head(feed, 8192)
    assert nxt is not None and nxt[0].target == "/next"


def _h11_request(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    conn.receive_data(b"")
    body = b""
    head = None
    try:
        for _ in range(len(raw) + 4):
            ev = conn.next_event()
            if isinstance(ev, h11.Request):
                head = ev
            elif isinstance(ev, h11.Data):
                body += bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    if head is None:
        return None
    return (head.method.decode(), head.target.decode("latin-1"),
            [(k.decode().lower(), v.decode("latin-1")) for k, v in head.headers], body)


_line = st.sampled_from([
    b"Host: w", b"host: w", b"Content-Length: 3", b"content-length: 0",
    b"Transfer-Encoding: chunked", b"X-A: b", b"X-A:b ", b"Connection: close", b"Expect: x",
    b"Content-Length: 3, 3", b"X : y", b"X: a\tb",
])


@settings(max_examples=400)
@given(st.sampled_from([b"GET", b"POST", b"PUT"]), st.sampled_from([b"/", b"/a?b", b"*"]),
       st.lists(_line, max_size=5), st.sampled_from([b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n"]),
       st.sampled_from([b"\r\n", b"\n"]))
def test_agrees_with_h11_where_h11_accepts(method: bytes, target: bytes, lines: list[bytes],
                                           body: bytes, eol: bytes) -> None:
    raw = method + b" " + target + b" HTTP/1.1" + eol + eol.join(lines) + (
        eol if lines else b"") + eol + body
    ref = _h11_request(raw)
    if ref is None:
        return
    try:
        out = parse_request_head(bytearray(raw), 8192)
    except WireError as e:
        # stricter than h11 only where smuggling lies: CL + TE, or space before a colon
        text = str(e)
        assert "both Content-Length" in text or "malformed header" in text, text
        return
    assert out is not None
    head, used = out
    assert (head.method, head.target, head.headers) == ref[:3]
    buf = bytearray(raw[used:])
    dec = BodyDecoder(head.length, head.chunked)
    assert b"".join(dec.feed(buf)) == ref[3] and dec.done


class _Upstream:
    """An in-memory upstream: answers with ``chunks``, then EOF; records the request."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.out = bytearray()
        self.aborted = False

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        self.out += data

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


_responses = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda head, body: head + body, st.sampled_from([
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n"]),
        st.binary(max_size=80)))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_responses, st.integers(1, 50))
def test_h1client_on_any_upstream_bytes(raw: bytes, step: int) -> None:
    """Whatever an upstream sends, ``H1Client`` returns a response whose body ends or fails
    with ``BodyError``, or raises ``H1Error``; a connection is offered for reuse only after a
    response that ended cleanly with every byte accounted for."""
    import asyncio

    from waypoint.h1 import H1Client, H1Error
    from waypoint.message import Body, BodyError, HttpRequest

    async def main() -> None:
        up = _Upstream([raw[i:i + step] for i in range(0, len(raw), step)])
        client = H1Client(up)  # type: ignore[arg-type]
        req = HttpRequest("POST", "http", "w", "/", [("x-a", "1")], Body.of(b"hi"))
        try:
            resp = await asyncio.wait_for(client.request(req), 5)
        except H1Error:
            assert client.broken
            return
        assert up.out.startswith(b"POST / HTTP/1.1\r\nhost: w\r\n")
        body = b""
        try:
            body = await asyncio.wait_for(resp.body.read_all(1 << 20), 5)
        except BodyError:
            assert not client.reset()
            return
        if resp.body.length is not None:
            assert len(body) == resp.body.length
        if client.reset():
            assert resp.status >= 200 and not client.conn.buf and not client.broken

    asyncio.run(main())
