"""A small gRPC client over HTTP/2 (h2) and TLS (ssl): what ztunnel needs, without grpcio.

Role: the node proxy's two control-plane calls -- the CA's unary ``CreateCertificate`` and the
delta-ADS bidirectional stream -- spoken directly, so the ztunnel process does not load grpcio
(its C core costs ~10 MB of resident memory).  The control plane stays a grpcio server; the
interop tests run this client against it.

Layers:

- pure helpers (table-tested): message framing (5-byte prefix, never compressed),
  ``grpc-timeout`` encoding, request headers with metadata validation, the status of a call
  from trailers / a trailers-only response / an HTTP status / an RST_STREAM code (the gRPC
  HTTP/2 spec's mappings), ``grpc-message`` percent-decoding;
- :class:`ClientCore`: the sans-I/O connection: h2 state, per-call receive queues and send
  buffers, flow control, GOAWAY.  Bytes in, changed calls out, bytes to send;
- :class:`Channel` / :class:`Call`: the asyncio edge: dial (TLS 1.2+, ALPN h2, the server
  verified against the configured roots and name), one connection shared by calls, deadlines,
  keepalive pings, cancellation, closing an idle connection.

Invariants:

- Every call ends with exactly one status.  A non-OK status surfaces as :class:`GrpcError`
  (``code``, ``details``), never as an h2, ssl or OS error; failing to connect is UNAVAILABLE.
- Received data is acknowledged (WINDOW_UPDATE) as it arrives while the caller keeps up; when
  complete messages wait unread, the acknowledgement waits for the read, so a slow reader
  bounds what the server can push to one window plus one message.
- A message over the call's receive limit ends the call with RESOURCE_EXHAUSTED and
  RST_STREAM(CANCEL); a cancelled call or an expired deadline also sends RST_STREAM(CANCEL).
- GOAWAY: calls above its last stream id fail UNAVAILABLE at once; after a graceful GOAWAY
  (NO_ERROR) the calls at or below it may finish; new calls open a new connection.  h2 treats
  every GOAWAY as the end of the connection, so :class:`_H2` keeps it open in the graceful case.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import re
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = [
    "DEFAULT_MAX_RECEIVE",
    "Call",
    "CallState",
    "Channel",
    "ClientCore",
    "GrpcError",
    "MessageDecoder",
    "StatusCode",
    "call_status",
    "client_tls_context",
    "encode_timeout",
    "frame_message",
    "request_headers",
    "response_problem",
    "status_for_http",
    "status_for_reset",
]

DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # grpcio's default receive limit
USER_AGENT = "ambient-grpclite/1"
_WINDOW = 1 << 20  # our receive window per stream and for the connection


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """A call ended with a non-OK status, or could not start: ``code`` and ``details``."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# -- pure helpers ---------------------------------------------------------------------------


def frame_message(payload: bytes) -> bytes:
    """One length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class MessageDecoder:
    """Splits one call's DATA bytes into messages; refuses compressed or oversized ones."""

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = DEFAULT_MAX_RECEIVE) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """True while part of a message is buffered (the stream must not end here)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while len(buf) >= 5:
            flag, length = buf[0], int.from_bytes(buf[1:5], "big")
            if flag != 0:
                raise GrpcError(StatusCode.INTERNAL, (
                    "the server sent a compressed message, but this client asked for no "
                    "compression" if flag == 1 else f"bad message flag {flag} from the server"))
            if length > self.limit:
                raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, (
                    f"the server sent a message of {length} bytes, more than this client's "
                    f"limit of {self.limit} bytes"))
            if len(buf) < 5 + length:
                break
            out.append(bytes(buf[5:5 + length]))
            del buf[:5 + length]
        return out


_TIMEOUT_UNITS = (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600))


def encode_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value: at most 8 digits and a unit, rounded up (never 0)."""
    for unit, scale in _TIMEOUT_UNITS:
        value = max(1, math.ceil(seconds * scale))
        if value < 100_000_000:
            return f"{value}{unit}"
    return "99999999H"


_KEY = re.compile(r"[0-9a-z_.\-]+\Z")
_RESERVED = frozenset({"content-type", "te", "user-agent", "host", "connection"})


