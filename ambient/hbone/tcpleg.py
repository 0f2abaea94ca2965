"""Callback-driven relays for the plaintext TCP legs: no StreamReader, no task per direction.

Role: the fast replacement for copying through ``asyncio.StreamReader``/``StreamWriter``.
A relay takes over the TCP transport of a stream pair (``transport.set_protocol``) and moves
each chunk the event loop hands it straight on: into an ``HboneStream`` (``splice_hbone``) or
into another TCP transport (``splice_tcp``). That removes two copies per byte (the
StreamReader buffer append and the slice out of it) and two coroutine switches per chunk.

Invariants:
* Backpressure both ways without buffering beyond the transports' own limits: a TCP source
  is paused while its sink (the other transport, or the stream's HTTP/2 window and TLS
  transport) is full, and HTTP/2 window is returned only once the TCP sink accepted the
  bytes below its high-water mark (``HboneStream.hold_acks``).
* Half-close propagates each way (EOF -> ``write_eof``/END_STREAM); the relay finishes when
  both directions ended, or at the first error, when both sides are aborted.
* Byte counts are exact as bytes flow, so a relay cut short still reports what it carried.
* Bytes the StreamReader had already buffered before the takeover are relayed first.

A listener that only relays does not need the StreamReader/StreamWriter pair at all:
:class:`Accepted` is the protocol of a connection accepted for a relay (paused from the start,
the kernel holding what the client sends) and every splice takes it in place of a pair
(~2 KB less per connection).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from .aio import HboneStream, RelayResult, StreamResetError
from .protocol import ErrorCode

__all__ = ["HIGH_WATER", "Accepted", "adopt", "splice_hbone", "splice_hbone_socket",
           "splice_tcp", "take_over"]

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]

HIGH_WATER = 1024 * 1024  # TCP write buffer above which the source is paused


class Accepted(asyncio.Protocol):
    """An accepted TCP connection waiting for its relay: reading is paused as soon as it is
    made; anything that still arrives before a relay takes over is kept in ``pending``."""

    __slots__ = ("transport", "pending", "eof", "lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.pending = bytearray()
        self.eof = False
        self.lost: BaseException | None = None  # closed before a relay took over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Not pause_reading() here: asyncio and uvloop both start reading *after*
        # connection_made and ignore a pause made in it.  Scheduled now, it runs before
        # anything the caller schedules from here (a handler task).
        asyncio.get_running_loop().call_soon(self._pause)

    def _pause(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.pending += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep the transport: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the client closed before the relay started")


Source = Pair | Accepted


def take_over(
    src: Source, protocol: asyncio.BaseProtocol
) -> tuple[asyncio.Transport, bytes, bool]:
    """Move the transport of ``src`` (an :class:`Accepted` connection or a stream pair) to
    ``protocol``; returns it, the bytes received before and whether EOF was seen."""
    if isinstance(src, Accepted):
        transport = src.transport
        pending, eof, lost = bytes(src.pending), src.eof, src.lost
        src.pending.clear()
    else:
        reader, writer = src
        transport = cast(asyncio.Transport, writer.transport)
        buf: bytearray = getattr(reader, "_buffer", bytearray())
        pending = bytes(buf)
        buf.clear()
        eof = reader.at_eof() or bool(getattr(reader, "_eof", False))
        lost = None
    transport.set_protocol(protocol)
    if lost is not None:
        protocol.connection_lost(cast(Exception, lost))  # the new owner must know
    transport.set_write_buffer_limits(high=HIGH_WATER)
    if not eof and not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()  # paused by Accepted, or by a full StreamReader
    return transport, pending, eof


async def adopt(sock: socket.socket, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
    """Wrap a connected socket in a transport driven by ``protocol`` directly (no
    StreamReader/StreamWriter pair is built only to be taken over: ~2 KB per connection).
    The socket is closed if that fails."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    transport = cast(asyncio.Transport, transport)
    transport.set_write_buffer_limits(high=HIGH_WATER)
    return transport


