"""One result object per proxied connection: it drives the ``istio_tcp_*`` metrics and the one
access-log line, so the two can never disagree.

Lifecycle (as istio/ztunnel's ``ConnectionResult``):
- ``ConnectionResult.open(...)`` counts ``istio_tcp_connections_opened_total`` and
  ``istio_tcp_sockets_open``, writes a debug ``connection opened`` line, and registers the
  connection with a ``ConnectionTracker`` if one is given.
- ``add_sent`` / ``add_recv`` can count bytes as they flow; ztunnel's relays do not call them
  (that would be Python work per chunk) and give ``close`` the totals instead, so a
  connection's bytes reach the byte counters when it ends.
- ``close(...)`` runs exactly once (later calls are ignored and return False): it counts
  ``closed``, the byte remainder and, for a failure flag, ``failed``; writes one
  ``connection complete`` line (level error when failed); leaves the tracker.

Byte directions: *sent* = bytes forwarded from the source towards the destination (the request
direction, Istio's ``istio_tcp_received_bytes_total``), *recv* = bytes forwarded from the
destination back to the source (``istio_tcp_sent_bytes_total``). The access log reports them from
the local workload's side like upstream: for an outbound (source-reporter) connection
``bytes_sent`` is the request direction, for inbound it is the response direction.

``traffic_labels`` is the pure mapping from a result to the metric labels; it follows upstream:
``source_principal`` is the mTLS peer identity (``unknown`` for plaintext),
``destination_principal`` the destination identity (given, or the destination workload's),
``*_app``/``*_canonical_service`` the canonical name, ``*_version``/``*_canonical_revision`` the
canonical revision, ``*_workload`` the workload (deployment) name.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ambient.hbone.aio import HboneConnectError
from ztunnel.accesslog import access_fields, access_logger, emit, format_addr
from ztunnel.metrics import TRAFFIC_LABELS, UNKNOWN, Cell, Metrics

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "FAILURE_FLAGS",
    "ConnectionResult",
    "ConnectionTracker",
    "Failure",
    "ResponseFlags",
    "flag_for_error",
    "traffic_labels",
]


class ResponseFlags:
    """The ``response_flags`` label values ztunnel uses."""

    NONE = "-"
    DENY = "DENY"  # authorization policy denied the connection
    CONNECT = "CONNECT"  # the upstream connection could not be established
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"  # timed out, probably a NetworkPolicy blocking 15008
    IDENTITY_ERROR = "IDENTITY_ERROR"  # no certificate / wrong peer identity
    CERT_REVOKED = "CERT_REVOKED"


FAILURE_FLAGS = frozenset(
    {
        ResponseFlags.DENY,
        ResponseFlags.CONNECT,
        ResponseFlags.TLS_FAILURE,
        ResponseFlags.H2_HANDSHAKE_FAILURE,
        ResponseFlags.NETWORK_POLICY,
        ResponseFlags.IDENTITY_ERROR,
        ResponseFlags.CERT_REVOKED,
    }
)


class Failure(Exception):
    """A connection failure with its response flag: ``raise Failure(ResponseFlags.DENY, msg)``.

    ``ConnectionResult.close(error=exc)`` takes the flag from it.
    """

    def __init__(self, flag: str, message: str):
        if flag not in FAILURE_FLAGS:
            raise ValueError(f"unknown response flag {flag!r}")
        super().__init__(message)
        self.flag = flag
        self.message = message


def flag_for_error(error: BaseException) -> str:
    """The response flag for an exception; anything unrecognised is ``CONNECT`` (as upstream).

    An HBONE CONNECT the peer answered with 401 is its authorization policy saying no: DENY.
    """
    if isinstance(error, Failure):
        return error.flag
    if isinstance(error, HboneConnectError) and error.status == 401:
        return ResponseFlags.DENY
    if isinstance(error, ssl.SSLError | ssl.CertificateError):
        return ResponseFlags.TLS_FAILURE
    module = type(error).__module__
    if module.startswith("h2."):
        return ResponseFlags.H2_HANDSHAKE_FAILURE
    if type(error).__name__ == "IdentityError":
        return ResponseFlags.IDENTITY_ERROR
    return ResponseFlags.CONNECT


# ---------------------------------------------------------------------------------------------
# The shapes we read from ambient.model (typed structurally so tests can use stand-ins).


class _LocalityLike(Protocol):
    region: str
    zone: str


class WorkloadLike(Protocol):
    name: str
    namespace: str
    canonical_name: str
    canonical_revision: str
    workload_name: str
    cluster_id: str

    def identity(self) -> Any: ...


class ServiceLike(Protocol):
    name: str
    namespace: str
    hostname: str


# ---------------------------------------------------------------------------------------------


_ids = itertools.count(1)
_FLAGS_AT = TRAFFIC_LABELS.index("response_flags")  # its slot in a metric key


@dataclass(eq=False, slots=True)
class ConnectionResult:
    """Everything known about one proxied connection; see the module docstring.

    One lives as long as its connection, so it has ``__slots__`` and keeps its labels as
    the tuple of values in ``TRAFFIC_LABELS`` order (the metric key), not as a dict.
    """

    reporter: str  # "source" (outbound) | "destination" (inbound)
    src: tuple[str, int]
    dst: tuple[str, int]
    direction: str = ""  # "outbound" | "inbound"; derived from reporter when empty
    hbone_target: str | None = None  # the CONNECT :authority, e.g. "10.244.2.3:8080"
    src_workload: WorkloadLike | None = None
    dst_workload: WorkloadLike | None = None
    dst_service: ServiceLike | None = None
    src_identity: Any = None  # SpiffeId (or its string) of the mTLS source
    dst_identity: Any = None  # SpiffeId (or its string) of the destination
    security_policy: str = "unknown"  # "mutual_tls" | "unknown"
    start: float = field(default_factory=time.monotonic)

    # Runtime state (set by open/close; not part of the connection's description).
    id: int = field(default_factory=lambda: next(_ids))
    started_at: float = field(default_factory=time.time)
    bytes_sent: int = 0
    bytes_recv: int = 0
    closed: bool = False
    response_flags: str = ResponseFlags.NONE
    error: str | None = None
    # The L4 authorization outcome, when it ran (inbound); for ``ambientctl tap``.
    authz_allowed: bool | None = None
    authz_policy: str | None = None
    authz_reason: str | None = None
    metrics: Metrics | None = field(default=None, repr=False)
    log: logging.Logger | None = field(default=None, repr=False)
    tracker: ConnectionTracker | None = field(default=None, repr=False)
    _labels: tuple[str, ...] | None = field(default=None, repr=False)
    _sent_cell: Cell | None = field(default=None, repr=False)
    _recv_cell: Cell | None = field(default=None, repr=False)
    _metric_sent: int = field(default=0, repr=False)
    _metric_recv: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.reporter not in ("source", "destination"):
            raise ValueError(f"reporter must be 'source' or 'destination', not {self.reporter!r}")
        if not self.direction:
            self.direction = "outbound" if self.reporter == "source" else "inbound"
        if self.hbone_target is not None and not isinstance(self.hbone_target, str):
            self.hbone_target = format_addr(self.hbone_target)

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        metrics: Metrics | None,
        log: logging.Logger | None = None,
        *,
        tracker: ConnectionTracker | None = None,
        **fields: Any,
    ) -> ConnectionResult:
        """Create the result for a new connection and count it as opened.

        ``fields`` are the dataclass fields (reporter, src, dst, hbone_target, src_workload,
        dst_workload, dst_service, src_identity, dst_identity, security_policy, direction,
        start). ``log`` defaults to the ``access`` logger; ``metrics=None`` records nothing.
        """
        res = cls(**fields)
        res.metrics, res.log, res.tracker = metrics, log or access_logger(), tracker
        key = res._label_values()
        if metrics is not None:
            metrics.connections_opened.labels(*key).inc()
            # Byte series carry response_flags "-" for the whole connection, as upstream.
            res._sent_cell = metrics.received_bytes.labels(*key)
            res._recv_cell = metrics.sent_bytes.labels(*key)
            metrics.sockets_open.labels(res.reporter).inc()
        if res.log.isEnabledFor(logging.DEBUG):  # skip building fields when filtered out
            emit(res.log, logging.DEBUG, "connection opened", res._fields())
        if tracker is not None:
            tracker.add(res)
        return res

    def set_decision(self, allowed: bool, policy: str | None, reason: str) -> None:
        """Record the L4 authorization decision (``ambient.authz.Decision`` fields)."""
        self.authz_allowed, self.authz_policy, self.authz_reason = allowed, policy, reason

    def add_sent(self, n: int) -> None:
        """``n`` more bytes went from the source towards the destination."""
        self.bytes_sent += n
        if self._sent_cell is not None and not self.closed:
            self._sent_cell.inc(n)
            self._metric_sent += n

    def add_recv(self, n: int) -> None:
        """``n`` more bytes went from the destination back to the source."""
        self.bytes_recv += n
        if self._recv_cell is not None and not self.closed:
            self._recv_cell.inc(n)
            self._metric_recv += n

    def close(
        self,
        bytes_sent: int | None = None,
        bytes_recv: int | None = None,
        error: str | BaseException | None = None,
        response_flags: str = ResponseFlags.NONE,
    ) -> bool:
        """Record the end of the connection once; returns False (and does nothing) if already
        closed. Totals given here replace the running counts; a failure without a flag is
        classified from the exception (``flag_for_error``), or ``CONNECT`` for a message."""
        if self.closed:
            return False
        self.closed = True
        if bytes_sent is not None:
            self.bytes_sent = max(bytes_sent, 0)
        if bytes_recv is not None:
            self.bytes_recv = max(bytes_recv, 0)
        if error is not None and response_flags == ResponseFlags.NONE:
            response_flags = (
                flag_for_error(error) if isinstance(error, BaseException) else ResponseFlags.CONNECT
            )
        self.response_flags = response_flags
        if isinstance(error, BaseException):
            error = str(error) or type(error).__name__
        self.error = error
        try:
            self._record_metrics()
        finally:
            if self.tracker is not None:
                self.tracker.remove(self)
            level = logging.INFO if error is None else logging.ERROR
            emit(self.log or access_logger(), level, "connection complete", self._fields(True))
        return True

    def _record_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        # Bytes not yet counted live (totals passed to close) go to the same series.
        if self._sent_cell is not None and self.bytes_sent > self._metric_sent:
            self._sent_cell.inc(self.bytes_sent - self._metric_sent)
        if self._recv_cell is not None and self.bytes_recv > self._metric_recv:
            self._recv_cell.inc(self.bytes_recv - self._metric_recv)
        self._metric_sent, self._metric_recv = self.bytes_sent, self.bytes_recv
        values = self._label_values()
        key = (*values[:_FLAGS_AT], self.response_flags, *values[_FLAGS_AT + 1:])
        m.connections_closed.labels(*key).inc()
        if self.response_flags in FAILURE_FLAGS:
            m.connections_failed.labels(*key).inc()
        m.sockets_open.labels(self.reporter).dec()

    def __enter__(self) -> ConnectionResult:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(error=exc)

    # -- views ---------------------------------------------------------------------------------

    def labels(self) -> dict[str, str]:
        """The traffic labels with ``response_flags`` "-" (fixed when first computed: at open)."""
        return dict(zip(TRAFFIC_LABELS, self._label_values(), strict=True))

    def _label_values(self) -> tuple[str, ...]:
        if self._labels is None:
            tl = traffic_labels(self, ResponseFlags.NONE)
            self._labels = _shared_key(tuple(tl[name] for name in TRAFFIC_LABELS))
        return self._labels

    @property
    def duration_ms(self) -> int:
        return int((time.monotonic() - self.start) * 1000)

    def _fields(self, complete: bool = False) -> list[tuple[str, Any]]:
        tl = self.labels()
        mtls = self.security_policy == "mutual_tls"

        def known(v: str) -> str | None:
            return None if v == UNKNOWN else v

        # The log names pods (workload.name), falling back to the canonical service.
        src_wl = _str(getattr(self.src_workload, "name", None)) or known(
            tl["source_canonical_service"]
        )
        dst_wl = _str(getattr(self.dst_workload, "name", None)) or known(
            tl["destination_canonical_service"]
        )
        extra: dict[str, Any] = {}
        if complete:
            # Upstream unflips the byte counts for logs: they read from the local workload.
            out = self.reporter == "source"
            extra = {
                "bytes_sent": self.bytes_sent if out else self.bytes_recv,
                "bytes_recv": self.bytes_recv if out else self.bytes_sent,
                "duration_ms": self.duration_ms,
                "error": self.error,
            }
        return access_fields(
            src=self.src,
            src_workload=src_wl,
            src_namespace=known(tl["source_workload_namespace"]),
            src_identity=known(tl["source_principal"]) if mtls else None,
            src_cluster=known(tl["source_cluster"]),
            dst=self.dst,
            hbone_addr=self.hbone_target,
            dst_service=known(tl["destination_service"]),
            dst_workload=dst_wl,
            dst_namespace=known(tl["destination_workload_namespace"]),
            dst_identity=known(tl["destination_principal"]) if mtls else None,
            dst_cluster=known(tl["destination_cluster"]),
            direction=self.direction,
            **extra,
        )

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able description of the live connection (for admin ``/connections``)."""
        return {
            "id": self.id,
            "reporter": self.reporter,
            "direction": self.direction,
            "src": format_addr(self.src),
            "dst": format_addr(self.dst),
            "hboneTarget": self.hbone_target,
            "srcWorkload": _str(getattr(self.src_workload, "name", None)),
            "dstWorkload": _str(getattr(self.dst_workload, "name", None)),
            "dstService": _str(getattr(self.dst_service, "hostname", None)),
            "srcIdentity": _str(self.src_identity),
            "dstIdentity": _str(self._dst_identity()),
            "securityPolicy": self.security_policy,
            "bytesSent": self.bytes_sent,
            "bytesRecv": self.bytes_recv,
            "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "durationMs": self.duration_ms,
        }

    def _dst_identity(self) -> Any:
        if self.dst_identity:
            return self.dst_identity
        ident = getattr(self.dst_workload, "identity", None)
        return ident() if callable(ident) else None


