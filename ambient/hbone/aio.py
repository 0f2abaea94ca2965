"""asyncio edge for HBONE: one ``asyncio.Protocol`` per mTLS connection, streams, relay.

Role: drive the sans-I/O ``protocol`` module with a real (TLS) transport. ``HboneConnection``
feeds received bytes to the state machine, dispatches its events to ``HboneStream`` objects
and writes what it produces; ``start_hbone_server`` / ``serve_hbone`` accept connections and
hand each valid CONNECT to a handler; ``open_hbone_connection`` dials one as a client;
``relay`` copies bytes between a stream and a TCP socket.

Invariants:
* The peer's SPIFFE identity is verified (``ambient.tls.verify_peer``) in ``connection_made``,
  before any HTTP/2 byte is processed; a failure aborts the transport.
* Backpressure end to end: bytes a stream has received are acknowledged to HTTP/2 flow
  control only when the consumer calls ``read`` again (i.e. after it wrote the previous chunk
  onwards), and ``write`` waits for HTTP/2 window and for the transport to drain.
* Writes are coalesced: the connection flushes once per event-loop iteration, not per call.
* When the connection dies, every stream is failed (readers and writers wake with an error).
* Server side, nothing waits on a peer forever: TLS and the client's HTTP/2 preface must
  arrive within ``handshake_timeout`` of the accept; with ``idle_timeout``, a stream that
  moved no byte either way (for example, stuck behind a peer's zero window) for between one
  and two ``idle_timeout`` is reset, and a connection without streams for as long gets
  GOAWAY. Keepalive PINGs close a peer that stops answering.
* A CONNECT the server did not process (RST_STREAM REFUSED_STREAM, as a draining server
  answers with ``Incoming.refuse``, or a stream above a GOAWAY's last stream id) fails with
  ``HboneConnectError`` reason ``unprocessed``, and its client connection stops taking new
  streams (``refusing``): the caller may safely retry it on another connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ..identity import SpiffeId
from ..tls import PeerVerificationError, classify_handshake_error, verify_peer
from .protocol import (
    ConnectionLost,
    ConnectionTerminated,
    ConnectRequest,
    ConnectResponse,
    ErrorCode,
    HboneClientProtocol,
    HboneError,
    HboneEvent,
    HboneProtocolError,
    HboneServerProtocol,
    HboneSettings,
    RequestRejected,
    StreamData,
    StreamEnded,
    StreamGone,
    StreamReset,
    StreamWritable,
)

__all__ = [
    "READ_SIZE",
    "HboneConnection",
    "HboneConnectError",
    "HboneStream",
    "Handler",
    "Incoming",
    "RelayResult",
    "StreamConsumer",
    "StreamResetError",
    "open_hbone_connection",
    "relay",
    "serve_hbone",
    "start_hbone_server",
]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # TCP-side read size in relay
_TRANSPORT_HIGH_WATER = 4 * 1024 * 1024
HANDSHAKE_TIMEOUT = 15.0  # server: TLS + the client's HTTP/2 preface, from the accept
_PREFACE_LEN = 24 + 9  # client magic + one frame header (its SETTINGS)
_CLOSE_GRACE = 1.0  # s a cancelled server connection gets to flush its GOAWAY


class StreamResetError(HboneError, ConnectionResetError):
    """The stream (or its whole connection) was reset; no more bytes either way."""

    def __init__(self, message: str, error_code: int = ErrorCode.CANCEL) -> None:
        super().__init__(message)
        self.error_code = error_code


class HboneConnectError(HboneError):
    """Opening an HBONE tunnel failed. ``status`` is the HTTP status when the peer answered,
    else ``reason`` is a short token (timeout, refused, tls, identity, closed, reset,
    unprocessed: the server did not process the CONNECT, so it is safe to retry elsewhere)."""

    def __init__(self, status_or_reason: int | str, message: str) -> None:
        super().__init__(message)
        self.status: int | None = status_or_reason if isinstance(status_or_reason, int) else None
        if isinstance(status_or_reason, str):
            self.reason: str = status_or_reason
        else:
            self.reason = f"http-{status_or_reason}"
        self.message = message


class HboneStream:
    """One CONNECT tunnel: a bidirectional byte stream with independent half-close."""

    __slots__ = (
        "_conn", "stream_id", "request", "response_headers", "_chunks", "_eof", "_error",
        "_unacked", "_pending_ack", "_read_waiter", "_write_waiter", "_local_done",
        "_remote_done", "_finished", "_response", "_consumer", "_hold_acks",
        "_activity", "_swept",
    )

    def __init__(self, conn: HboneConnection, stream_id: int,
                 request: ConnectRequest | None = None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request = request
        self.response_headers: dict[str, str] = {}
        self._chunks: list[bytes] = []  # a list: 56 bytes empty, a deque ~600 (per stream)
        self._unacked = 0  # flow-controlled bytes queued in _chunks
        self._pending_ack = 0  # handed to the reader, acked on its next read
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._local_done = False
        self._remote_done = False
        self._finished = False
        self._response: asyncio.Future[ConnectResponse] | None = None
        self._consumer: StreamConsumer | None = None
        self._hold_acks = False
        self._activity = 0  # bumped per chunk each way; the idle sweep compares snapshots
        self._swept = -1

    # -- public ---------------------------------------------------------------------------

    @property
    def peer_identity(self) -> SpiffeId | None:
        return self._conn.peer_identity

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    @property
    def read_ready(self) -> bool:
        """``read`` would return at once: bytes queued, the peer half-closed, or an error."""
        return bool(self._chunks) or self._eof or self._error is not None

    async def read(self) -> bytes:
        """Everything received so far (waits for some); ``b""`` once the peer half-closed.

        Calling ``read`` again tells flow control the previous chunk was consumed.
        """
        self._ack()
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._read_waiter = self._conn._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._pending_ack, self._unacked = self._unacked, 0
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes; returns once HTTP/2 window and the transport have room again."""
        self._queue(data)
        conn = self._conn
        while self._error is None and (conn.proto.buffered(self.stream_id) or conn._paused):
            self._write_waiter = conn._loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
        if self._error is not None:
            raise self._error

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue bytes without waiting; False means "stop producing until ``writable``".

        For callback-driven producers (``attach``): after False, wait for the consumer's
        ``stream_writable`` and check ``writable`` before sending more.
        """
        self._queue(data)
        return self.writable

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._local_done:
            raise StreamResetError(f"stream {self.stream_id}: write after write_eof")
        try:
            self._conn.proto.send_data(self.stream_id, data)
        except StreamGone as e:
            raise StreamResetError(str(e)) from None
        self._activity += 1
        self._conn._schedule_flush()

    @property
    def writable(self) -> bool:
        """No bytes wait for HTTP/2 window and the TLS transport is not paused."""
        return not (self._conn.proto.buffered(self.stream_id) or self._conn._paused)

    def attach(self, consumer: StreamConsumer) -> None:
        """Deliver received bytes by callback instead of ``read`` (no task per direction).

        Bytes already queued are delivered now. Window is given back as soon as the consumer
        returns, unless it called ``hold_acks`` (its sink is full); ``release_acks`` then
        gives back what it held. EOF and failure are reported to the consumer (failure once).
        """
        self._consumer = consumer
        self._ack()
        queued, self._chunks = self._chunks, []
        for chunk in queued:
            consumer.stream_data(chunk)
        self._pending_ack, self._unacked = self._unacked, 0
        if not self._hold_acks:
            self._ack()
        if self._error is not None:
            consumer.stream_failed(self._error)
        elif self._eof:
            consumer.stream_eof()

    def hold_acks(self) -> None:
        """Stop returning window for delivered bytes (the consumer's sink is full)."""
        self._hold_acks = True

    def release_acks(self) -> None:
        """Return the window held since ``hold_acks``."""
        self._hold_acks = False
        self._ack()

    def write_eof(self) -> None:
        """Half-close our direction; reads continue until the peer half-closes too."""
        if self._local_done or self._error is not None:
            return
        self._local_done = True
        try:
            self._conn.proto.end_stream(self.stream_id)
        except StreamGone:
            pass
        self._conn._schedule_flush()
        self._maybe_finished()

    def abort(self, error_code: int = ErrorCode.CANCEL) -> None:
        """Reset both directions now."""
        if self._finished:
            return
        self._conn.proto.reset_stream(self.stream_id, error_code)
        self._conn._schedule_flush()
        self._fail(StreamResetError(f"stream {self.stream_id} aborted locally", error_code))

    def close(self) -> None:
        """Finish politely: half-close ours; reset if the peer is still sending."""
        self.write_eof()
        if not self._remote_done:
            self.abort(ErrorCode.NO_ERROR)

    # -- fed by the connection ------------------------------------------------------------

    def _ack(self) -> None:
        if self._pending_ack:
            self._conn.proto.acknowledge_received_data(self.stream_id, self._pending_ack)
            self._pending_ack = 0
            self._conn._schedule_flush()

    def _feed(self, data: bytes, n: int) -> None:
        # ``data`` is never empty: the protocol acknowledges padding-only frames itself.
        self._activity += 1
        consumer = self._consumer
        if consumer is not None:
            self._pending_ack += n
            consumer.stream_data(data)
            if not self._hold_acks:
                self._ack()
            return
        self._chunks.append(data)
        self._unacked += n
        self._wake_reader()

    def _feed_eof(self) -> None:
        self._eof = True
        self._remote_done = True
        if self._consumer is not None:
            self._consumer.stream_eof()
        self._wake_reader()
        self._maybe_finished()

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self) -> None:
        if self._consumer is not None and self._error is None:
            self._consumer.stream_writable()
        w = self._write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        first = self._error is None
        if first:
            self._error = exc
        self._local_done = self._remote_done = True
        if self._response is not None and not self._response.done():
            self._response.set_exception(exc)
        self._wake_reader()
        self._wake_writer()
        if first and self._consumer is not None:
            self._consumer.stream_failed(exc)
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._local_done and self._remote_done and not self._finished:
            self._finished = True
            self._conn._stream_finished(self)


