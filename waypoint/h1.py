"""HTTP/1.1 over a tunnel stream, both ways, on the sans-I/O codec ``waypoint.h1wire``.

Role: ``serve_h1`` is the waypoint's downstream HTTP/1.1 server inside one HBONE tunnel
(keep-alive, chunked bodies, pipelined requests answered in order); ``H1Client`` speaks
HTTP/1.1 to an upstream over another tunnel, one request at a time, and says whether the
connection can carry another one (``reset``).

Invariants:
* Request heads are bounded (``MAX_HEAD``; over it the client gets 431) and must arrive within
  ``header_timeout``; an idle keep-alive connection is closed after ``idle_timeout``.
* Malformed HTTP gets the codec's status (400, 501, 505) and the connection closes; nothing
  malformed reaches the pipeline.
* Bodies stream: a request body is fed to ``Body`` while the handler runs, and reading from
  the tunnel pauses while ``Body.limit`` bytes wait unread. A body that is already whole in
  the receive buffer is handed over without a task; a response or request whose body is
  already complete goes out in one write with its head.
* A response carries exactly the bytes its framing announces (a Content-Length the body does
  not match fails the exchange); a connection whose last exchange did not end cleanly on both
  sides is never reused.
* After a response, an unread request body is drained (up to ``DRAIN_LIMIT``) so the next
  pipelined request can be parsed; a larger one closes the connection instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from waypoint.h1wire import (
    BodyDecoder,
    RequestHead,
    ResponseHead,
    WireError,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
    parse_request_head,
    parse_response_head,
)
from waypoint.message import (
    Body,
    BodyError,
    ByteStream,
    Handler,
    HttpRequest,
    HttpResponse,
    content_length,
    end_to_end,
)

__all__ = ["DRAIN_LIMIT", "MAX_HEAD", "H1Client", "H1Error", "Limits", "serve_h1"]

log = logging.getLogger("waypoint.h1")

MAX_HEAD = 64 * 1024
DRAIN_LIMIT = 1024 * 1024
MAX_INFORMATIONAL = 16  # 1xx heads skipped before a final response


class H1Error(Exception):
    """An HTTP/1.1 exchange failed (peer closed, sent garbage, or timed out).

    ``before_response``: no byte of a response had arrived (a client-side failure that a
    retry on another connection may cure)."""

    def __init__(self, message: str, *, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0  # from the first byte of a head to its end
    idle_timeout: float = 300.0  # keep-alive wait between requests
    max_head: int = MAX_HEAD


class _Conn:
    """A byte stream and its receive buffer."""

    __slots__ = ("stream", "buf", "eof")

    def __init__(self, stream: ByteStream, initial: bytes = b"") -> None:
        self.stream = stream
        self.buf = bytearray(initial)
        self.eof = False

    async def fill(self, timeout: float | None) -> bool:
        """Read more into ``buf``; False at the peer's end of stream."""
        if self.eof:
            return False
        data = await (self.stream.read() if timeout is None
                      else _read_within(self.stream, timeout))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True


async def _read_within(stream: ByteStream, timeout: float) -> bytes:
    """``stream.read()`` or TimeoutError after ``timeout`` seconds: ``asyncio.timeout``'s
    semantics (only our own cancellation becomes TimeoutError) at half its cost, which shows
    on a read per request."""
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await stream.read()
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:
            raise TimeoutError(f"no data within {timeout}s") from None
        raise
    finally:
        timer.cancel()


async def _pump_body(conn: _Conn, dec: BodyDecoder, body: Body, timeout: float | None) -> None:
    """Feed ``body`` from ``conn`` until ``dec`` says the message ended (errors fail it)."""
    try:
        _feed_buffered(conn, dec, body)
        while not dec.done:
            await body.wait_room()
            if not await conn.fill(timeout):
                dec.eof()
            _feed_buffered(conn, dec, body)
    except (WireError, TimeoutError, OSError, ConnectionError) as e:
        body.fail(e if not isinstance(e, WireError) else H1Error(f"body: {e}"))
        raise H1Error(str(e) or type(e).__name__) from None


