"""Protocol-neutral HTTP messages inside the waypoint: heads, streaming bodies, header helpers.

Role: the seam between the codecs (``waypoint.h1`` for HTTP/1.1, ``waypoint.h2conn`` for
HTTP/2) and the request pipeline (``waypoint.exchange``). A codec turns wire bytes into an
``HttpRequest`` / ``HttpResponse`` whose body is a ``Body`` it keeps feeding; the pipeline
reads bodies chunk by chunk and hands new messages to the other side's codec.

Invariants:
* Header names are lower-case ``str``; values are ``str`` (latin-1 round trip of the wire
  bytes). Pseudo-headers never appear in ``headers``: method/scheme/authority/target are fields.
* ``Body`` is a single-reader stream with backpressure: the producer's ``on_consumed`` callback
  runs only once the reader has taken bytes (HTTP/2 acknowledges flow control there), and
  ``wait_room`` lets a producer that has no flow control of its own (HTTP/1.1) stop reading the
  socket while ``limit`` bytes are queued.
* Hop-by-hop headers (RFC 9110 §7.6.1) are removed by ``end_to_end`` before a message crosses
  the proxy, as is anything the ``Connection`` header names.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "HOP_BY_HOP",
    "Body",
    "BodyError",
    "ByteStream",
    "Handler",
    "Headers",
    "HttpRequest",
    "HttpResponse",
    "content_length",
    "end_to_end",
    "get_header",
]

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
    "trailer", "proxy-authenticate", "proxy-authorization", "http2-settings",
})

DEFAULT_BODY_LIMIT = 256 * 1024  # queued bytes before an HTTP/1.1 producer pauses


class BodyError(Exception):
    """The body could not be delivered completely (peer reset, connection lost, timeout)."""


def get_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of ``name`` (lower-case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The declared ``content-length``, or None when absent or not a plain number."""
    cl = get_header(headers, "content-length")
    return int(cl) if cl is not None and cl.isdigit() else None


def end_to_end(headers: Iterable[tuple[str, str]], *, keep_te_trailers: bool = False) -> Headers:
    """``headers`` without hop-by-hop fields (and the fields ``Connection`` lists).

    ``te: trailers`` is end-to-end for gRPC over HTTP/2 and kept when ``keep_te_trailers``.
    """
    hs = headers if isinstance(headers, list) else list(headers)
    drop = HOP_BY_HOP
    for k, v in hs:
        if k == "connection":
            drop = drop | {t for tok in v.split(",") if (t := tok.strip().lower())}
    out: Headers = []
    for k, v in hs:
        if k in drop or k[:1] == ":":
            if k == "te" and keep_te_trailers and v.strip().lower() == "trailers":
                out.append((k, "trailers"))
            continue
        out.append((k, v))
    return out