class _Leg(asyncio.Protocol):
    """The TCP side of a relay; forwards transport callbacks to its relay."""

    __slots__ = ("relay", "side")

    def __init__(self, relay: _Relay, side: int) -> None:
        self.relay = relay
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only for ``adopt`` (``take_over`` swaps protocols; its caller sets the transport);
        # data may arrive before ``adopt`` returns, so the relay must know its transport now.
        self.relay.attached(self.side, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.relay.on_data(self.side, data)

    def eof_received(self) -> bool:
        self.relay.on_eof(self.side)
        return True  # keep the transport open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.on_lost(self.side, exc)

    def pause_writing(self) -> None:
        self.relay.on_sink_full(self.side)

    def resume_writing(self) -> None:
        self.relay.on_sink_drained(self.side)


class _Relay:
    """Shared completion bookkeeping: a future resolved when both directions ended."""

    __slots__ = ("loop", "done", "error")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not self.done.done():
            self.error = exc
            self.abort()
            self.done.set_result(None)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        raise NotImplementedError

    def attached(self, side: int, transport: asyncio.Transport) -> None:
        raise NotImplementedError

    def on_data(self, side: int, data: bytes) -> None:
        raise NotImplementedError

    def on_eof(self, side: int) -> None:
        raise NotImplementedError

    def on_lost(self, side: int, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_sink_full(self, side: int) -> None:
        raise NotImplementedError

    def on_sink_drained(self, side: int) -> None:
        raise NotImplementedError

    async def wait(self) -> None:
        try:
            await self.done
        except asyncio.CancelledError:
            self.abort()
            raise


# ---------------------------------------------------------------------------------------------
# TCP <-> HBONE


class _HboneRelay(_Relay):
    """side 0 is the TCP leg; the stream is the other end."""

    __slots__ = ("stream", "result", "leg", "tcp", "tcp_eof", "down_done", "source_paused")

    def __init__(self, stream: HboneStream, result: RelayResult) -> None:
        super().__init__()
        self.stream = stream
        self.result = result
        self.leg = _Leg(self, 0)
        self.tcp: asyncio.Transport | None = None
        self.tcp_eof = False  # TCP -> stream direction finished
        self.down_done = False  # stream -> TCP direction finished
        self.source_paused = False

    def attached(self, side: int, transport: asyncio.Transport) -> None:
        self.tcp = transport

    # TCP -> stream
    def on_data(self, side: int, data: bytes) -> None:
        try:
            ok = self.stream.send_nowait(data)
        except (StreamResetError, OSError) as e:
            self.fail(e)
            return
        self.result.to_stream += len(data)
        if not ok and not self.source_paused and self.tcp is not None:
            self.source_paused = True
            self.tcp.pause_reading()

    def stream_writable(self) -> None:
        if self.source_paused and self.stream.writable and self.tcp is not None:
            self.source_paused = False
            if not self.tcp.is_closing():
                self.tcp.resume_reading()

    def on_eof(self, side: int) -> None:
        self.tcp_eof = True
        self.stream.write_eof()
        self._check_done()

    # stream -> TCP
    def stream_data(self, data: bytes) -> None:
        tcp = self.tcp
        if tcp is None or tcp.is_closing():
            return
        tcp.write(data)
        self.result.from_stream += len(data)

    def on_sink_full(self, side: int) -> None:
        self.stream.hold_acks()

    def on_sink_drained(self, side: int) -> None:
        self.stream.release_acks()

    def stream_eof(self) -> None:
        self.down_done = True
        tcp = self.tcp
        if tcp is not None and not tcp.is_closing() and tcp.can_write_eof():
            tcp.write_eof()
        self._check_done()

    # failures
    def stream_failed(self, exc: BaseException) -> None:
        self.fail(exc)

    def on_lost(self, side: int, exc: Exception | None) -> None:
        if exc is not None:
            self.fail(exc)
        elif not (self.tcp_eof and self.down_done):
            self.fail(ConnectionResetError("the TCP connection closed before the relay ended"))

    def abort(self) -> None:
        self.stream.abort()
        if self.tcp is not None:
            self.tcp.abort()

    def _check_done(self) -> None:
        if self.tcp_eof and self.down_done:
            self.finish()


async def splice_hbone(stream: HboneStream, src: Source) -> RelayResult:
    """Relay between an HBONE stream and a TCP connection until both directions ended.

    Same contract as ``aio.relay``: half-close propagates, an error aborts both sides, the
    stream is closed and the TCP transport closed at the end; returns the byte counts.
    """
    result = RelayResult()
    r = _HboneRelay(stream, result)
    tcp, pending, eof = take_over(src, r.leg)
    r.tcp = tcp
    return await _run_hbone(r, tcp, pending, eof)


async def splice_hbone_socket(stream: HboneStream, sock: socket.socket) -> RelayResult:
    """``splice_hbone`` for a connected socket (ztunnel's dial to the application)."""
    result = RelayResult()
    r = _HboneRelay(stream, result)
    try:
        tcp = await adopt(sock, r.leg)
    except OSError as e:
        stream.abort(ErrorCode.CANCEL)
        result.error = e
        return result
    return await _run_hbone(r, tcp, b"", False)


async def _run_hbone(
    r: _HboneRelay, tcp: asyncio.Transport, pending: bytes, eof: bool
) -> RelayResult:
    stream, result = r.stream, r.result
    try:
        if pending:
            r.on_data(0, pending)
        if eof:
            r.on_eof(0)
        stream.attach(r)
        await r.wait()
    finally:
        result.error = r.error
        if r.error is None:
            stream.close()
        else:
            stream.abort(ErrorCode.CANCEL)  # idempotent; fail() already reset it
        if not tcp.is_closing():
            tcp.close()
    return result


# ---------------------------------------------------------------------------------------------
# TCP <-> TCP


class _TcpRelay(_Relay):
    __slots__ = ("legs", "transports", "copied", "eof", "source_paused")

    def __init__(self) -> None:
        super().__init__()
        self.legs = (_Leg(self, 0), _Leg(self, 1))
        self.transports: list[Any] = [None, None]
        self.copied = [0, 0]  # bytes written into the other side, by source side
        self.eof = [False, False]
        self.source_paused = [False, False]

    def attached(self, side: int, transport: asyncio.Transport) -> None:
        self.transports[side] = transport

    def on_data(self, side: int, data: bytes) -> None:
        sink = self.transports[1 - side]
        if sink is None or sink.is_closing():
            return
        sink.write(data)
        self.copied[side] += len(data)

    def on_sink_full(self, side: int) -> None:  # side's transport is full: pause the other
        src = self.transports[1 - side]
        if src is not None and not self.source_paused[1 - side]:
            self.source_paused[1 - side] = True
            src.pause_reading()

    def on_sink_drained(self, side: int) -> None:
        src = self.transports[1 - side]
        if src is not None and self.source_paused[1 - side]:
            self.source_paused[1 - side] = False
            if not src.is_closing():
                src.resume_reading()

    def on_eof(self, side: int) -> None:
        self.eof[side] = True
        sink = self.transports[1 - side]
        if sink is not None and not sink.is_closing() and sink.can_write_eof():
            sink.write_eof()
        if all(self.eof):
            self.finish()

    def on_lost(self, side: int, exc: Exception | None) -> None:
        if exc is not None:
            self.fail(exc)
        elif not all(self.eof):
            self.fail(ConnectionResetError("a TCP connection closed before the relay ended"))

    def abort(self) -> None:
        for t in self.transports:
            if t is not None:
                t.abort()


async def splice_tcp(
    a: Source, b: Source | socket.socket
) -> tuple[int, int, BaseException | None]:
    """Relay between two TCP streams (``b`` may be a connected socket) until both
    directions ended or one failed.

    Returns (bytes a->b, bytes b->a, first error). Both transports are closed at the end.
    """
    relay = _TcpRelay()
    ta, pending_a, eof_a = take_over(a, relay.legs[0])
    relay.transports[0] = ta
    if isinstance(b, socket.socket):
        # Nothing may come from ``a`` before its sink exists: hold it while ``b`` is wrapped.
        paused = ta.is_reading()
        if paused:
            ta.pause_reading()
        try:
            tb = await adopt(b, relay.legs[1])
        except OSError as e:
            ta.abort()
            return 0, 0, e
        if paused and not ta.is_closing():
            ta.resume_reading()
        pending_b, eof_b = b"", False
    else:
        tb, pending_b, eof_b = take_over(b, relay.legs[1])
    relay.transports[1] = tb
    try:
        for i, pending, eof in ((0, pending_a, eof_a), (1, pending_b, eof_b)):
            if pending:
                relay.on_data(i, pending)
            if eof:
                relay.on_eof(i)
        await relay.wait()
    finally:
        for t in relay.transports:
            if not t.is_closing():
                t.close()
    return relay.copied[0], relay.copied[1], relay.error