# Connections between the same workloads have equal label values: they share one tuple (and
# its strings) instead of holding a copy each.  Its size follows the metric series (one per
# distinct key, which the registry keeps anyway); cleared past a bound so it cannot grow
# without limit when metrics are off.
_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_KEYS = 4096


def _shared_key(key: tuple[str, ...]) -> tuple[str, ...]:
    got = _KEYS.get(key)
    if got is None:
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        got = _KEYS[key] = key
    return got


def _str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v)
    return s or None


def _u(v: Any) -> str:
    """A label value: ``unknown`` for None or empty."""
    s = _str(v)
    return s if s is not None else UNKNOWN


def traffic_labels(result: ConnectionResult, response_flags: str = "-") -> dict[str, str]:
    """Istio's CommonTrafficLabels (+ locality) for ``result``; missing values are ``unknown``.

    Pure: depends only on the result's descriptive fields and ``response_flags``.
    """
    s, d, svc = result.src_workload, result.dst_workload, result.dst_service
    mtls = result.security_policy == "mutual_tls"
    s_loc, d_loc = getattr(s, "locality", None), getattr(d, "locality", None)
    labels = {
        "reporter": result.reporter,
        "source_workload": _u(getattr(s, "workload_name", None)),
        "source_canonical_service": _u(getattr(s, "canonical_name", None)),
        "source_canonical_revision": _u(getattr(s, "canonical_revision", None)),
        "source_workload_namespace": _u(getattr(s, "namespace", None)),
        # Only the identity proven by mTLS; a plaintext peer's claimed workload is not proof.
        "source_principal": _u(result.src_identity if mtls else None),
        "source_app": _u(getattr(s, "canonical_name", None)),
        "source_version": _u(getattr(s, "canonical_revision", None)),
        "source_cluster": _u(getattr(s, "cluster_id", None)),
        "destination_service": _u(getattr(svc, "hostname", None)),
        "destination_service_namespace": _u(getattr(svc, "namespace", None)),
        "destination_service_name": _u(getattr(svc, "name", None)),
        "destination_workload": _u(getattr(d, "workload_name", None)),
        "destination_canonical_service": _u(getattr(d, "canonical_name", None)),
        "destination_canonical_revision": _u(getattr(d, "canonical_revision", None)),
        "destination_workload_namespace": _u(getattr(d, "namespace", None)),
        "destination_principal": _u(result._dst_identity()),
        "destination_app": _u(getattr(d, "canonical_name", None)),
        "destination_version": _u(getattr(d, "canonical_revision", None)),
        "destination_cluster": _u(getattr(d, "cluster_id", None)),
        "request_protocol": "tcp",
        "response_flags": response_flags or ResponseFlags.NONE,
        "connection_security_policy": "mutual_tls" if mtls else "unknown",
        "source_region": _u(getattr(s_loc, "region", None)),
        "source_zone": _u(getattr(s_loc, "zone", None)),
        "destination_region": _u(getattr(d_loc, "region", None)),
        "destination_zone": _u(getattr(d_loc, "zone", None)),
    }
    return labels