def _feed_buffered(conn: _Conn, dec: BodyDecoder, body: Body) -> None:
    """Hand ``body`` what the buffer already holds; ends it when that is all (raises
    ``WireError`` for a malformed body)."""
    for data in dec.feed(conn.buf):
        body.feed(data)
    if dec.done:
        body.end(dec.trailers)


async def _quiet(task: asyncio.Future[None] | None) -> bool:
    """Await a pump; True if it finished without error."""
    if task is None:
        return True
    try:
        await task
    except (H1Error, asyncio.CancelledError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Server


async def serve_h1(
    stream: ByteStream, handler: Handler, *, initial: bytes = b"", limits: Limits = Limits(),
) -> int:
    """Serve HTTP/1.1 requests from ``stream`` until it closes; returns the requests served."""
    conn = _Conn(stream, initial)
    served = 0
    try:
        while True:
            try:
                head = await _read_request_head(conn, limits, served)
            except TimeoutError:
                if not conn.buf.strip(b"\r\n"):
                    return served  # idle keep-alive connection: close quietly
                await _send_error(stream, 408, "request head not received in time")
                return served
            except WireError as e:
                await _send_error(stream, e.status, f"bad request: {e}")
                return served
            if head is None:
                return served
            served += 1
            if not await _serve_one(conn, head, handler, limits):
                return served
    finally:
        with contextlib.suppress(Exception):
            stream.write_eof()


async def _read_request_head(conn: _Conn, limits: Limits, served: int) -> RequestHead | None:
    """The next request head, or None when the peer closed between (or within) requests."""
    for _ in range(limits.max_head + 2):  # every pass reads at least one byte or returns
        parsed = parse_request_head(conn.buf, limits.max_head)
        if parsed is not None:
            head, used = parsed
            del conn.buf[:used]
            return head
        waiting = served == 0 or conn.buf.strip(b"\r\n")
        if not await conn.fill(limits.header_timeout if waiting else limits.idle_timeout):
            return None
    return None


async def _send_error(stream: ByteStream, status: int, text: str) -> None:
    body = (text + "\n").encode("utf-8", "replace")
    try:
        await stream.write(encode_response_head(status, [
            ("content-type", "text/plain"), ("content-length", str(len(body))),
            ("connection", "close")]) + body)
    except (OSError, ConnectionError) as e:
        log.debug("could not send %d: %s", status, e)


async def _serve_one(conn: _Conn, head: RequestHead, handler: Handler, limits: Limits) -> bool:
    """Answer one request; True if the connection can carry the next one."""
    body = Body(length=None if head.chunked else head.length)
    req = HttpRequest(
        method=head.method, scheme="http", authority=head.host or "", target=head.target,
        headers=[(k, v) for k, v in head.headers if k != "host"], body=body,
        protocol="HTTP/1.1",
    )
    dec = BodyDecoder(head.length, head.chunked)
    pump: asyncio.Future[None] | None = None
    try:
        _feed_buffered(conn, dec, body)
    except WireError as e:
        await _send_error(conn.stream, e.status, f"bad request body: {e}")
        return False
    if not dec.done:
        pump = asyncio.ensure_future(_serve_body(conn, dec, body, head, limits))
    resp: HttpResponse | None = None
    sent, keep = 0, False
    error: BaseException | None = None
    try:
        resp = await handler(req)
        sent, keep = await _write_response(conn.stream, head, resp)
    except (OSError, ConnectionError, BodyError, WireError) as e:
        error = e
    finally:
        if resp is not None:
            resp.done(sent, error)
    if error is not None:
        if pump is not None:
            pump.cancel()
            await _quiet(pump)
        conn.stream.abort()
        return False
    # Let the request body finish so the next request can be parsed; give up past the limit.
    if not body.ended and not await body.drain(DRAIN_LIMIT) and pump is not None:
        pump.cancel()
    return await _quiet(pump) and dec.done and keep


async def _serve_body(conn: _Conn, dec: BodyDecoder, body: Body, head: RequestHead,
                      limits: Limits) -> None:
    if head.expect_continue and not body.received:
        await conn.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await _pump_body(conn, dec, body, limits.idle_timeout)


async def _write_response(stream: ByteStream, head: RequestHead, resp: HttpResponse
                          ) -> tuple[int, bool]:
    """Write ``resp``; (body bytes sent, connection reusable by its framing)."""
    headers = end_to_end(resp.headers)
    status = resp.status
    keep = head.keep_alive
    length = content_length(headers)
    bodyless = head.method == "HEAD" or status in (204, 304) or 100 <= status < 200
    chunked = not bodyless and length is None and head.http11
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
    elif not bodyless and length is None:
        keep = False  # an HTTP/1.0 client: the body ends when we close
    if not keep:
        headers.append(("connection", "close"))
    out = encode_response_head(status, headers)
    rbody = resp.body
    whole = rbody.take_ended()
    if whole is not None:  # the common case: head and body in one write
        sent = 0 if bodyless else len(whole)
        if length is not None and not bodyless and sent != length:
            raise WireError(502, f"response body of {sent} bytes, Content-Length {length}")
        if bodyless:
            await stream.write(out)
        elif chunked:
            await stream.write(out + encode_chunk(whole) + encode_last_chunk(rbody.trailers))
        else:
            await stream.write(out + whole)
        return sent, keep
    await stream.write(out)
    sent = 0
    while data := await rbody.read():
        if bodyless:
            continue
        sent += len(data)
        if length is not None and sent > length:
            raise WireError(502, f"response body longer than its Content-Length {length}")
        await stream.write(encode_chunk(data) if chunked else data)
    if length is not None and not bodyless and sent != length:
        raise WireError(502, f"response body of {sent} bytes, Content-Length {length}")
    if chunked:
        await stream.write(encode_last_chunk(rbody.trailers))
    return sent, keep


# ---------------------------------------------------------------------------------------------
# Client


class H1Client:
    """One upstream HTTP/1.1 connection over ``stream``; requests run one at a time."""

    def __init__(self, stream: ByteStream, *, max_head: int = MAX_HEAD) -> None:
        self.stream = stream
        self.max_head = max_head
        self.conn = _Conn(stream)
        self.broken = False
        self.idle_since = 0.0  # loop time it was last put back into a pool
        self._keep = False  # the last response allows another request
        self._sent_all = False  # the last request went out whole
        self._sender: asyncio.Future[None] | None = None
        self._pump: asyncio.Future[None] | None = None  # held so it is not collected mid-run
        self._resp_body: Body | None = None

    @property
    def stale(self) -> bool:
        """The upstream closed, reset or sent something while the connection sat idle."""
        if self.broken or self.conn.buf or self.conn.eof:
            return True
        s = self.stream
        conn = getattr(s, "connection", None)
        if conn is not None and not getattr(conn, "is_usable", True):
            return True
        return bool(getattr(s, "read_ready", False))  # HboneStream: the upstream spoke

    def reset(self) -> bool:
        """Ready the connection for the next request; False if it cannot be reused (the
        exchange failed, the upstream answered before taking the whole request or asked to
        close, or the response body was not read to its end)."""
        if self._sender is not None and not self._sender.done():
            self.close()
            return False
        rb = self._resp_body
        ok = (not self.broken and self._keep and self._sent_all and rb is not None
              and rb.ended and not rb.buffered() and not self.conn.buf)
        if ok and self._pump is not None and not self._pump.done():
            ok = False
        if not ok:
            return False
        self._keep = self._sent_all = False
        self._sender = self._pump = None
        self._resp_body = None
        return True

    def close(self) -> None:
        self.broken = True
        for t in (self._sender, self._pump):
            if t is not None and not t.done():
                t.cancel()
        self.stream.abort()

    async def request(self, req: HttpRequest, *, head_timeout: float | None = None
                      ) -> HttpResponse:
        """Send ``req`` (a body still arriving streams in the background) and return the
        response head; the response body streams into the returned ``HttpResponse.body``.
        Raises ``H1Error`` (``before_response`` when no response byte had arrived)."""
        try:
            out, body_task = self._encode_request(req)
        except WireError as e:
            raise H1Error(f"cannot send the request upstream: {e}") from e
        try:
            await self.stream.write(out)
        except (OSError, ConnectionError) as e:
            if body_task is not None:
                body_task.close()
            self.close()
            raise H1Error(f"cannot send the request upstream: {e}",
                          before_response=True) from e
        if body_task is not None:
            self._sender = asyncio.ensure_future(body_task)
        else:
            self._sent_all = True
        try:
            head = await self._response_head(req.method, head_timeout)
        except (WireError, OSError, ConnectionError) as e:
            self.close()
            raise H1Error(f"upstream HTTP/1.1 error: {e}",
                          before_response=not self.conn.buf and not self.conn.eof) from e
        except BaseException:  # H1Error, a timeout, cancellation
            self.close()
            raise
        self._keep = head.keep_alive
        body = Body(length=head.length if not head.chunked else None)
        self._resp_body = body
        dec = BodyDecoder(head.length, head.chunked, head.until_close)
        try:
            _feed_buffered(self.conn, dec, body)
        except WireError as e:
            self.broken = True
            body.fail(H1Error(f"upstream body: {e}"))
        if not dec.done and not self.broken:
            self._pump = asyncio.ensure_future(self._pump_response(dec, body))
        return HttpResponse(head.status, head.headers, body)

    def _encode_request(self, req: HttpRequest
                        ) -> tuple[bytes, Coroutine[Any, Any, None] | None]:
        """The bytes to write now, and the coroutine sending the rest of the body (if any)."""
        headers = [(k, v) for k, v in end_to_end(req.headers)
                   if k != "content-length" and k != "host"]
        headers.insert(0, ("host", req.authority))
        body = req.body
        whole = body.take_ended()
        if whole is not None:
            trailers = body.trailers
            if trailers:
                headers.append(("transfer-encoding", "chunked"))
                return (encode_request_head(req.method, req.target, headers)
                        + encode_chunk(whole) + encode_last_chunk(trailers)), None
            if whole or req.method in ("POST", "PUT", "PATCH"):
                headers.append(("content-length", str(len(whole))))
            return encode_request_head(req.method, req.target, headers) + whole, None
        length = body.length
        if length is None:
            headers.append(("transfer-encoding", "chunked"))
        else:
            headers.append(("content-length", str(length)))
        return (encode_request_head(req.method, req.target, headers),
                self._send_body(body, length))

    async def _response_head(self, method: str, timeout: float | None) -> ResponseHead:
        conn = self.conn
        informational = 0
        for _ in range(self.max_head + 2):  # every pass reads at least one byte or returns
            parsed = parse_response_head(conn.buf, self.max_head, method)
            if parsed is not None:
                head, used = parsed
                del conn.buf[:used]
                if 100 <= head.status < 200:
                    informational += 1
                    if head.status == 101 or informational > MAX_INFORMATIONAL:
                        raise WireError(502, f"unexpected {head.status} response")
                    continue
                return head
            if not await conn.fill(timeout):
                raise H1Error("upstream closed before responding",
                              before_response=not conn.buf)
        raise WireError(502, "response head never completed")

    async def _send_body(self, body: Body, length: int | None) -> None:
        sent = 0
        try:
            while data := await body.read():
                sent += len(data)
                if length is not None and sent > length:
                    raise BodyError(f"request body longer than its Content-Length {length}")
                await self.stream.write(encode_chunk(data) if length is None else data)
            if length is None:
                await self.stream.write(encode_last_chunk(body.trailers))
            elif sent != length:
                raise BodyError(f"request body of {sent} bytes, Content-Length {length}")
            self._sent_all = True
        except (BodyError, WireError, OSError, ConnectionError) as e:
            log.debug("request body to upstream failed: %s", e)
            self.close()

    async def _pump_response(self, dec: BodyDecoder, body: Body) -> None:
        try:
            await _pump_body(self.conn, dec, body, None)
        except H1Error:
            self.broken = True