def request_headers(path: str, authority: str, scheme: str,
                    metadata: Iterable[tuple[str, str]] = (),
                    timeout: float | None = None) -> list[tuple[str, str]]:
    """The HEADERS of a call; metadata keys must be lower-case and not reserved."""
    headers = [(":method", "POST"), (":scheme", scheme), (":path", path),
               (":authority", authority), ("content-type", "application/grpc"),
               ("te", "trailers"), ("user-agent", USER_AGENT)]
    if timeout is not None:
        headers.append(("grpc-timeout", encode_timeout(timeout)))
    for key, value in metadata:
        if (not _KEY.match(key) or key.startswith("grpc-") or key in _RESERVED
                or key.endswith("-bin")):
            raise GrpcError(StatusCode.INTERNAL, (
                f"metadata key {key!r} cannot be sent: use lower-case letters, digits, '-', '_' "
                "and '.', and none of the reserved names (grpc-*, *-bin, content-type, te, "
                "user-agent); check the *_HEADER_* settings"))
        if not all(" " <= c <= "~" for c in value):
            raise GrpcError(StatusCode.INTERNAL, (
                f"metadata {key!r} has a value with characters outside printable ASCII"))
        headers.append((key, value))
    return headers


_HTTP_STATUS = {
    400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE,
}
_RESET_STATUS = {
    h2.errors.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def status_for_http(status: int) -> StatusCode:
    """The gRPC code for a response whose HTTP status is not 200 (the spec's table)."""
    return _HTTP_STATUS.get(status, StatusCode.UNKNOWN)


def status_for_reset(error_code: int) -> StatusCode:
    """The gRPC code for an RST_STREAM from the server (the spec's table)."""
    return _RESET_STATUS.get(error_code, StatusCode.INTERNAL)  # type: ignore[call-overload]


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def response_problem(headers: dict[str, str]) -> GrpcError | None:
    """What ends a call at its response headers (not 200, not gRPC), or None.

    A response carrying ``grpc-status`` is a trailers-only response: its status decides.
    """
    if "grpc-status" in headers:
        return None
    status = headers.get(":status", "")
    if status != "200":
        code = status_for_http(int(status)) if status.isdigit() else StatusCode.UNKNOWN
        return GrpcError(code, (
            f"the server answered HTTP {status or '(no status)'} without a gRPC status; is "
            "this address a gRPC endpoint and not a proxy or load balancer answering for it?"))
    ctype = headers.get("content-type", "")
    if not ctype.startswith("application/grpc"):
        return GrpcError(StatusCode.UNKNOWN, (
            f"the server answered with content-type {ctype!r}, not application/grpc; is this "
            "address a gRPC endpoint?"))
    return None


def call_status(block: dict[str, str] | None) -> tuple[StatusCode, str]:
    """The status in a trailers block (or a trailers-only response); UNKNOWN if missing."""
    raw = None if block is None else block.get("grpc-status")
    if raw is None:
        return StatusCode.UNKNOWN, "the server ended the call without a grpc-status"
    try:
        code = StatusCode(int(raw))
    except ValueError:
        return StatusCode.UNKNOWN, f"the server sent grpc-status {raw!r}"
    return code, unquote((block or {}).get("grpc-message", ""), errors="replace")


def client_tls_context(root_pem: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+ client context with ALPN h2, verifying the server's chain and name against
    ``root_pem`` (PEM roots; None or empty: the system store)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if root_pem:
            ctx.load_verify_locations(cadata=root_pem.decode("ascii", "replace"))
        else:
            ctx.load_default_certs()
    except ssl.SSLError as e:
        raise GrpcError(StatusCode.UNAVAILABLE, (
            f"the configured root certificates do not load ({e.reason or e}); set the root to "
            "the PEM certificate of the CA that signed the server's certificate")) from e
    ctx.set_alpn_protocols(["h2"])
    return ctx


# -- the sans-I/O connection ------------------------------------------------------------------


class _H2(h2.connection.H2Connection):
    """h2, except that a graceful GOAWAY (NO_ERROR) leaves the connection open so the calls
    the server already accepted can finish (gRPC servers drain this way); ``ClientCore``
    opens no new stream after it."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)  # type: ignore[no-any-return]
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class CallState:
    """One call's protocol state, owned by :class:`ClientCore`.

    ``waiters`` and ``timer`` belong to the asyncio edge (futures to wake, the deadline)."""

    __slots__ = ("decoder", "ended", "end_after", "headers", "messages", "outbox", "status",
                 "stream_id", "timer", "trailers", "unacked", "waiters")

    def __init__(self, stream_id: int, limit: int) -> None:
        self.stream_id = stream_id
        self.decoder = MessageDecoder(limit)
        self.messages: deque[bytes] = deque()
        self.headers: dict[str, str] | None = None
        self.trailers: dict[str, str] | None = None
        self.status: tuple[StatusCode, str] | None = None  # set once: the call is over
        self.outbox = bytearray()  # framed bytes waiting for send window
        self.end_after = False  # half-close once the outbox is sent
        self.ended = False  # END_STREAM sent
        self.unacked = 0  # received flow-controlled bytes not yet acknowledged
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None

    @property
    def sending(self) -> bool:
        """Bytes (or the END_STREAM) still waiting for flow-control window."""
        return self.status is None and (bool(self.outbox) or (self.end_after and not self.ended))


class ClientCore:
    """The client side of one HTTP/2 connection carrying gRPC calls (no I/O, no clock)."""

    def __init__(self, authority: str, scheme: str) -> None:
        self.authority, self.scheme = authority, scheme
        self._h2 = _H2(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
        })
        self.calls: dict[int, CallState] = {}
        self.goaway: str | None = None  # why no new call may start here
        self.closed = False  # the connection is finished; close the transport
        self.ping_acks: list[bytes] = []

    def initiate(self) -> None:
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_WINDOW - 65535)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    @property
    def accepting(self) -> bool:
        return self.goaway is None and not self.closed

    def start_call(self, path: str, metadata: Iterable[tuple[str, str]] = (),
                   timeout: float | None = None,
                   limit: int = DEFAULT_MAX_RECEIVE) -> CallState:
        if not self.accepting:
            raise GrpcError(StatusCode.UNAVAILABLE, self.goaway or "the connection is closed")
        headers = request_headers(path, self.authority, self.scheme, metadata, timeout)
        try:
            stream_id = self._h2.get_next_available_stream_id()
            self._h2.send_headers(stream_id, headers)
        except h2.exceptions.ProtocolError as e:  # e.g. the server's stream limit is reached
            raise GrpcError(StatusCode.UNAVAILABLE, f"cannot start a call here: {e}") from e
        call = self.calls[stream_id] = CallState(stream_id, limit)
        return call

    def send(self, call: CallState, payload: bytes, end: bool = False) -> None:
        """Queue one message (and END_STREAM after it if ``end``); sends what the window allows."""
        if call.status is not None or call.end_after:
            return
        call.outbox += frame_message(payload)
        call.end_after = end
        self._pump(call)

    def end(self, call: CallState) -> None:
        """Half-close: no more messages from us (sent after anything still queued)."""
        if call.status is None and not call.end_after:
            call.end_after = True
            self._pump(call)

    def _pump(self, call: CallState) -> None:
        try:
            self._send_window(call)
        except h2.exceptions.ProtocolError as e:  # the stream closed under us
            self._finish(call, StatusCode.INTERNAL, f"cannot send on the stream: {e}")

    def _send_window(self, call: CallState) -> None:
        sid = call.stream_id
        while call.outbox:
            n = min(self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size,
                    len(call.outbox))
            if n <= 0:
                return
            last = n == len(call.outbox) and call.end_after
            self._h2.send_data(sid, bytes(call.outbox[:n]), end_stream=last)
            del call.outbox[:n]
            call.ended = call.ended or last
        if call.end_after and not call.ended:
            self._h2.end_stream(sid)
            call.ended = True

    def consumed(self, call: CallState) -> None:
        """The caller took a message; once none wait, acknowledge what was held back."""
        if not call.messages and call.unacked and call.status is None:
            n, call.unacked = call.unacked, 0
            self._h2.acknowledge_received_data(n, call.stream_id)

    def cancel(self, call: CallState, code: StatusCode = StatusCode.CANCELLED,
               details: str = "the call was cancelled") -> None:
        """End the call locally (RST_STREAM CANCEL); what was received but unread is dropped."""
        if call.status is None:
            call.messages.clear()
            self._finish(call, code, details, reset=True)

    def ping(self, data: bytes) -> None:
        self._h2.ping(data)

    def close(self) -> list[CallState]:
        """GOAWAY (NO_ERROR); open calls fail UNAVAILABLE (returned).  Close the transport
        after sending."""
        if self.closed:
            return []
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        return self.connection_lost("the client closed the connection")

    def connection_lost(self, reason: str) -> list[CallState]:
        """The transport is gone: every open call fails UNAVAILABLE."""
        self.closed = True
        out = list(self.calls.values())
        for call in out:
            self._finish(call, StatusCode.UNAVAILABLE, reason)
        return out

    def receive(self, data: bytes) -> list[CallState]:
        """Feed bytes from the server; returns the calls whose state changed."""
        try:
            events = self._h2.receive_data(data)
        except (h2.exceptions.ProtocolError, UnicodeDecodeError) as e:  # h2 decodes headers
            return self.connection_lost(f"the server broke HTTP/2 ({e}); closing the connection")
        changed: dict[int, CallState] = {}
        for ev in events:
            sid = getattr(ev, "stream_id", 0) or 0
            call = self.calls.get(sid)
            if isinstance(ev, h2.events.DataReceived):
                self._on_data(call, ev)
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for c in ([call] if sid else list(self.calls.values())):
                    if c is not None and c.sending:
                        self._pump(c)
                        changed[c.stream_id] = c
                continue
            elif isinstance(ev, h2.events.PingAckReceived):
                self.ping_acks.append(ev.ping_data or b"")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                changed.update((c.stream_id, c) for c in self._on_goaway(ev))
                continue
            elif call is None:
                continue
            elif isinstance(ev, h2.events.ResponseReceived):
                call.headers = dict(ev.headers)  # type: ignore[arg-type]
                problem = response_problem(call.headers)
                if problem is not None:
                    self._finish(call, problem.code, problem.details, reset=True)
            elif isinstance(ev, h2.events.TrailersReceived):
                call.trailers = dict(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded):
                if call.decoder.partial:
                    self._finish(call, StatusCode.INTERNAL,
                                 "the server ended the call in the middle of a message")
                else:
                    self._finish(call, *call_status(call.trailers or call.headers))
            elif isinstance(ev, h2.events.StreamReset):
                self._finish(call, status_for_reset(ev.error_code or 0),
                             f"the server reset the stream ({_error_name(ev.error_code or 0)})")
            if call is not None:
                changed[sid] = call
        return list(changed.values())

    def _on_data(self, call: CallState | None, ev: h2.events.DataReceived) -> None:
        n = ev.flow_controlled_length or 0
        if call is None or call.status is not None:
            if n:  # a call we already ended: hand the window back at once
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.acknowledge_received_data(n, ev.stream_id or 0)
            return
        call.unacked += n
        if call.headers is None:
            self._finish(call, StatusCode.INTERNAL, "the server sent data before its headers",
                         reset=True)
            return
        try:
            call.messages.extend(call.decoder.feed(ev.data or b""))
        except GrpcError as e:
            call.messages.clear()
            self._finish(call, e.code, e.details, reset=True)
            return
        if not call.messages and call.unacked:
            n, call.unacked = call.unacked, 0
            self._h2.acknowledge_received_data(n, call.stream_id)

    def _on_goaway(self, ev: h2.events.ConnectionTerminated) -> list[CallState]:
        code = int(ev.error_code or 0)
        extra = f": {ev.additional_data.decode(errors='replace')}" if ev.additional_data else ""
        self.goaway = f"the server is going away (GOAWAY {_error_name(code)}{extra})"
        last = ev.last_stream_id or 0
        if code != 0:  # h2 has closed the connection: nothing more will arrive
            return self.connection_lost(self.goaway)
        out = [c for c in self.calls.values() if c.stream_id > last]
        for call in out:
            self._finish(call, StatusCode.UNAVAILABLE,
                         f"{self.goaway} before it started this call; retry")
        return out

    def _finish(self, call: CallState, code: StatusCode, details: str,
                reset: bool = False) -> None:
        if call.status is not None:
            return
        call.status = (code, details)
        call.outbox.clear()
        self.calls.pop(call.stream_id, None)
        if reset and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
        if call.unacked and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.acknowledge_received_data(call.unacked, call.stream_id)
        call.unacked = 0


# -- the asyncio edge -------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection: feeds :class:`ClientCore`, wakes calls, pings, closes idle."""

    def __init__(self, core: ClientCore, keepalive: float | None, keepalive_timeout: float,
                 idle_timeout: float | None) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self._keepalive, self._keepalive_timeout = keepalive, keepalive_timeout
        self._idle_timeout = idle_timeout
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._lost = False

    @property
    def usable(self) -> bool:
        return (self.core.accepting and not self._lost and self.transport is not None
                and not self.transport.is_closing())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.core.initiate()
        self.flush()
        if self._keepalive:
            self._schedule("keepalive", self._keepalive, self._keepalive_tick)

    def data_received(self, data: bytes) -> None:
        changed = self.core.receive(data)
        if self.core.ping_acks:
            self.core.ping_acks.clear()
            self._cancel_timer("ping")
        self.flush()
        self.wake(changed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        reason = f"connection to the server lost: {exc}" if exc else \
            "the server closed the connection"
        self.wake(self.core.connection_lost(reason))

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.core.closed or (self.core.goaway is not None and not self.core.calls):
            self.close()

    def wake(self, calls: Iterable[CallState]) -> None:
        for call in calls:
            waiters, call.waiters = call.waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            if call.status is not None and call.timer is not None:
                call.timer.cancel()
                call.timer = None
        if not self.core.calls and self._idle_timeout and "idle" not in self._timers:
            self._schedule("idle", self._idle_timeout, self._idle)

    def call_started(self) -> None:
        self._cancel_timer("idle")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Fail every call now and drop the transport (keepalive lost, client closing)."""
        self.wake(self.core.connection_lost(reason))
        if self.transport is not None:
            self.transport.abort()

    def _schedule(self, name: str, delay: float, fn: Any) -> None:
        if not self._lost:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, fn)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _idle(self) -> None:
        self._timers.pop("idle", None)
        if not self.core.calls:
            self.core.close()
            self.flush()

    def _keepalive_tick(self) -> None:
        # Like grpcio's keepalive without permit_without_calls: ping only while calls are open.
        if self.core.calls and "ping" not in self._timers:
            self.core.ping(os.urandom(8))
            self.flush()
            self._schedule("ping", self._keepalive_timeout, self._ping_timeout)
        self._schedule("keepalive", self._keepalive or 0.0, self._keepalive_tick)

    def _ping_timeout(self) -> None:
        self._timers.pop("ping", None)
        self.abort(f"the server did not answer a keepalive ping within "
                   f"{self._keepalive_timeout:g}s; the connection is presumed dead")


class Call:
    """One RPC: write and read messages; a non-OK end raises :class:`GrpcError`."""

    __slots__ = ("_conn", "_state")

    def __init__(self, conn: _Connection, state: CallState) -> None:
        self._conn, self._state = conn, state

    @property
    def status(self) -> tuple[StatusCode, str] | None:
        return self._state.status

    async def write(self, payload: bytes, *, end: bool = False) -> None:
        """Send one message; returns once it is handed to the transport (flow control).

        After the server ended the call: raises its error, or does nothing if it was OK."""
        st = self._state
        self._conn.core.send(st, payload, end)
        self._conn.flush()
        while st.sending:
            await self._wait()
        self._raise_if_failed()

    async def done_writing(self) -> None:
        self._conn.core.end(self._state)
        self._conn.flush()
        while self._state.sending:
            await self._wait()

    async def read(self) -> bytes | None:
        """The next message; None once the call ended OK.  Raises the call's error."""
        st = self._state
        while True:
            if st.messages:
                msg = st.messages.popleft()
                self._conn.core.consumed(st)
                self._conn.flush()
                return msg
            if st.status is not None:
                self._raise_if_failed()
                return None
            await self._wait()

    def cancel(self, code: StatusCode = StatusCode.CANCELLED,
               details: str = "the call was cancelled") -> None:
        """End the call now (RST_STREAM CANCEL); a no-op once it is over."""
        if self._state.status is None:
            self._conn.core.cancel(self._state, code, details)
            self._conn.flush()
            self._conn.wake([self._state])

    def _raise_if_failed(self) -> None:
        status = self._state.status
        if status is not None and status[0] is not StatusCode.OK:
            raise GrpcError(*status)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._state.waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._state.waiters:
                self._state.waiters.remove(fut)

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise GrpcError(StatusCode.UNAVAILABLE, f"address {target!r} is not host:port")
    return host.strip("[]"), int(port)


class Channel:
    """Calls to one server (``host:port``) over one connection, dialled on demand.

    ``tls`` None is plaintext (``http``).  ``server_hostname`` is the name the server's
    certificate must carry (default: the host), also sent as SNI.  ``keepalive`` pings the
    server every that many seconds while calls are open and drops the connection if a ping is
    not answered in ``keepalive_timeout``.  A connection without calls for ``idle_timeout``
    seconds is closed (the next call dials again).
    """

    def __init__(self, target: str, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, max_receive: int = DEFAULT_MAX_RECEIVE,
                 keepalive: float | None = None, keepalive_timeout: float = 20.0,
                 connect_timeout: float = 20.0, idle_timeout: float | None = 300.0) -> None:
        self.target = target
        self.host, self.port = _split_target(target)
        self.tls = tls
        self.server_hostname = server_hostname or self.host
        self.max_receive = max_receive
        self.keepalive, self.keepalive_timeout = keepalive, keepalive_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._conn: _Connection | None = None
        self._draining: list[_Connection] = []  # older connections finishing their calls
        self._lock = asyncio.Lock()

    async def unary(self, path: str, request: bytes, *,
                    metadata: Iterable[tuple[str, str]] = (), timeout: float | None = None,
                    max_receive: int | None = None) -> bytes:
        """One request, one response message (or a :class:`GrpcError`)."""
        call = await self.stream(path, metadata=metadata, timeout=timeout,
                                 max_receive=max_receive)
        try:
            await call.write(request, end=True)
            reply = await call.read()
            if reply is None:
                raise GrpcError(StatusCode.INTERNAL, "the server ended a unary call without a "
                                                     "response message")
            if await call.read() is not None:
                raise GrpcError(StatusCode.INTERNAL, "the server sent more than one response "
                                                     "message to a unary call")
            return reply
        finally:
            call.cancel()  # a no-op once the call ended; else RST_STREAM (error, cancellation)

    async def stream(self, path: str, *, metadata: Iterable[tuple[str, str]] = (),
                     timeout: float | None = None, max_receive: int | None = None) -> Call:
        """Open a call; write and read its messages through the returned :class:`Call`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        conn = await self._connection(deadline)
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout:g}s exceeded "
                                                          f"while connecting to {self.target}")
        state = conn.core.start_call(path, metadata, remaining, max_receive or self.max_receive)
        conn.call_started()
        conn.flush()
        call = Call(conn, state)
        if remaining is not None:
            state.timer = loop.call_later(remaining, call.cancel, StatusCode.DEADLINE_EXCEEDED,
                                          f"deadline of {timeout:g}s exceeded")
        return call

    async def _connection(self, deadline: float | None) -> _Connection:
        async with self._lock:
            if self._conn is None or not self._conn.usable:
                if self._conn is not None and self._conn.core.calls:
                    self._draining.append(self._conn)  # after GOAWAY: its calls may finish
                self._draining = [c for c in self._draining if c.core.calls]
                self._conn = None
                self._conn = await self._dial(deadline)
            return self._conn

    async def _dial(self, deadline: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout
        if deadline is not None:
            limit = min(limit, deadline - loop.time())
        core = ClientCore(self.target, "http" if self.tls is None else "https")
        conn = _Connection(core, self.keepalive, self.keepalive_timeout, self.idle_timeout)
        name = self.server_hostname
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                await loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.tls,
                    server_hostname=name if self.tls is not None else None)
        except ssl.SSLCertVerificationError as e:
            raise GrpcError(StatusCode.UNAVAILABLE, (
                f"TLS handshake with {self.target} failed: the server's certificate was refused "
                f"({e.verify_message or e.reason}); does it chain to the configured root "
                f"certificates and carry the name {name!r}?")) from e
        except ssl.SSLError as e:
            raise GrpcError(StatusCode.UNAVAILABLE, (
                f"TLS handshake with {self.target} failed ({e.reason or e}); is it a TLS "
                "port, and does it accept TLS 1.2 or 1.3?")) from e
        except TimeoutError as e:
            if deadline is not None and loop.time() >= deadline:
                raise GrpcError(StatusCode.DEADLINE_EXCEEDED,
                                f"deadline exceeded while connecting to {self.target}") from e
            raise GrpcError(StatusCode.UNAVAILABLE,
                            f"no connection to {self.target} within {limit:g}s") from e
        except OSError as e:
            raise GrpcError(StatusCode.UNAVAILABLE,
                            f"cannot connect to {self.target}: {e.strerror or e}") from e
        if self.tls is not None:
            ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                conn.abort("no HTTP/2")
                raise GrpcError(StatusCode.UNAVAILABLE, (
                    f"{self.target} did not negotiate HTTP/2 over TLS (ALPN {alpn!r}); is it "
                    "a gRPC port?"))
        return conn

    async def close(self) -> None:
        """Cancel open calls (they fail UNAVAILABLE) and close the connection."""
        conns = [c for c in (self._conn, *self._draining) if c is not None]
        self._conn, self._draining = None, []
        for conn in conns:
            if conn.transport is not None:
                ended = conn.core.close()
                conn.flush()
                conn.wake(ended)
                conn.close()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
