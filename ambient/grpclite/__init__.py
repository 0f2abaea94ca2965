"""A small gRPC client over HTTP/2 (h2) and TLS (ssl): what ztunnel needs, without grpcio.

Role: the node proxy's two control-plane calls -- the CA's unary ``CreateCertificate`` and the
delta-ADS bidirectional stream -- spoken directly, so the ztunnel process does not load grpcio
(its C core costs ~10 MB of resident memory).  The control plane stays a grpcio server; the
interop tests run this client against it.

Layers (import from this package; the submodules are the seam):

- ``protocol``: pure helpers (table-tested): message framing (5-byte prefix, never
  compressed), ``grpc-timeout`` encoding, request headers with metadata validation, the status
  of a call from trailers / a trailers-only response / an HTTP status / an RST_STREAM code (the
  gRPC HTTP/2 spec's mappings), ``grpc-message`` percent-decoding;
- ``protocol``: :class:`ClientCore`, the sans-I/O connection: h2 state, per-call receive
  queues and send buffers, flow control, GOAWAY.  Bytes in, changed calls out, bytes to send;
- ``aio``: :class:`Channel` / :class:`Call`, the asyncio edge: dial (TLS 1.2+, ALPN h2, the
  server verified against the configured roots and name), one connection shared by calls,
  deadlines, keepalive pings, cancellation, closing an idle connection.

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

from .aio import Call, Channel, client_tls_context
from .protocol import (
    DEFAULT_MAX_RECEIVE,
    CallState,
    ClientCore,
    GrpcError,
    MessageDecoder,
    StatusCode,
    call_status,
    encode_timeout,
    frame_message,
    request_headers,
    response_problem,
    status_for_http,
    status_for_reset,
)

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