class ConnectionTracker:
    """The live connections of one proxy, for the admin ``/connections`` dump.

    ``observers`` are called as ``observer("open"|"close", result)`` when a connection is
    added or removed (the admin ``/tap`` stream); they must not block.
    """

    def __init__(self) -> None:
        self._live: dict[int, ConnectionResult] = {}
        self.observers: list[Callable[[str, ConnectionResult], None]] = []

    def add(self, result: ConnectionResult) -> None:
        self._live[result.id] = result
        if self.observers:
            self._notify("open", result)

    def remove(self, result: ConnectionResult) -> None:
        self._live.pop(result.id, None)
        if self.observers:
            self._notify("close", result)

    def _notify(self, kind: str, result: ConnectionResult) -> None:
        for observer in self.observers:
            try:
                observer(kind, result)
            except Exception:  # an observer must never break the data path
                logging.getLogger("ztunnel.tap").exception("connection observer failed")

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, result: object) -> bool:
        return isinstance(result, ConnectionResult) and self._live.get(result.id) is result

    def results(self) -> list[ConnectionResult]:
        return list(self._live.values())

    def list(self) -> list[dict[str, Any]]:
        """Snapshots of the live connections, oldest first."""
        return [r.snapshot() for r in sorted(self._live.values(), key=lambda r: r.id)]
