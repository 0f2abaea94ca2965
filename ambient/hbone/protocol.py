"""Sans-I/O HBONE: HTTP/2 ``CONNECT`` tunnels over one (already TLS-terminated) connection.

Role: the protocol core shared by ztunnel (inbound server, outbound client) and the waypoint.
It wraps the ``h2`` state machine and adds what HBONE needs on top of plain HTTP/2: Istio's
transport settings, ``CONNECT`` request validation with the same status codes ztunnel uses,
send buffering behind flow control, explicit receive acknowledgement (so the I/O edge can
apply backpressure) and PING keepalive. No sockets, no clocks, no tasks: bytes go in through
``receive_data``, events come out as our own dataclasses, bytes to write come out of
``data_to_send`` and time is passed in (``tick(now)``).

Invariants:
* Every ``h2`` exception raised by untrusted input is turned into ``HboneProtocolError``
  (a connection error; ``data_to_send`` then holds the GOAWAY). Misuse by the caller of a
  stream that is gone raises ``StreamGone``. Nothing else escapes ``receive_data``.
* ``send_data`` never raises for lack of window: what does not fit is buffered per stream and
  flushed, in order, when the peer opens its window; ``StreamWritable`` says a buffer emptied.
* Received bytes are never acknowledged implicitly (except on streams we already rejected or
  reset): the edge calls ``acknowledge_received_data`` once it has written them onwards.
* DATA frames we send are framed here, not by ``h2`` (the bulk path: no per-frame objects,
  no copies of the payload; ``data_to_send_vec`` hands out the payload's own memory), but
  always through h2's state: the stream must be open for sending, the frame fits the
  windows and the peer's MAX_FRAME_SIZE, and h2's window counters are charged exactly as its
  own ``send_data`` would. Output order is preserved (h2's pending bytes go out first).
* Header blocks we send are normalised here, not by ``h2`` (its outbound checks are off:
  they cost more than HPACK on the connection-setup path): names lower-cased, values
  stripped, connection-specific fields refused; strings go out without Huffman coding.
* A malformed request (RFC 9113 §8.1.1) is reset with PROTOCOL_ERROR on that stream only; a
  well-formed request we refuse gets a status (400 bad method or authority, 503 illegal port,
  as ztunnel does), so one bad stream never takes down a pooled connection.
"""

from __future__ import annotations

import ipaddress
import random as _random
import secrets
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hyperframe.frame

from .rxframes import FAST_RECV, DataChunk, InboundFramer

__all__ = [
    "CONNECTION_WINDOW",
    "HBONE_PORT",
    "ILLEGAL_PORTS",
    "MAX_FRAME_SIZE",
    "MAX_HEADER_LIST_SIZE",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "SERVER_MAX_CONCURRENT_STREAMS",
    "STREAM_WINDOW",
    "AuthorityError",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionLost",
    "ConnectionTerminated",
    "ErrorCode",
    "HboneClientProtocol",
    "HboneError",
    "HboneEvent",
    "HboneProtocolError",
    "HboneServerProtocol",
    "HboneSettings",
    "IPAddress",
    "RequestRejected",
    "StreamData",
    "StreamEnded",
    "StreamGone",
    "StreamReset",
    "StreamWritable",
    "build_request_headers",
    "format_authority",
    "make_traceparent",
    "parse_authority",
]

ErrorCode = h2.errors.ErrorCodes
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Istio ztunnel transport defaults (istio-contract.md §E).
STREAM_WINDOW: Final = 4 * 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
MAX_FRAME_SIZE: Final = 1024 * 1024
MAX_HEADER_LIST_SIZE: Final = 16 * 1024
SERVER_MAX_CONCURRENT_STREAMS: Final = 200
PING_INTERVAL: Final = 10.0
PING_TIMEOUT: Final = 20.0
HBONE_PORT: Final = 15008
# ztunnel's own listeners; a CONNECT to them would loop back into the proxy (ztunnel: SelfCall).
ILLEGAL_PORTS: Final = frozenset({15001, 15006, 15008, 15080})