class Body:
    """An incoming message body: chunks in order, then end (with trailers) or an error."""

    def __init__(
        self,
        on_consumed: Callable[[int], None] | None = None,
        *,
        limit: int = DEFAULT_BODY_LIMIT,
        length: int | None = None,
    ) -> None:
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._on_consumed = on_consumed
        self.limit = limit
        self.length = length  # Content-Length when the sender declared one
        self.trailers: Headers = []
        self.received = 0  # bytes fed so far
        self.read_bytes = 0  # bytes handed to the reader so far

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def empty(cls) -> Body:
        b = cls()
        b.length = 0
        b.end()
        return b

    @classmethod
    def of(cls, data: bytes, trailers: Iterable[tuple[str, str]] = ()) -> Body:
        """A complete body holding ``data`` (replayed bodies, local responses)."""
        b = cls()
        b.length = len(data)
        if data:
            b.feed(data)
        b.end(trailers)
        return b

    # -- producer side -------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The producer has delivered everything (the reader may not have read it all)."""
        return self._ended

    @property
    def complete(self) -> bool:
        """Ended without error and fully buffered: what ``buffered`` returns is the body."""
        return self._ended and self._error is None and self.read_bytes == 0

    def feed(self, data: bytes) -> None:
        if self._ended or self._error is not None or not data:
            return
        self._chunks.append(data)
        self._queued += len(data)
        self.received += len(data)
        self._wake()

    def end(self, trailers: Iterable[tuple[str, str]] = ()) -> None:
        if self._ended or self._error is not None:
            return
        self.trailers = list(trailers)
        self._ended = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._ended or self._error is not None:
            return
        self._error = exc
        self._wake()
        self._wake_room()

    async def wait_room(self) -> None:
        """Wait while ``limit`` or more bytes are queued (HTTP/1.1 read backpressure)."""
        while self._queued >= self.limit and self._error is None:
            self._room_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._room_waiter
            finally:
                self._room_waiter = None

    # -- reader side ---------------------------------------------------------------------

    async def read(self) -> bytes:
        """The next bytes available (waits); ``b""`` at the end. Raises ``BodyError``."""
        while not self._chunks:
            if self._error is not None:
                raise BodyError(str(self._error) or type(self._error).__name__)
            if self._ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        self.read_bytes += len(data)
        if self._on_consumed is not None:
            self._on_consumed(len(data))
        self._wake_room()
        return data

    def take_ended(self) -> bytes | None:
        """Everything left, at once, if the producer has ended without error (the reader
        takes it as ``read`` would); None while bytes may still come. No waiting."""
        if not self._ended or self._error is not None:
            return None
        chunks = self._chunks
        data = b"" if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        if data:
            self.read_bytes += len(data)
            if self._on_consumed is not None:
                self._on_consumed(len(data))
        return data

    def buffered(self) -> bytes:
        """What is queued now, without consuming it (for replayable bodies)."""
        return b"".join(self._chunks)

    async def read_all(self, max_bytes: int) -> bytes:
        """Everything, up to ``max_bytes`` (BodyError beyond it)."""
        out = bytearray()
        while data := await self.read():
            out += data
            if len(out) > max_bytes:
                raise BodyError(f"body larger than {max_bytes} bytes")
        return bytes(out)

    async def drain(self, max_bytes: int) -> bool:
        """Read and drop up to ``max_bytes``; True if the body ended cleanly within it."""
        n = 0
        try:
            while data := await self.read():
                n += len(data)
                if n > max_bytes:
                    return False
        except BodyError:
            return False
        return True

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_room(self) -> None:
        w = self._room_waiter
        if w is not None and not w.done():
            w.set_result(None)


@dataclass
class HttpRequest:
    """A request head plus its streaming body. ``target`` is the path with its query."""

    method: str
    scheme: str
    authority: str
    target: str
    headers: Headers
    body: Body = field(default_factory=Body.empty)
    protocol: str = "HTTP/1.1"  # "HTTP/1.1" | "HTTP/2"

    def header(self, name: str) -> str | None:
        return get_header(self.headers, name)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class HttpResponse:
    """A response head plus its streaming body (trailers arrive on ``body.trailers``)."""

    status: int
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=Body.empty)
    # Called once by the downstream codec when the response is written (body bytes sent,
    # error or None); telemetry hangs off it.
    on_done: Callable[[int, BaseException | None], None] | None = None

    def done(self, sent: int, error: BaseException | None) -> None:
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(sent, error)

    def header(self, name: str) -> str | None:
        return get_header(self.headers, name)

    @classmethod
    def local(cls, status: int, text: str = "", headers: Iterable[tuple[str, str]] = (),
              *, content_type: str = "text/plain") -> HttpResponse:
        """A response the waypoint generates itself (denials, errors, redirects)."""
        data = text.encode()
        hs: Headers = list(headers)
        if data and get_header(hs, "content-type") is None:
            hs.append(("content-type", content_type))
        hs.append(("content-length", str(len(data))))
        return cls(status, hs, Body.of(data))


class ByteStream(Protocol):
    """What the codecs run over: an HBONE tunnel stream (or a test double of one)."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def abort(self) -> None: ...


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
