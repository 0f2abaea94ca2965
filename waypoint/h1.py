"""HTTP/1.1 over a tunnel stream, both ways, with ``h11`` as the sans-I/O parser.

Role: ``serve_h1`` is the waypoint's downstream HTTP/1.1 server inside one HBONE tunnel
(keep-alive, chunked bodies, pipelined requests answered in order); ``H1Client`` speaks
HTTP/1.1 to an upstream over another tunnel, one request at a time, and reports whether the
connection can be reused.

Invariants:
* Request heads are bounded (``MAX_HEAD``; over it the client gets 431) and must arrive within
  ``header_timeout``; an idle keep-alive connection is closed after ``idle_timeout``.
* Malformed HTTP gets a 400 (h11's status hint) and the connection closes; nothing malformed
  reaches the pipeline.
* Bodies stream: a request body is fed to ``Body`` while the handler runs, and reading from
  the tunnel pauses while ``Body.limit`` bytes wait unread.
* After a response, an unread request body is drained (up to ``DRAIN_LIMIT``) so the next
  pipelined request can be parsed; a larger one closes the connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

import h11

from waypoint.message import (
    Body,
    BodyError,
    ByteStream,
    Handler,
    Headers,
    HttpRequest,
    HttpResponse,
    content_length,
    end_to_end,
    get_header,
)

__all__ = ["DRAIN_LIMIT", "MAX_HEAD", "H1Client", "H1Error", "Limits", "serve_h1"]

log = logging.getLogger("waypoint.h1")

MAX_HEAD = 64 * 1024
DRAIN_LIMIT = 1024 * 1024


class H1Error(Exception):
    """An HTTP/1.1 exchange failed (peer closed, sent garbage, or timed out)."""


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0  # from the first byte of a head to its end
    idle_timeout: float = 300.0  # keep-alive wait between requests
    max_head: int = MAX_HEAD


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _reason(status: int) -> bytes:
    # Some clients (h2load, older http-parser users) only see a status with a reason phrase.
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


async def _w(stream: ByteStream, data: bytes | None) -> None:
    if data:
        await stream.write(data)


class _Reader:
    """Pulls h11 events, reading the stream when h11 needs data."""

    def __init__(self, conn: h11.Connection, stream: ByteStream, initial: bytes = b"") -> None:
        self.conn = conn
        self.stream = stream
        if initial:
            conn.receive_data(initial)
        self.eof = False

    async def next(self, timeout: float | None) -> h11.Event | type[h11.PAUSED]:
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev  # type: ignore[return-value]
            if self.eof:
                raise H1Error("peer closed mid-message")
            async with asyncio.timeout(timeout):
                data = await self.stream.read()
            if not data:
                self.eof = True
            self.conn.receive_data(data)


# ---------------------------------------------------------------------------------------------
# Server


async def serve_h1(
    stream: ByteStream, handler: Handler, *, initial: bytes = b"", limits: Limits = Limits(),
) -> int:
    """Serve HTTP/1.1 requests from ``stream`` until it closes; returns the requests served."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
    reader = _Reader(conn, stream, initial)
    served = 0
    try:
        while True:
            timeout = limits.header_timeout if served == 0 else limits.idle_timeout
            try:
                ev = await reader.next(timeout)
            except TimeoutError:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return served  # idle keep-alive connection: close quietly
                await _send_error(stream, conn, 408, "request head not received in time")
                return served
            except h11.RemoteProtocolError as e:
                await _send_error(stream, conn, e.error_status_hint, f"bad request: {e}")
                return served
            except H1Error:
                return served
            if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return served
            if not isinstance(ev, h11.Request):
                return served
            if _head_size(ev) > limits.max_head:  # h11 bounds only heads still incomplete
                await _send_error(stream, conn, 431, "request head too large")
                return served
            served += 1
            keep = await _serve_one(stream, conn, reader, ev, handler, limits)
            if not keep:
                return served
            conn.start_next_cycle()
    finally:
        with contextlib.suppress(Exception):
            stream.write_eof()


def _head_size(ev: h11.Request) -> int:
    """Bytes of the request head as sent (method, target, version, header lines, blank)."""
    return (len(ev.method) + len(ev.target) + 12
            + sum(len(k) + len(v) + 4 for k, v in ev.headers.raw_items()) + 2)


async def _send_error(stream: ByteStream, conn: h11.Connection, status: int, text: str) -> None:
    body = (text + "\n").encode()
    try:
        data = conn.send(h11.Response(status_code=status, reason=_reason(status), headers=[
            ("content-type", "text/plain"), ("content-length", str(len(body))),
            ("connection", "close")])) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.write(data)
    except (h11.LocalProtocolError, OSError, ConnectionError) as e:
        log.debug("could not send %d: %s", status, e)


async def _pump_request_body(reader: _Reader, body: Body, limits: Limits) -> None:
    conn = reader.conn
    try:
        while True:
            if conn.they_are_waiting_for_100_continue:
                await _w(reader.stream, conn.send(h11.InformationalResponse(
                    status_code=100, headers=[])))
            ev = await reader.next(limits.idle_timeout)
            if isinstance(ev, h11.Data):
                body.feed(bytes(ev.data))
                await body.wait_room()
            elif isinstance(ev, h11.EndOfMessage):
                body.end(_decode(ev.headers))
                return
            else:
                body.fail(H1Error("request body cut short"))
                return
    except (h11.RemoteProtocolError, H1Error, TimeoutError, OSError, ConnectionError) as e:
        body.fail(e)