_DEFAULT_WINDOW: Final = 65_535
_ALLOWED_STATUSES: Final = frozenset({200, 400, 401, 403, 404, 500, 502, 503, 504})
_KNOWN_REQUEST_PSEUDO: Final = frozenset({b":method", b":authority", b":scheme", b":path"})
# 24-bit length (as 16 + 8 bits), type 0 (DATA), flags 0, stream id.
_DATA_HEADER: Final = struct.Struct(">HBBBL")
# Payload bytes copied into the frame header's write so that no TLS record is header-only.
_HEADER_COALESCE: Final = 16 * 1024 - 9
_SENDABLE_STATES: Final = frozenset({
    h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE,
})


class HboneError(Exception):
    """Base of every error this package raises."""


class HboneProtocolError(HboneError):
    """The peer broke HTTP/2; the connection is over (a GOAWAY is queued in data_to_send)."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = int(error_code)


class StreamGone(HboneError):
    """The caller used a stream that is closed, reset or was never opened."""


class AuthorityError(HboneError, ValueError):
    """A CONNECT ``:authority`` we refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """Transport tuning; defaults are ztunnel's (ztunnel.config reads the HTTP2_* variables)."""

    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_frame_size: int = MAX_FRAME_SIZE
    max_header_list_size: int = MAX_HEADER_LIST_SIZE
    max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    illegal_ports: frozenset[int] = ILLEGAL_PORTS
    # Double HBONE / E-W gateways carry "<svc FQDN>:<port>"; plain ztunnel inbound wants IPs.
    allow_hostnames: bool = False


def _cheap_raw_data_repr(data: bytes | None) -> str:
    # Same text as hyperframe's, but hexlifies 11 bytes instead of the whole payload.
    if not data:
        return "None"
    r = bytes(data[:11]).hex()
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


def _cheap_data_frame_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"data={_cheap_raw_data_repr(self.data)}, pad_length={self.pad_length}"


# h2 formats ``repr(frame)`` for a trace log on *every* received frame, even with logging off;
# for a 1 MiB DATA frame that serialized and hex-encoded the whole payload (a quarter of the
# CPU of a bulk transfer). Make those reprs O(1).
hyperframe.frame._raw_data_repr = _cheap_raw_data_repr
hyperframe.frame.DataFrame._body_repr = _cheap_data_frame_repr  # type: ignore[method-assign,assignment]


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding of the strings we send (RFC 7541 lets the encoder choose
    per string; every decoder reads both). Pure-Python Huffman coding (and our own peer's
    decoding of it) cost more CPU per CONNECT than the few dozen bytes it saves."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


def header_block_limit(max_header_list_size: int) -> int:
    """Most bytes of one unfinished header block (HEADERS + CONTINUATIONs) we hold.

    The HPACK decoder enforces ``max_header_list_size`` only once the block is complete; h2
    by itself buffers up to 64 CONTINUATION frames of MAX_FRAME_SIZE (64 MiB per connection
    with our 1 MiB frames). An encoded block is rarely larger than the list it decodes to
    (Huffman codes can be up to ~4x longer per octet), so four times the list limit plus
    slack never refuses a block the decoder would accept from a sane encoder.
    """
    return 4 * max_header_list_size + 16 * 1024


class _BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, bounded: the unfinished header block (a CONTINUATION flood) and
    the frame being received (h2 checks a frame's length only once all of it has arrived,
    so a peer announcing a 16 MiB frame had it buffered whole before it was refused)."""

    def __init__(self, server: bool, limit: int) -> None:
        super().__init__(server=server)
        self._limit = limit

    def __next__(self) -> hyperframe.frame.Frame:
        if len(self._data) >= 9:  # type: ignore[has-type]
            length = int.from_bytes(self._data[:3], "big")  # type: ignore[has-type]
            if length > self.max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"Received overlong frame: length {length}, max {self.max_frame_size}")
        return super().__next__()

    def _update_header_buffer(
        self, f: hyperframe.frame.Frame | None
    ) -> hyperframe.frame.Frame | None:
        out = super()._update_header_buffer(f)
        held = sum(len(x.data) for x in self._headers_buffer)  # type: ignore[attr-defined]
        if held > self._limit:
            raise h2.exceptions.ProtocolError(
                f"unfinished header block of {held} bytes exceeds {self._limit}")
        return out


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class HboneEvent:
    """Base of the events ``receive_data`` and ``tick`` return."""


@dataclass(frozen=True, slots=True)
class ConnectRequest(HboneEvent):
    """A valid HBONE CONNECT arrived (server); answer with ``respond``."""

    stream_id: int
    authority: str
    host: IPAddress | str  # a str only with HboneSettings.allow_hostnames
    port: int
    headers: dict[str, str]  # lower-case names, no pseudo-headers, repeats joined with ", "


@dataclass(frozen=True, slots=True)
class RequestRejected(HboneEvent):
    """The server refused a request by itself (already answered); for access logs."""

    stream_id: int
    status: int | None  # HTTP status sent, or None when the stream was reset
    error_code: int | None  # RST_STREAM code when reset
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectResponse(HboneEvent):
    """The server answered our CONNECT (client). Non-200 means the stream is over."""

    stream_id: int
    status: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class StreamData(HboneEvent):
    """Tunnel bytes (never empty); acknowledge ``flow_controlled_length`` once they are
    written onwards."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded(HboneEvent):
    """The peer half-closed its direction (END_STREAM); ours stays open."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(HboneEvent):
    """The stream was reset (by the peer when ``remote``); both directions are gone."""

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class StreamWritable(HboneEvent):
    """Everything buffered for this stream has been handed to HTTP/2 (window reopened)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(HboneEvent):
    """The peer sent GOAWAY. h2 cannot continue after it: the connection is finished."""

    error_code: int
    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionLost(HboneEvent):
    """Keepalive failed: no PING ack within the timeout. Close the transport."""

    reason: str


