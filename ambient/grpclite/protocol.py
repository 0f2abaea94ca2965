"""grpclite's pure helpers and sans-I/O core (:class:`ClientCore`): no sockets, no clock.

See :mod:`ambient.grpclite` for the layers and invariants."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import re
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
        self.consumed(call)  # nothing waits unread: acknowledge now

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
