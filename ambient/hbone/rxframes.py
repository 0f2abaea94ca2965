"""Receive-side HTTP/2 framing for the bulk path: DATA payloads without h2's frame objects.

Role: ``InboundFramer.feed`` splits the bytes received on an HBONE connection into what
``h2`` must see (every frame except the bulk DATA frames) and the payloads of DATA frames on
established streams, which it hands out itself, as they arrive (a 1 MiB frame is delivered
in the pieces TLS decrypted, not buffered whole), usually without copying them at all (a
read that falls inside one payload is handed out as the same ``bytes`` object). h2's
``FrameBuffer`` otherwise copied every payload into its buffer, sliced it out again and built
an event object per frame: about a quarter of a receiving ztunnel's CPU.

Invariants (what keeps this equivalent to h2 processing the same bytes):
* Frames stay in order: bytes for h2 are fed to it before the next DATA header is judged, so
  h2's state (stream states, settings, a pending header block) is current when we decide.
* Only the plain case is taken here: DATA, no PADDED and no END_STREAM flag, non-empty,
  within our MAX_FRAME_SIZE, connection open in h2, no unfinished header block, the stream
  known to h2 in OPEN or HALF_CLOSED_LOCAL with no content-length, and not a stream the
  caller discards. Everything else (padding, END_STREAM, unknown streams, errors) goes
  through h2 untouched, so its checks and error codes apply.
* Flow control is charged exactly as h2 charges it (connection window, then the stream's,
  by the whole frame length when its header arrives); a violation terminates the connection
  the way h2 does (GOAWAY FLOW_CONTROL_ERROR queued, ``FlowControlError`` raised), and the
  stream's content length counter advances as in h2. Acknowledging still goes through
  ``H2Connection.acknowledge_received_data`` (h2's window managers decide the
  WINDOW_UPDATEs).
* The server's connection preface (24 bytes) always goes to h2, which validates it.
"""

from __future__ import annotations

import os
from typing import Final, NamedTuple

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream

__all__ = ["FAST_RECV", "DataChunk", "InboundFramer"]

# AMBIENT_HBONE_FAST_RECV=0: h2 parses every frame (the previous path; for A/B runs).
FAST_RECV: Final = os.environ.get("AMBIENT_HBONE_FAST_RECV", "1") != "0"

_PREFACE_LEN: Final = 24
_FLAG_END_STREAM: Final = 0x1
_FLAG_PADDED: Final = 0x8
_OPEN_CONNECTION: Final = frozenset({
    h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN,
})
_RECEIVING: Final = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})


class DataChunk(NamedTuple):
    """Payload bytes of a DATA frame taken by the fast path (``n`` flow-controlled bytes)."""

    stream_id: int
    data: bytes
    n: int


class InboundFramer:
    """Splits received bytes between h2 and the DATA fast path (see the module docstring)."""

    __slots__ = ("_h2", "_discard", "_hdr", "_h2_left", "_data_sid", "_data_left")

    def __init__(self, conn: h2.connection.H2Connection, *, server: bool,
                 discard: set[int]) -> None:
        self._h2 = conn
        self._discard = discard  # streams whose bytes the caller drops: h2 handles them
        self._hdr = b""  # an incomplete frame header carried over from the last feed
        self._h2_left = _PREFACE_LEN if server else 0  # bytes of the current frame h2 gets
        self._data_sid = 0  # stream of the DATA payload in progress (fast path)
        self._data_left = 0  # its bytes still to come

    def feed(self, data: bytes) -> list[h2.events.Event | DataChunk]:
        """Process received bytes; returns h2's events and our chunks, in wire order.

        Raises what ``H2Connection.receive_data`` raises (``h2.exceptions.ProtocolError``),
        with h2's GOAWAY queued, for a violation in either path.
        """
        if type(data) is not bytes:  # we may hand ``data`` itself out: never mutable memory
            data = bytes(data)
        out: list[h2.events.Event | DataChunk] = []
        to_h2: list[bytes | memoryview] = []
        size = len(data)
        view: memoryview | None = None
        pos = 0
        while pos < size:
            left = self._data_left
            if left:
                k = size - pos if size - pos < left else left
                if k == size:
                    chunk = data
                else:
                    chunk = data[pos:pos + k]
                self._data_left = left - k
                pos += k
                out.append(DataChunk(self._data_sid, chunk, k))
                continue
            left = self._h2_left
            if left:
                k = size - pos if size - pos < left else left
                if view is None:
                    view = memoryview(data)
                to_h2.append(view[pos:pos + k])
                self._h2_left = left - k
                pos += k
                continue
            # A frame boundary: read its 9-byte header (possibly split across feeds).
            if self._hdr:
                need = 9 - len(self._hdr)
                header = self._hdr + data[pos:pos + need]
                if len(header) < 9:
                    self._hdr = header
                    break
                self._hdr = b""
                pos += need
            elif size - pos >= 9:
                header = data[pos:pos + 9]
                pos += 9
            else:
                self._hdr = data[pos:]
                break
            length = int.from_bytes(header[:3], "big")
            if header[3] == 0 and not header[4] & (_FLAG_PADDED | _FLAG_END_STREAM) and length:
                if to_h2:
                    out.extend(self._h2_receive(to_h2))
                    to_h2 = []
                sid = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                if self._take(sid, length):
                    self._data_sid = sid
                    self._data_left = length
                    continue
            to_h2.append(header)
            self._h2_left = length
        if to_h2:
            out.extend(self._h2_receive(to_h2))
        return out

    def _h2_receive(self, parts: list[bytes | memoryview]) -> list[h2.events.Event]:
        return self._h2.receive_data(parts[0] if len(parts) == 1 else b"".join(parts))

    def _take(self, sid: int, length: int) -> bool:
        """Whether the DATA frame's payload is ours; if so, charge its flow control."""
        conn = self._h2
        if (length > conn.max_inbound_frame_size or sid in self._discard
                or conn.state_machine.state not in _OPEN_CONNECTION
                or conn.incoming_buffer._headers_buffer):
            return False
        stream = conn.streams.get(sid)
        if (stream is None or stream.state_machine.state not in _RECEIVING
                or stream._expected_content_length is not None):
            return False
        try:
            conn._inbound_flow_control_window_manager.window_consumed(length)
            stream._inbound_window_manager.window_consumed(length)
        except h2.exceptions.FlowControlError:
            conn._terminate_connection(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
            raise
        stream._actual_content_length += length
        return True