# ---------------------------------------------------------------------------------------------
# Authority and headers


def parse_authority(authority: str, *, allow_hostname: bool = False) -> tuple[IPAddress | str, int]:
    """Parse ``ip:port`` / ``[v6]:port`` (or ``host:port`` if allowed); AuthorityError(400)."""
    if not authority or len(authority) > 300:
        raise AuthorityError(f"invalid :authority {authority!r}: empty or too long")
    host_part, sep, port_part = authority.rpartition(":")
    if not sep or not host_part:
        raise AuthorityError(f"invalid :authority {authority!r}: expected ip:port or [ipv6]:port")
    if not (port_part.isascii() and port_part.isdigit()) or len(port_part) > 5:
        raise AuthorityError(f"invalid :authority {authority!r}: port is not a number")
    port = int(port_part)
    if not 0 < port < 65536:
        raise AuthorityError(f"invalid :authority {authority!r}: port out of range")
    host: IPAddress | str
    if host_part.startswith("[") and host_part.endswith("]"):
        try:
            host = ipaddress.IPv6Address(host_part[1:-1])
        except ValueError:
            raise AuthorityError(f"invalid :authority {authority!r}: bad IPv6 address") from None
        if host.scope_id:
            raise AuthorityError(f"invalid :authority {authority!r}: zone ids are not allowed")
        return host, port
    if ":" in host_part or "[" in host_part or "]" in host_part:
        raise AuthorityError(f"invalid :authority {authority!r}: IPv6 must be in brackets")
    try:
        return ipaddress.IPv4Address(host_part), port
    except ValueError:
        pass
    if allow_hostname and _is_hostname(host_part):
        return host_part.lower(), port
    raise AuthorityError(f"invalid :authority {authority!r}: host is not an IP address")


def _is_hostname(name: str) -> bool:
    if not name.isascii() or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(
        0 < len(lab) <= 63 and lab[0] != "-" and lab[-1] != "-"
        and all(c.isalnum() or c == "-" for c in lab)
        for lab in labels
    )


def format_authority(host: IPAddress | str, port: int) -> str:
    """The CONNECT ``:authority`` for a target: ``1.2.3.4:80`` or ``[fd00::1]:80``."""
    if isinstance(host, str):
        try:
            host = ipaddress.ip_address(host)
        except ValueError:
            return f"{host}:{port}"
    return f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"


