"""A tiny asyncio HTTP/1.1 server for ztunnel's admin, stats and readiness ports.

One request per connection (the response always carries ``Connection: close``), GET/POST with a
``Content-Length`` body, nothing else. It is meant for localhost tooling and scrapers, so it is
small and defensive rather than fast:

- the request head is bounded (``MAX_HEAD`` = 64 KiB; over it -> 431) and so is the body
  (``MAX_BODY``; over it -> 413);
- the whole request must arrive within ``read_timeout`` seconds, so an idle or slow client
  cannot pin a connection (it is closed with 408);
- a handler exception becomes a 500 with the message, and never kills the server.

A handler is ``async def handler(req: Request) -> Response``. ``Response.after`` is an optional
callable run once the response has been written (``/quitquitquit`` uses it so that the client
gets its answer before the process starts shutting down). ``Response.stream`` (an async
iterator of bytes) makes a streaming response: no ``Content-Length``, the body is written
chunk by chunk until the iterator ends or the client goes away (``/tap`` uses it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["MAX_BODY", "MAX_HEAD", "HttpServer", "Request", "Response"]

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
log = logging.getLogger("ztunnel.admin")


@dataclass
class Request:
    method: str
    target: str  # raw request target, e.g. "/logging?level=debug"
    path: str  # percent-decoded path without the query
    query: dict[str, list[str]]  # keys present without a value map to [""]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes = b""
    peer: Any = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default


@dataclass
class Response:
    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    after: Callable[[], Any] | None = None
    stream: AsyncIterator[bytes] | None = None

    def encode(self, head_only: bool = False) -> bytes:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        hdrs = {"Content-Type": self.content_type, **self.headers}
        if self.stream is None:
            hdrs["Content-Length"] = str(len(body))
        hdrs["Connection"] = "close"
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + body


def text(status: int, body: str) -> Response:
    return Response(status, body if body.endswith("\n") else body + "\n")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


Handler = Callable[[Request], Awaitable[Response]]

# Statuses sent before the request was fully read: the client may still be sending.
_UNREAD_STATUSES = frozenset({400, 408, 413, 431, 501, 505})


async def _lingering_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and discard a bounded amount of input, so that closing with unread data does
    not reset the connection before the client has read our error response."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            for _ in range(64):  # at most 64 x 64 KiB
                if not await reader.read(65536):
                    break
    except (TimeoutError, ConnectionError, asyncio.LimitOverrunError):
        pass


async def _write_stream(stream: AsyncIterator[bytes], writer: asyncio.StreamWriter) -> None:
    """Copy a streaming body to the client; ``drain`` paces a slow reader. The iterator is
    always closed, so its cleanup runs even when the client went away."""
    try:
        async for chunk in stream:
            writer.write(chunk)
            await writer.drain()
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class HttpServer:
    """Serve ``handler`` on a TCP socket; ``start`` binds, ``close`` stops."""

    def __init__(self, handler: Handler, *, name: str, read_timeout: float = 10.0):
        self.handler = handler
        self.name = name
        self.read_timeout = read_timeout
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Listen on ``sock`` if given, else on host:port (0 = any free port); returns the
        bound address. A busy port raises OSError naming the server."""
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
        else:
            try:
                self._server = await asyncio.start_server(
                    self._serve, host, port, reuse_address=True, limit=MAX_HEAD
                )
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"{self.name} server cannot listen on {host}:{port}: {e.strerror} "
                    "(is another ztunnel running, or the port taken?)",
                ) from e
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.name} server is not started")
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        resp: Response | None = None
        head_only = False
        try:
            try:
                req = await asyncio.wait_for(self._read(reader, writer), self.read_timeout)
            except TimeoutError:
                resp = text(408, "request not received in time")
            except _BadRequest as e:
                resp = text(e.status, str(e))
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            else:
                head_only = req.method == "HEAD"
                resp = await self._handle(req)
            writer.write(resp.encode(head_only))
            await writer.drain()
            if resp.stream is not None and not head_only:
                await _write_stream(resp.stream, writer)
            if resp.status >= 400 and resp.status in _UNREAD_STATUSES:
                await _lingering_close(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            if task is not None:
                self._conns.discard(task)
            if resp is not None and resp.after is not None:
                try:
                    result = resp.after()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("%s: post-response action failed", self.name)

    async def _handle(self, req: Request) -> Response:
        try:
            return await self.handler(req)
        except Exception as e:
            log.exception("%s: handler for %s %s failed", self.name, req.method, req.path)
            return text(500, f"internal error: {e}")

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as e:
            raise _BadRequest(431, f"request head larger than {MAX_HEAD} bytes") from e
        except asyncio.IncompleteReadError as e:
            if len(e.partial) > MAX_HEAD:
                raise _BadRequest(431, f"request head larger than {MAX_HEAD} bytes") from e
            raise
        if len(head) > MAX_HEAD:
            raise _BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError as e:
            raise _BadRequest(400, "malformed request line") from e
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"unsupported protocol {version!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, f"malformed header line {line[:60]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        body = b""
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError as e:
                raise _BadRequest(400, "invalid Content-Length") from e
            if length < 0:
                raise _BadRequest(400, "invalid Content-Length")
            if length > MAX_BODY:
                raise _BadRequest(413, f"request body larger than {MAX_BODY} bytes")
            body = await reader.readexactly(length)
        parts = urlsplit(target)
        return Request(
            method=method.upper(),
            target=target,
            path=unquote(parts.path) or "/",
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=headers,
            body=body,
            peer=writer.get_extra_info("peername"),
        )