async def _serve_one(
    stream: ByteStream, conn: h11.Connection, reader: _Reader, ev: h11.Request,
    handler: Handler, limits: Limits,
) -> bool:
    headers = _decode(ev.headers)
    authority = get_header(headers, "host") or ""
    length = content_length(headers)
    if length is None and get_header(headers, "transfer-encoding") is None:
        length = 0  # RFC 9112 §6.3: a request without framing headers has no body
    body = Body(length=length)
    req = HttpRequest(
        method=ev.method.decode("ascii", "replace"), scheme="http", authority=authority,
        target=ev.target.decode("latin-1"),
        headers=[(k, v) for k, v in headers if k != "host"],
        body=body, protocol="HTTP/1.1",
    )
    pump = asyncio.ensure_future(_pump_request_body(reader, body, limits))
    resp: HttpResponse | None = None
    sent = 0
    error: BaseException | None = None
    try:
        resp = await handler(req)
        sent = await _write_response(stream, conn, req, resp)
    except (OSError, ConnectionError, BodyError, h11.LocalProtocolError) as e:
        error = e
    finally:
        if resp is not None:
            resp.done(sent, error)
    if error is not None:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        stream.abort()
        return False
    # Let the request body finish so the next request can be parsed; give up past the limit.
    if not body.ended:
        if not await body.drain(DRAIN_LIMIT):
            pump.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pump
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _write_response(
    stream: ByteStream, conn: h11.Connection, req: HttpRequest, resp: HttpResponse
) -> int:
    headers = end_to_end(resp.headers)
    chunked = get_header(headers, "content-length") is None
    if req.method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
        chunked = False
    await _w(stream, conn.send(h11.Response(status_code=resp.status, headers=_encode(headers),
                                            reason=_reason(resp.status))))
    sent = 0
    while data := await resp.body.read():
        if req.method == "HEAD":
            continue
        sent += len(data)
        await _w(stream, conn.send(h11.Data(data=data)))
    trailers = _encode(resp.body.trailers) if chunked else []
    await _w(stream, conn.send(h11.EndOfMessage(headers=trailers)))
    return sent


# ---------------------------------------------------------------------------------------------
# Client


class H1Client:
    """One upstream HTTP/1.1 connection over ``stream``; requests run one at a time."""

    def __init__(self, stream: ByteStream, *, max_head: int = MAX_HEAD) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.reader = _Reader(self.conn, stream)
        self.broken = False
        self._sender: asyncio.Future[None] | None = None
        self._pump: asyncio.Future[None] | None = None  # held so it is not collected mid-run

    @property
    def reusable(self) -> bool:
        return (not self.broken and self.conn.our_state is h11.DONE
                and self.conn.their_state is h11.DONE)

    def reset(self) -> bool:
        """Ready the connection for the next request; False if it cannot be reused (the
        upstream answered before taking the whole request, or the exchange failed)."""
        if self._sender is not None and not self._sender.done():
            self.close()
            return False
        if not self.reusable:
            return False
        self.conn.start_next_cycle()
        return True

    def close(self) -> None:
        self.broken = True
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        self.stream.abort()

    async def request(self, req: HttpRequest, *, head_timeout: float | None = None
                      ) -> HttpResponse:
        """Send ``req`` (its body streams in the background) and return the response head;
        the response body streams into the returned ``HttpResponse.body``."""
        headers = [(k, v) for k, v in end_to_end(req.headers) if k != "content-length"]
        headers.insert(0, ("host", req.authority))
        body = req.body
        length = body.length
        if length is None and body.ended and body.received == 0:
            length = 0
        if length is None:
            headers.append(("transfer-encoding", "chunked"))
        elif length > 0 or req.method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(length)))
        try:
            await _w(self.stream, self.conn.send(h11.Request(
                method=req.method, target=req.target, headers=_encode(headers))))
        except (h11.LocalProtocolError, OSError, ConnectionError) as e:
            self.broken = True
            raise H1Error(f"cannot send the request upstream: {e}") from e
        self._sender = asyncio.ensure_future(self._send_body(req.body))
        try:
            while True:
                ev = await self.reader.next(head_timeout)
                if isinstance(ev, h11.InformationalResponse):
                    continue
                if isinstance(ev, h11.Response):
                    break
                raise H1Error(f"upstream closed before responding ({type(ev).__name__})")
        except (h11.RemoteProtocolError, H1Error, OSError, ConnectionError) as e:
            self.close()
            raise H1Error(f"upstream HTTP/1.1 error: {e}") from e
        except BaseException:
            self.close()
            raise
        rheaders = _decode(ev.headers)
        body = Body(length=content_length(rheaders))
        resp = HttpResponse(ev.status_code, rheaders, body)
        self._pump = asyncio.ensure_future(self._pump_response(body))
        return resp

    async def _send_body(self, body: Body) -> None:
        try:
            while data := await body.read():
                await _w(self.stream, self.conn.send(h11.Data(data=data)))
            chunked = self.conn.our_state is h11.SEND_BODY and body.length is None
            trailers = _encode(body.trailers) if chunked else []
            await _w(self.stream, self.conn.send(h11.EndOfMessage(headers=trailers)))
        except (BodyError, h11.LocalProtocolError, OSError, ConnectionError) as e:
            log.debug("request body to upstream failed: %s", e)
            self.close()

    async def _pump_response(self, body: Body) -> None:
        try:
            while True:
                ev = await self.reader.next(None)
                if isinstance(ev, h11.Data):
                    body.feed(bytes(ev.data))
                    await body.wait_room()
                elif isinstance(ev, h11.EndOfMessage):
                    body.end(_decode(ev.headers))
                    return
                else:
                    self.broken = True
                    body.fail(H1Error("upstream closed mid-response"))
                    return
        except (h11.RemoteProtocolError, H1Error, OSError, ConnectionError) as e:
            self.broken = True
            body.fail(e)