def make_traceparent(*, sampled: bool = False) -> str:
    """A fresh W3C ``traceparent`` (version 00, random non-zero trace and span ids).

    The ids only need to be unique, not secret: ``random`` rather than ``secrets`` saves two
    ``getrandom`` system calls per HBONE stream."""
    trace_id = _random.getrandbits(128)
    span_id = _random.getrandbits(64)
    if not trace_id or not span_id:  # vanishingly rare; ids must be non-zero
        return make_traceparent(sampled=sampled)
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def build_request_headers(
    authority: str,
    *,
    baggage: str | None = None,
    forwarded_for: str | None = None,
    forwarded_host: str | None = None,
    traceparent: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """Headers of an HBONE CONNECT as ztunnel sends them (no :scheme, no :path).

    ``forwarded_for`` is the original client ``ip:port``; it becomes ``forwarded: for="…"``.
    A ``traceparent`` is generated when none is given (it traces the connection).
    """
    headers = [(":method", "CONNECT"), (":authority", authority)]
    if baggage:
        headers.append(("baggage", baggage))
    if forwarded_for:
        value = f'for="{forwarded_for}"'
        if forwarded_host:
            value += f";host={forwarded_host}"
        headers.append(("forwarded", value))
    headers.append(("traceparent", traceparent or make_traceparent()))
    headers.extend((k.lower(), v) for k, v in extra)
    return headers


_CONNECT_PSEUDO: Final = frozenset({":method", ":authority"})  # connect() sets these itself
# RFC 9113 §8.2.2: fields that must not appear in HTTP/2.
_CONNECTION_SPECIFIC: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
})