class StreamConsumer(Protocol):
    """What ``HboneStream.attach`` calls back, on the event loop."""

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_failed(self, exc: BaseException) -> None: ...

    def stream_writable(self) -> None: ...


@dataclass(slots=True)
class RelayResult:
    """Bytes copied each way by ``relay``; ``error`` is the first failure, if any."""

    to_stream: int = 0  # reader (TCP) -> HBONE stream
    from_stream: int = 0  # HBONE stream -> writer (TCP)
    error: BaseException | None = None


class Incoming:
    """A validated CONNECT waiting for the handler's decision."""

    __slots__ = ("request", "connection", "_stream", "responded")

    def __init__(self, conn: HboneConnection, stream: HboneStream, request: ConnectRequest) -> None:
        self.request = request
        self.connection = conn
        self._stream = stream
        self.responded = False

    @property
    def local_address(self) -> tuple[Any, ...] | None:
        """The address the client dialled (our side of the TLS connection)."""
        return self.connection.local_address

    @property
    def peer_address(self) -> tuple[Any, ...] | None:
        return self.connection.peer_address

    def accept(self, headers: Iterable[tuple[str, str]] = ()) -> HboneStream:
        """Answer 200 and return the tunnel stream."""
        self._respond(200, headers)
        return self._stream

    def refuse(self) -> None:
        """Leave the CONNECT unprocessed (RST_STREAM REFUSED_STREAM, RFC 9113 §8.7): the
        client may retry it on another connection. What a draining server answers."""
        if self.responded:
            raise RuntimeError("this CONNECT was already answered")
        self.responded = True
        self._stream.abort(ErrorCode.REFUSED_STREAM)

    def reject(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer with a non-200 status (400 bad request, 401 denied, 503 upstream failed)."""
        if status == 200:
            raise ValueError("use accept() for 200")
        self._respond(status, headers)
        self._stream._fail(StreamResetError(f"rejected with {status}"))

    def _respond(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        if self.responded:
            raise RuntimeError("this CONNECT was already answered")
        self.responded = True
        conn = self.connection
        conn.last_answered = max(conn.last_answered, self._stream.stream_id)
        try:
            conn.proto_server.respond(self._stream.stream_id, status, headers)
        except StreamGone as e:
            raise StreamResetError(str(e)) from None
        finally:
            self.connection._schedule_flush()


Handler = Callable[[ConnectRequest, SpiffeId, Incoming], Awaitable[None]]


class HboneConnection(asyncio.Protocol):
    """One HBONE connection (either role) over an asyncio TLS transport."""

    def __init__(
        self,
        proto: HboneServerProtocol | HboneClientProtocol,
        *,
        trust_domain: str,
        expected: Iterable[SpiffeId] | None = None,
        handler: Handler | None = None,
        handshake_deadline: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.proto = proto
        self.trust_domain = trust_domain
        self.expected = frozenset(expected) if expected is not None else None
        self.handler = handler
        self.peer_identity: SpiffeId | None = None
        self.local_address: tuple[Any, ...] | None = None
        self.peer_address: tuple[Any, ...] | None = None
        self.streams: dict[int, HboneStream] = {}
        self.active_streams = 0  # streams not yet finished (pool capacity accounting)
        self.idle_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.on_idle: Callable[[HboneConnection], None] | None = None
        # Client side: the server refused a stream unprocessed (it is draining); open no
        # new stream here, let the live ones finish.
        self.refusing = False
        # Server side: the highest CONNECT answered; a GOAWAY of ours tells the client that
        # the streams above it were not processed (so it may send them again elsewhere).
        self.last_answered = 0
        # Bounds on a slow or silent peer (server side; see the module docstring).
        self._handshake_deadline = handshake_deadline
        self._idle_timeout = idle_timeout or None
        self._received = 0  # bytes from the peer, until its preface is in
        self._guard: asyncio.TimerHandle | None = None
        self._quiet_since = self._loop.time()

    @property
    def proto_server(self) -> HboneServerProtocol:
        assert isinstance(self.proto, HboneServerProtocol)
        return self.proto

    @property
    def is_usable(self) -> bool:
        return (self.ready.done() and not self.closed.done() and not self.proto.closed
                and not self.refusing)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have the same methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.local_address = transport.get_extra_info("sockname")
        self.peer_address = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=_TRANSPORT_HIGH_WATER)
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            if ssl_object is None:
                raise PeerVerificationError("handshake", "HBONE requires TLS; got plaintext")
            if ssl_object.selected_alpn_protocol() != "h2":
                raise PeerVerificationError(
                    "handshake", "the peer did not negotiate ALPN h2; is it an HBONE endpoint?"
                )
            self.peer_identity = verify_peer(
                ssl_object, trust_domain=self.trust_domain, expected=self.expected
            )
        except PeerVerificationError as e:
            log.warning("HBONE peer %s refused: %s", self.peer_address, e)
            if not self.ready.done():
                self.ready.set_exception(e)
            transport.abort()
            return
        self.proto.initiate()
        self._flush()
        self._arm_timer()
        if self._handshake_deadline is not None:
            self._guard = self._loop.call_at(self._handshake_deadline, self._check_preface)
        elif self._idle_timeout is not None:
            self._guard = self._loop.call_later(self._idle_timeout, self._sweep_idle)
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._received < _PREFACE_LEN:
            self._received += len(data)
        try:
            events = self.proto.receive_data(data, self._loop.time())
        except HboneProtocolError as e:
            log.info("HBONE connection from %s closed: %s", self.peer_address, e)
            self._flush()
            self._shutdown(StreamResetError(str(e), e.error_code))
            return
        self._dispatch(events)
        self._flush()

    def eof_received(self) -> bool | None:
        return False  # close the transport; an HTTP/2 peer never half-closes TCP

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown(StreamResetError(f"HBONE connection lost: {exc or 'closed by peer'}"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for stream in list(self.streams.values()):
            stream._wake_writer()

    # -- client ---------------------------------------------------------------------------

    def open_stream_nowait(
        self, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Send a CONNECT now (synchronously reserving capacity); await ``wait_response``."""
        assert isinstance(self.proto, HboneClientProtocol)
        sid = self.proto.connect(authority, headers)
        stream = HboneStream(self, sid)
        stream._response = self._loop.create_future()
        self.streams[sid] = stream
        self._stream_started()
        self._schedule_flush()
        return stream

    async def open_stream(
        self, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """CONNECT to ``authority``; returns the stream on 200, else HboneConnectError."""
        stream = self.open_stream_nowait(authority, headers)
        await wait_response(stream, authority)
        return stream

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """GOAWAY and close the transport (open streams are cut off). A server's GOAWAY names
        the last CONNECT it answered, so the client retries the ones still in flight."""
        self.proto.close(last_stream_id=None if self.proto.client_side else self.last_answered)
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None and not self.closed.done():
            self._transport.abort()

    # -- internals ------------------------------------------------------------------------

    def _dispatch(self, events: list[HboneEvent]) -> None:
        streams = self.streams
        for ev in events:
            if isinstance(ev, StreamData):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._feed(ev.data, ev.flow_controlled_length)
                else:
                    self.proto.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, StreamWritable):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._wake_writer()
            elif isinstance(ev, StreamEnded):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._feed_eof()
            elif isinstance(ev, StreamReset):
                s = streams.get(ev.stream_id)
                if ev.error_code == ErrorCode.REFUSED_STREAM and self.proto.client_side:
                    self.refusing = True
                if s is not None:
                    s._fail(StreamResetError(
                        f"stream {ev.stream_id} reset by peer (code {ev.error_code})",
                        ev.error_code))
            elif isinstance(ev, ConnectRequest):
                self._on_request(ev)
            elif isinstance(ev, ConnectResponse):
                s = streams.get(ev.stream_id)
                if s is not None and s._response is not None and not s._response.done():
                    s.response_headers = ev.headers
                    s._response.set_result(ev)
                    if ev.status != 200:
                        s._fail(StreamResetError(f"CONNECT answered {ev.status}"))
            elif isinstance(ev, RequestRejected):
                log.info("HBONE request from %s (%s) rejected: %s",
                         self.peer_address, self.peer_identity, ev.reason)
            elif isinstance(ev, ConnectionTerminated):
                if self.proto.client_side:  # CONNECTs above last_stream_id: not processed
                    for sid, s in list(streams.items()):
                        if sid <= ev.last_stream_id or s._response is None \
                                or s._response.done():
                            continue
                        s._fail(StreamResetError(
                            f"stream {sid} not processed by the peer (GOAWAY, last stream "
                            f"{ev.last_stream_id})", ErrorCode.REFUSED_STREAM))
                self._shutdown(StreamResetError(
                    f"HBONE connection closed: GOAWAY code {ev.error_code} {ev.reason}"))
            elif isinstance(ev, ConnectionLost):
                self._shutdown(StreamResetError(f"HBONE connection closed: {ev.reason}"))

    def _on_request(self, req: ConnectRequest) -> None:
        stream = HboneStream(self, req.stream_id, req)
        self.streams[req.stream_id] = stream
        self._stream_started()
        incoming = Incoming(self, stream, req)
        if self.handler is None or self.peer_identity is None:
            incoming.reject(503)
            return
        task = self._loop.create_task(self._run_handler(incoming))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, incoming: Incoming) -> None:
        assert self.handler is not None and self.peer_identity is not None
        stream = incoming._stream
        try:
            await self.handler(incoming.request, self.peer_identity, incoming)
        except Exception:
            log.exception("HBONE handler failed for %s", incoming.request.authority)
            if not incoming.responded:
                incoming.reject(503)
            else:
                stream.abort(ErrorCode.INTERNAL_ERROR)
            return
        if not incoming.responded:
            incoming.reject(503)

    def _stream_started(self) -> None:
        self.active_streams += 1
        self.idle_since = None

    def _stream_finished(self, stream: HboneStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.active_streams -= 1
        if self.active_streams == 0:
            self.idle_since = self._loop.time()
            if self.on_idle is not None:
                self.on_idle(self)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        vec = self.proto.data_to_send_vec()
        if vec and self._transport is not None and not self._transport.is_closing():
            if len(vec) == 1:
                self._transport.write(vec[0])
            else:
                self._transport.writelines(vec)  # DATA payloads go to TLS without a join

    def _arm_timer(self) -> None:
        if self.closed.done():
            return
        self._timer = self._loop.call_at(self.proto.next_tick_at(), self._on_timer)

    def _on_timer(self) -> None:
        events = self.proto.tick(self._loop.time())
        self._flush()
        if events:
            self._dispatch(events)
            if self._transport is not None:
                self._transport.abort()
            return
        self._arm_timer()

    def _check_preface(self) -> None:
        """The handshake deadline passed: the peer must have sent its HTTP/2 preface."""
        self._guard = None
        if self.closed.done():
            return
        if self._received < _PREFACE_LEN:
            log.info("HBONE peer %s sent no HTTP/2 preface within the handshake timeout; "
                     "closing", self.peer_address)
            self._shutdown(StreamResetError("no HTTP/2 preface within the handshake timeout"))
            if self._transport is not None:
                self._transport.abort()
            return
        if self._idle_timeout is not None:
            self._guard = self._loop.call_later(self._idle_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Reset streams that moved no byte since the last sweep; close an unused connection."""
        self._guard = None
        if self.closed.done() or self._idle_timeout is None:
            return
        now = self._loop.time()
        for stream in list(self.streams.values()):
            if stream._activity == stream._swept:
                log.info("HBONE stream %d from %s idle for over %gs; resetting",
                         stream.stream_id, self.peer_address, self._idle_timeout)
                stream.abort(ErrorCode.CANCEL)
            else:
                stream._swept = stream._activity
        if self.streams:
            self._quiet_since = now
        elif self.idle_since is not None:
            self._quiet_since = max(self._quiet_since, self.idle_since)
        if not self.streams and now - self._quiet_since >= self._idle_timeout:
            log.info("HBONE connection from %s unused for %gs; closing",
                     self.peer_address, self._idle_timeout)
            self.close()
            if self._transport is not None and self._transport.get_write_buffer_size():
                self._transport.abort()  # a peer that stopped reading would hold it open
            return
        self._guard = self._loop.call_later(self._idle_timeout, self._sweep_idle)

    def _shutdown(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        for stream in list(self.streams.values()):
            stream._fail(exc)
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # mark retrieved
        if not self.closed.done():
            self.closed.set_result(None)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def wait_response(stream: HboneStream, authority: str) -> ConnectResponse:
    """Wait for the answer to a CONNECT; raise HboneConnectError unless it is 200."""
    assert stream._response is not None
    try:
        resp = await stream._response
    except StreamResetError as e:
        if e.error_code == ErrorCode.REFUSED_STREAM:
            raise HboneConnectError(
                "unprocessed", f"CONNECT {authority} was refused unprocessed (the peer is "
                f"draining or going away): {e}") from None
        raise HboneConnectError(
            "reset", f"CONNECT {authority} failed before a response: {e}"
        ) from None
    if resp.status != 200:
        raise HboneConnectError(resp.status, _status_message(resp.status, authority))
    return resp


def _status_message(status: int, authority: str) -> str:
    hint = {
        400: "the destination refused the request (bad authority, or it is not the pod's IP)",
        401: "denied by an AuthorizationPolicy at the destination",
        503: "the destination could not reach the workload, or does not know it",
    }.get(status, "unexpected status")
    return f"CONNECT {authority} answered {status}: {hint}"


# ---------------------------------------------------------------------------------------------
# Server and client entry points


def _server_factory(
    handler: Handler, trust_domain: str, settings: HboneSettings | None,
    handshake_timeout: float | None = None, idle_timeout: float | None = None,
) -> Callable[[], HboneConnection]:
    loop = asyncio.get_running_loop()

    def factory() -> HboneConnection:
        deadline = loop.time() + handshake_timeout if handshake_timeout else None
        return HboneConnection(HboneServerProtocol(settings), trust_domain=trust_domain,
                               handler=handler, handshake_deadline=deadline,
                               idle_timeout=idle_timeout)

    return factory


async def start_hbone_server(
    handler: Handler,
    ssl_ctx: ssl.SSLContext,
    *,
    trust_domain: str,
    host: str | None = None,
    port: int = 0,
    sock: socket.socket | None = None,
    settings: HboneSettings | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = None,
) -> asyncio.Server:
    """Listen for HBONE (host/port, or an already bound listening ``sock``).

    ``handshake_timeout`` bounds TLS plus the client's HTTP/2 preface; ``idle_timeout``
    (off when None or 0) resets streams and closes connections that stay idle."""
    loop = asyncio.get_running_loop()
    factory = _server_factory(handler, trust_domain, settings, handshake_timeout, idle_timeout)
    hs = handshake_timeout or None
    if sock is not None:
        return await loop.create_server(factory, sock=sock, ssl=ssl_ctx, ssl_handshake_timeout=hs)
    return await loop.create_server(factory, host, port, ssl=ssl_ctx, ssl_handshake_timeout=hs)


async def serve_hbone(
    sock: socket.socket,
    ssl_ctx: ssl.SSLContext,
    handler: Handler,
    *,
    trust_domain: str,
    settings: HboneSettings | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = None,
) -> HboneConnection:
    """Serve one accepted TCP socket (TLS handshake included) until the connection closes.

    Timeouts as for ``start_hbone_server``; a handshake that runs out raises
    ``ConnectionAbortedError`` (the socket is closed)."""
    loop = asyncio.get_running_loop()
    factory = _server_factory(handler, trust_domain, settings, handshake_timeout, idle_timeout)
    made: list[HboneConnection] = []

    def recording_factory() -> HboneConnection:
        made.append(factory())
        return made[-1]

    # uvloop returns its SSLProtocol here rather than ours: keep the one the factory built.
    try:
        await loop.connect_accepted_socket(recording_factory, sock, ssl=ssl_ctx,
                                           ssl_handshake_timeout=handshake_timeout or None)
        await made[0].closed
    except asyncio.CancelledError:
        # The transport owns the socket (closing the fd under a live transport would leave it
        # serving, or break fd reuse): GOAWAY and close, and abort if that has not finished
        # within a second (a peer that stopped reading).
        if made:
            made[0].close()
            loop.call_later(_CLOSE_GRACE, made[0].abort)
        else:
            sock.close()
        raise
    return made[0]


async def open_hbone_connection(
    sock: socket.socket,
    ssl_ctx: ssl.SSLContext,
    *,
    trust_domain: str,
    expected: Iterable[SpiffeId] | None,
    settings: HboneSettings | None = None,
) -> HboneConnection:
    """TLS-handshake a connected socket and verify the server's identity (no SNI).

    Raises ``PeerVerificationError`` (classified) when TLS or the identity check fails.
    """
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(
            lambda: HboneConnection(HboneClientProtocol(settings), trust_domain=trust_domain,
                                    expected=expected),
            sock=sock, ssl=ssl_ctx, server_hostname="",
        )
    except (ssl.SSLError, ConnectionError) as e:
        raise classify_handshake_error(e) from e
    await conn.ready
    return conn


# ---------------------------------------------------------------------------------------------
# Relay


async def relay(
    stream: HboneStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    read_size: int = READ_SIZE,
) -> RelayResult:
    """Copy both ways until both are half-closed; half-close propagates each way.

    On an error either way, both sides are aborted. Returns the byte counts.
    """
    result = RelayResult()

    async def upstream() -> None:  # TCP -> HBONE
        while True:
            data = await reader.read(read_size)
            if not data:
                stream.write_eof()
                return
            await stream.write(data)
            result.to_stream += len(data)

    async def downstream() -> None:  # HBONE -> TCP
        while True:
            data = await stream.read()
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            result.from_stream += len(data)

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        for fut in asyncio.as_completed(tasks):
            try:
                await fut
            except (OSError, HboneError, asyncio.IncompleteReadError) as e:
                result.error = e
                stream.abort()
                writer.transport.abort()
                break
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if result.error is None:
            stream.close()
        writer.close()
    return result