def _outbound_fields(
    headers: Iterable[tuple[str, str]], skip: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """A caller's extra fields as we send them: names lower-cased, values without
    surrounding whitespace (what h2's outbound normalisation did), names in ``skip`` left
    out; other pseudo-headers and connection-specific fields are refused (StreamGone), as
    h2's validation refused them."""
    out = []
    for k, v in headers:
        name = k.lower()
        if name in skip:
            continue
        if name.startswith(":") or (name in _CONNECTION_SPECIFIC
                                    and (name, v.strip(" \t")) != ("te", "trailers")):
            raise StreamGone(f"cannot send header {name!r} on an HBONE stream")
        out.append((name, v.strip(" \t")))
    return out


def _decode_headers(
    raw: Iterable[tuple[bytes, bytes]],
) -> tuple[dict[bytes, bytes], dict[str, str]]:
    """Split pseudo-headers from regular ones. Raises ValueError when malformed."""
    pseudo: dict[bytes, bytes] = {}
    regular: dict[str, str] = {}
    for name, value in raw:
        name = bytes(name)
        value = bytes(value)
        if name.startswith(b":"):
            if regular:
                raise ValueError("pseudo-header after a regular header")
            if name in pseudo:
                raise ValueError(f"repeated pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        regular[key] = f"{regular[key]}, {text}" if key in regular else text
    return pseudo, regular


# ---------------------------------------------------------------------------------------------
# The connection


@dataclass(slots=True)
class _Outbox:
    chunks: deque[memoryview] = field(default_factory=deque)
    size: int = 0
    eof: bool = False


class _HboneConnection:
    """State shared by both roles: settings, send buffering, flow control, keepalive."""

    client_side: bool = False

    def __init__(self, settings: HboneSettings | None = None, *, now: float = 0.0) -> None:
        self.settings = settings or HboneSettings()
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            # The server validates requests itself so that a malformed request resets only
            # its own stream (h2 would tear down the whole connection).
            validate_inbound_headers=self.client_side,
            # Every header block we send is built here (connect, respond): lower-case names,
            # pseudo-headers first, no connection-specific fields. h2's per-header checks and
            # rewrites cost more than HPACK itself on the connection-setup path.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.encoder = _PlainEncoder()
        self._h2.incoming_buffer = _BoundedFrameBuffer(
            not self.client_side, header_block_limit(self.settings.max_header_list_size))
        self._outboxes: dict[int, _Outbox] = {}
        self._discard: set[int] = set()  # streams whose inbound bytes we ack and drop
        self._closed = False
        self._last_received = now
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._initiated = False
        self._out: list[bytes | memoryview] = []  # frames framed here, in order with h2's
        # Bulk DATA payloads are parsed by rxframes (no h2 frame objects); the rest by h2.
        self._rx = (InboundFramer(self._h2, server=not self.client_side, discard=self._discard)
                    if FAST_RECV else None)

    # -- lifecycle ------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the preface/SETTINGS and the connection-window update. Call once, first."""
        if self._initiated:
            return
        self._initiated = True
        s = self.settings
        values: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if not self.client_side:
            values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        # Replacing the settings before the preface sends them all in the first SETTINGS frame
        # and makes them effective at once (the peer cannot have used the defaults yet).
        self._h2.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=values
        )
        # Plain CONNECT only (RFC 8441 extended CONNECT is not HBONE): do not advertise it.
        del self._h2.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
        self._h2.max_inbound_frame_size = s.max_frame_size
        self._h2.decoder.max_header_list_size = s.max_header_list_size
        self._h2.initiate_connection()
        if s.connection_window > _DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(s.connection_window - _DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport now (may be empty)."""
        vec = self.data_to_send_vec()
        if len(vec) == 1 and isinstance(vec[0], bytes):
            return vec[0]
        return b"".join(vec)

    def data_to_send_vec(self) -> list[bytes | memoryview]:
        """Like ``data_to_send`` but as buffers to write in order (``writelines``): DATA
        payloads are not copied. The buffers must not be modified by the caller."""
        pending = self._h2.data_to_send()
        if not self._out:
            return [pending] if pending else []
        out, self._out = self._out, []
        if pending:
            out.append(pending)
        return out

    @property
    def closed(self) -> bool:
        """True once GOAWAY went either way or keepalive failed; open no new streams."""
        return self._closed

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "",
              last_stream_id: int | None = None) -> None:
        """Send GOAWAY. h2 cannot drain after GOAWAY: streams still open are cut off.
        ``last_stream_id`` (default: the last the peer opened) tells the peer that streams
        above it were not processed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._h2.close_connection(error_code, reason.encode() or None, last_stream_id)
        except h2.exceptions.ProtocolError:
            pass

    # -- keepalive ------------------------------------------------------------------------

    def tick(self, now: float) -> list[HboneEvent]:
        """Drive keepalive: PING after ``ping_interval`` idle, ConnectionLost after timeout."""
        if self._closed:
            return []
        s = self.settings
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= s.ping_timeout:
                self.close(ErrorCode.NO_ERROR, "keepalive timeout")
                return [ConnectionLost(f"no PING ack within {s.ping_timeout:g}s")]
            return []
        if now - self._last_received >= s.ping_interval:
            self._ping_payload = secrets.token_bytes(8)
            self._h2.ping(self._ping_payload)
            self._ping_sent_at = now
        return []

    def next_tick_at(self) -> float:
        """When ``tick`` next has something to do (absolute, same clock as ``now``)."""
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.settings.ping_timeout
        return self._last_received + self.settings.ping_interval

    # -- introspection --------------------------------------------------------------------

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams

    def available_window(self, stream_id: int) -> int:
        """How many bytes could go out on this stream right now (0 if it is gone)."""
        try:
            return self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return 0

    def buffered(self, stream_id: int) -> int:
        """Bytes accepted by ``send_data`` but still waiting for window."""
        box = self._outboxes.get(stream_id)
        return box.size if box else 0

    # -- sending --------------------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue tunnel bytes; sends what the window allows now and buffers the rest."""
        if not data:
            return
        box = self._outboxes.get(stream_id)
        if box is None:
            if not self._stream_open_for_send(stream_id):
                raise StreamGone(f"stream {stream_id} is not open for sending")
            box = self._outboxes[stream_id] = _Outbox()
        elif box.eof:
            raise StreamGone(f"stream {stream_id}: send_data after end_stream")
        view = memoryview(data).cast("B")
        if not view.readonly:  # we keep a view until it is written: never of mutable memory
            view = memoryview(bytes(view))
        box.chunks.append(view)
        box.size += len(data)
        if box.size == len(data):
            self._flush(stream_id, box)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM after any buffered bytes)."""
        box = self._outboxes.get(stream_id)
        if box is not None and box.size:
            box.eof = True
            return
        self._outboxes.pop(stream_id, None)
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as e:
            raise StreamGone(f"stream {stream_id}: cannot end: {e}") from None

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort both directions of a stream (RST_STREAM). Idempotent."""
        self._outboxes.pop(stream_id, None)
        self._discard.add(stream_id)
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """Give ``n`` flow-controlled bytes of window back (after writing them onwards)."""
        if n <= 0 or self._closed:
            return
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            pass

    def _stream_open_for_send(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        if stream is None or self._closed:
            return False
        # h2's "open" minus the states where our side has ended: OPEN, HALF_CLOSED_REMOTE.
        return stream.state_machine.state in _SENDABLE_STATES

    def _flush(self, stream_id: int, box: _Outbox) -> bool:
        """Send as much of ``box`` as windows allow; True when it emptied."""
        h2c = self._h2
        stream = h2c.streams.get(stream_id)
        if (stream is None or self._closed
                or stream.state_machine.state not in _SENDABLE_STATES):
            # Closed meanwhile (e.g. a WINDOW_UPDATE and the peer's RST_STREAM arrived in one
            # read, and h2 processed the reset before we saw the window event).
            self._outboxes.pop(stream_id, None)
            return False
        window = min(h2c.outbound_flow_control_window, stream.outbound_flow_control_window)
        max_frame = h2c.max_outbound_frame_size
        chunks = box.chunks
        out = self._out
        pending = h2c.data_to_send()  # h2's frames queued so far go out before ours
        if pending:
            out.append(pending)
        sent = 0
        while chunks and window > 0:
            chunk = chunks[0]
            n = min(len(chunk), window, max_frame)
            if n == len(chunk):
                chunks.popleft()
            else:
                chunks[0] = chunk[n:]
                chunk = chunk[:n]
            header = _DATA_HEADER.pack(n >> 8, n & 0xFF, 0, 0, stream_id)
            if n <= _HEADER_COALESCE:
                out.append(header + chunk)
            else:
                out.append(header + chunk[:_HEADER_COALESCE])
                out.append(chunk[_HEADER_COALESCE:])
            box.size -= n
            window -= n
            sent += n
        # Charge h2's windows as its own send_data would (DATA does not change stream state).
        h2c.outbound_flow_control_window -= sent
        stream.outbound_flow_control_window -= sent
        if chunks:
            return False
        del self._outboxes[stream_id]
        if box.eof:
            h2c.end_stream(stream_id)
        return True

    def _flush_all(self, events: list[HboneEvent], only: int | None = None) -> None:
        ids = [only] if only is not None else list(self._outboxes)
        for stream_id in ids:
            box = self._outboxes.get(stream_id)
            if box is not None and self._flush(stream_id, box):
                events.append(StreamWritable(stream_id))

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float | None = None) -> list[HboneEvent]:
        """Feed bytes from the transport; returns our events. Raises HboneProtocolError."""
        if self._closed:
            return []
        if now is not None:
            self._last_received = now
        try:
            items = self._rx.feed(data) if self._rx is not None else self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._closed = True
            code = int(getattr(e, "error_code", ErrorCode.PROTOCOL_ERROR))
            raise HboneProtocolError(f"peer broke HTTP/2: {e}", code) from None
        events: list[HboneEvent] = []
        discard = self._discard
        for ev in items:
            if type(ev) is DataChunk:
                if ev.stream_id in discard:  # reset by us while the frame was arriving
                    self.acknowledge_received_data(ev.stream_id, ev.n)
                else:
                    events.append(StreamData(ev.stream_id, ev.data, ev.n))
            else:
                self._translate(ev, events)  # type: ignore[arg-type]
        return events

    def _translate(self, ev: h2.events.Event, out: list[HboneEvent]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            n = ev.flow_controlled_length or 0
            if sid in self._discard or not ev.data:
                # Rejected stream, or an empty (END_STREAM / padding-only) frame.
                self.acknowledge_received_data(sid, n)
            else:
                out.append(StreamData(sid, ev.data, n))
        elif isinstance(ev, h2.events.WindowUpdated):
            self._flush_all(out, None if not ev.stream_id else ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            if ev.stream_id not in self._discard:
                out.append(StreamEnded(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamReset):
            sid = ev.stream_id or 0
            self._outboxes.pop(sid, None)
            if sid not in self._discard:
                self._discard.add(sid)
                out.append(StreamReset(sid, int(ev.error_code or 0), bool(ev.remote_reset)))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._flush_all(out)
        elif isinstance(ev, h2.events.PingAckReceived):
            self._ping_sent_at = None
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._closed = True
            self._outboxes.clear()
            reason = (ev.additional_data or b"").decode("utf-8", "replace")
            out.append(
                ConnectionTerminated(int(ev.error_code or 0), ev.last_stream_id or 0, reason)
            )
        else:
            self._translate_role(ev, out)

    def _translate_role(self, ev: h2.events.Event, out: list[HboneEvent]) -> None:
        """Role-specific events (requests for the server, responses for the client)."""


class HboneServerProtocol(_HboneConnection):
    """The HBONE server (ztunnel inbound on 15008, waypoint): validates and answers CONNECTs."""

    client_side = False

    def respond(
        self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Answer a ConnectRequest. 200 opens the tunnel; anything else ends the stream."""
        if status not in _ALLOWED_STATUSES:
            raise ValueError(f"unsupported HBONE response status {status}")
        hdrs = [(":status", str(status)), *_outbound_fields(headers)]
        end = status != 200
        try:
            self._h2.send_headers(stream_id, hdrs, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            raise StreamGone(f"stream {stream_id}: cannot respond: {e}") from None
        if end:
            # The client may still be sending; ack and drop whatever arrives.
            self._discard.add(stream_id)

    def _translate_role(self, ev: h2.events.Event, out: list[HboneEvent]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev.stream_id or 0, ev.headers or [], out)
        elif isinstance(ev, h2.events.TrailersReceived):
            self._reject(ev.stream_id or 0, None, "trailers on a CONNECT stream", out)

    def _on_request(
        self, sid: int, raw: Iterable[tuple[bytes, bytes]], out: list[HboneEvent]
    ) -> None:
        try:
            pseudo, headers = _decode_headers(raw)  # type: ignore[arg-type]
        except ValueError as e:
            return self._reject(sid, None, f"malformed request: {e}", out)
        unknown = set(pseudo) - _KNOWN_REQUEST_PSEUDO
        if unknown:
            names = ", ".join(sorted(n.decode("latin-1") for n in unknown))
            return self._reject(sid, None, f"malformed request: pseudo-header {names}", out)
        method = pseudo.get(b":method")
        if not method:
            return self._reject(sid, None, "malformed request: no :method", out)
        if method != b"CONNECT":
            m = method.decode("latin-1")
            return self._reject(sid, 400, f"method {m} is not CONNECT", out)
        if b":scheme" in pseudo or b":path" in pseudo:
            return self._reject(sid, None, "malformed CONNECT: :scheme/:path present", out)
        authority = pseudo.get(b":authority", b"").decode("latin-1")
        if not authority:
            return self._reject(sid, None, "malformed CONNECT: no :authority", out)
        try:
            host, port = parse_authority(authority, allow_hostname=self.settings.allow_hostnames)
        except AuthorityError as e:
            return self._reject(sid, e.status, str(e), out)
        if port in self.settings.illegal_ports:
            # ztunnel answers a call to its own ports (SelfCall) with 503.
            msg = f"CONNECT to {authority}: port {port} is a ztunnel port (self call)"
            return self._reject(sid, 503, msg, out)
        out.append(ConnectRequest(sid, authority, host, port, headers))

    def _reject(
        self, sid: int, status: int | None, reason: str, out: list[HboneEvent]
    ) -> None:
        if status is None:
            self.reset_stream(sid, ErrorCode.PROTOCOL_ERROR)
            out.append(RequestRejected(sid, None, int(ErrorCode.PROTOCOL_ERROR), reason))
            return
        try:
            self.respond(sid, status)
        except StreamGone:
            self.reset_stream(sid, ErrorCode.PROTOCOL_ERROR)
        out.append(RequestRejected(sid, status, None, reason))


class HboneClientProtocol(_HboneConnection):
    """The HBONE client (ztunnel outbound, waypoint upstream): opens CONNECT streams."""

    client_side = True

    @property
    def can_open_stream(self) -> bool:
        """Whether another CONNECT fits under the peer's MAX_CONCURRENT_STREAMS."""
        if self._closed:
            return False
        return self._h2.open_outbound_streams < self._h2.remote_settings.max_concurrent_streams

    def connect(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream to ``authority``; returns its stream id."""
        if self._closed:
            raise StreamGone("connection is closed; open a new one")
        hdrs = [(":method", "CONNECT"), (":authority", authority),
                *_outbound_fields(headers, _CONNECT_PSEUDO)]
        sid = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(sid, hdrs, end_stream=False)
        except h2.exceptions.ProtocolError as e:
            raise StreamGone(f"cannot open a stream: {e}") from None
        return sid

    def _translate_role(self, ev: h2.events.Event, out: list[HboneEvent]) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            sid = ev.stream_id or 0
            status = 0
            headers: dict[str, str] = {}
            for name, value in ev.headers or []:
                name, value = bytes(name), bytes(value)
                if name == b":status":
                    # Exactly three digits (RFC 9110 §15): int() of a 5000-digit value raises.
                    status = int(value) if len(value) == 3 and value.isdigit() else 0
                elif not name.startswith(b":"):
                    key = name.decode("latin-1")
                    text = value.decode("utf-8", "replace")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
            if status != 200:
                self._outboxes.pop(sid, None)
            out.append(ConnectResponse(sid, status, headers))
