"""The waypoint's request telemetry: Istio's standard HTTP and TCP metrics and one access-log
line per request (or per TCP connection).

Metrics (Prometheus text on 15020, names and labels as Istio's standard metrics):
``istio_requests_total`` (counter), ``istio_request_duration_milliseconds``,
``istio_request_bytes`` and ``istio_response_bytes`` (histograms), all with ``reporter="waypoint"``
and the labels in ``HTTP_LABELS``; ``istio_tcp_connections_opened_total``,
``istio_tcp_connections_closed_total``, ``istio_tcp_received_bytes_total``,
``istio_tcp_sent_bytes_total`` for TCP ports (``request_protocol="tcp"``); ``istio_build``.
Missing label values are ``unknown``.

Response flags are Envoy's short names: ``-``, ``NR`` (no route), ``UH`` (no healthy
upstream), ``UF`` (upstream connection failure), ``UC`` (upstream connection terminated),
``UT`` (upstream request timeout), ``URX`` (retries exhausted), ``RL`` (rate limited), ``FI``
(fault abort), ``DI`` (fault delay), ``DC`` (downstream went away), ``DPE`` (downstream
protocol error). An RBAC denial is ``403`` with flag ``-`` and details
``rbac_access_denied_matched_policy[...]``, as Envoy reports it.

Invariants: ``RequestRecord.finish`` runs once (later calls are ignored); metrics and the
access-log line come from the same record, so they never disagree; every ``WaypointMetrics``
has its own families (rendered by ``ambient.promtext``).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ambient import promtext
from ambient.model import Service, Workload
from ztunnel.accesslog import Bare, access_logger, emit, format_addr
from ztunnel.metrics import UNKNOWN, Family

__all__ = [
    "BYTES_BUCKETS",
    "DURATION_BUCKETS",
    "HTTP_LABELS",
    "TCP_LABELS",
    "Histogram",
    "RequestRecord",
    "TcpRecord",
    "WaypointMetrics",
]

REPORTER = "waypoint"

_PEER_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
)
HTTP_LABELS: tuple[str, ...] = _PEER_LABELS + (
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
TCP_LABELS: tuple[str, ...] = _PEER_LABELS + (
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
# Istio's default buckets for request duration (ms) and message sizes (bytes).
DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)
BYTES_BUCKETS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)


class _HistCell:
    __slots__ = ("counts", "sum", "count")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0
        self.count = 0


class Histogram:
    """A histogram family with a fixed label set; ``observe(labels, value)``."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._cells: dict[tuple[str, ...], _HistCell] = {}
        self._lock = threading.Lock()

    def observe(self, values: tuple[str, ...], value: float) -> None:
        cell = self._cells.get(values)
        if cell is None:
            with self._lock:
                cell = self._cells.setdefault(values, _HistCell(len(self.buckets)))
        i = bisect.bisect_left(self.buckets, value)
        if i < len(cell.counts):
            cell.counts[i] += 1
        cell.sum += value
        cell.count += 1

    def count(self, values: tuple[str, ...]) -> int:
        cell = self._cells.get(values)
        return cell.count if cell is not None else 0

    def series(self) -> dict[tuple[str, ...], promtext.HistogramValue]:
        """Each series' cumulative buckets (``+Inf`` last) and sum, for the exposition."""
        with self._lock:
            items = list(self._cells.items())
        out: dict[tuple[str, ...], promtext.HistogramValue] = {}
        for key, cell in items:
            acc, buckets = 0, []
            for le, n in zip(self.buckets, cell.counts, strict=True):
                acc += n
                buckets.append((_le(le), float(acc)))
            buckets.append(("+Inf", float(cell.count)))
            out[key] = (buckets, cell.sum)
        return out


def _le(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


class WaypointMetrics:
    """All waypoint metrics (one set per proxy)."""

    def __init__(self, version: str = UNKNOWN) -> None:
        self.requests = Family("istio_requests", "Total requests handled by the waypoint",
                               "counter", HTTP_LABELS)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration in milliseconds", HTTP_LABELS,
                                  DURATION_BUCKETS)
        self.request_bytes = Histogram("istio_request_bytes", "Request sizes in bytes",
                                       HTTP_LABELS, BYTES_BUCKETS)
        self.response_bytes = Histogram("istio_response_bytes", "Response sizes in bytes",
                                        HTTP_LABELS, BYTES_BUCKETS)
        self.tcp_opened = Family("istio_tcp_connections_opened",
                                 "The total number of TCP connections opened", "counter",
                                 TCP_LABELS)
        self.tcp_closed = Family("istio_tcp_connections_closed",
                                 "The total number of TCP connections closed", "counter",
                                 TCP_LABELS)
        self.tcp_received = Family(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            "counter", TCP_LABELS)
        self.tcp_sent = Family(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            "counter", TCP_LABELS)
        self.build = Family("istio_build", "Istio component build info", "gauge",
                            ("component", "tag"))
        self.build.labels("waypoint", version).set(1)
        self.families: tuple[promtext.Exposable, ...] = (
            self.requests, self.duration, self.request_bytes, self.response_bytes,
            self.tcp_opened, self.tcp_closed, self.tcp_received, self.tcp_sent, self.build)

    def render(self) -> bytes:
        return promtext.render(self.families)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        return promtext.exposition(self.families, accept)


def _u(v: Any) -> str:
    s = "" if v is None else str(v)
    return s or UNKNOWN


def peer_labels(
    src: Workload | None, src_principal: str | None, dst: Workload | None,
    svc: Service | None,
) -> dict[str, str]:
    """The source/destination labels (pure)."""
    return {
        "reporter": REPORTER,
        "source_workload": _u(src.workload_name if src else None),
        "source_canonical_service": _u(src.canonical_name if src else None),
        "source_canonical_revision": _u(src.canonical_revision if src else None),
        "source_workload_namespace": _u(src.namespace if src else None),
        "source_principal": _u(src_principal),
        "source_app": _u(src.canonical_name if src else None),
        "source_version": _u(src.canonical_revision if src else None),
        "source_cluster": _u(src.cluster_id if src else None),
        "destination_workload": _u(dst.workload_name if dst else None),
        "destination_workload_namespace": _u(dst.namespace if dst else None),
        "destination_principal": _u(dst.identity() if dst else None),
        "destination_app": _u(dst.canonical_name if dst else None),
        "destination_version": _u(dst.canonical_revision if dst else None),
        "destination_service": _u(svc.hostname if svc else None),
        "destination_canonical_service": _u(dst.canonical_name if dst else None),
        "destination_canonical_revision": _u(dst.canonical_revision if dst else None),
        "destination_service_name": _u(svc.name if svc else None),
        "destination_service_namespace": _u(svc.namespace if svc else None),
        "destination_cluster": _u(dst.cluster_id if dst else None),
    }


_PEER_CACHE_MAX = 4096
_peer_cache: dict[tuple[int, int, int, str | None],
                  tuple[Workload | None, Workload | None, Service | None, tuple[str, ...]]] = {}


def peer_key(src: Workload | None, src_principal: str | None, dst: Workload | None,
             svc: Service | None) -> tuple[str, ...]:
    """``peer_labels`` as a tuple in ``_PEER_LABELS`` order, cached per (objects, principal):
    the mesh model's objects are immutable, and a cached entry holds them, so an id is never
    taken for another object's."""
    k = (id(src), id(dst), id(svc), src_principal)
    hit = _peer_cache.get(k)
    if hit is not None and hit[0] is src and hit[1] is dst and hit[2] is svc:
        return hit[3]
    labels = peer_labels(src, src_principal, dst, svc)
    key = tuple(labels[n] for n in _PEER_LABELS)
    if len(_peer_cache) >= _PEER_CACHE_MAX:
        _peer_cache.clear()
    _peer_cache[k] = (src, dst, svc, key)
    return key


@dataclass(eq=False, slots=True)
class RequestRecord:
    """Everything known about one HTTP request; ``finish`` records metrics and the log line."""

    metrics: WaypointMetrics | None
    src_addr: tuple[str, int]
    src_workload: Workload | None
    src_principal: str | None
    method: str
    authority: str
    path: str
    protocol: str  # "HTTP/1.1" | "HTTP/2"
    grpc: bool
    service: Service | None = None  # the addressed service (until a backend is chosen)
    dst_workload: Workload | None = None
    upstream: str | None = None  # "ip:port" of the chosen endpoint
    route: str | None = None
    start: float = field(default_factory=time.monotonic)
    flags: list[str] = field(default_factory=list)
    details: str | None = None
    attempts: int = 0
    finished: bool = False
    log: logging.Logger | None = None

    def flag(self, f: str) -> None:
        if f not in self.flags:
            self.flags.append(f)

    @property
    def response_flags(self) -> str:
        return ",".join(self.flags) if self.flags else "-"

    def key(self, status: int, grpc_status: str | None) -> tuple[str, ...]:
        """The request's series, values in ``HTTP_LABELS`` order."""
        return peer_key(self.src_workload, self.src_principal, self.dst_workload,
                        self.service) + (
            "grpc" if self.grpc else "http", str(status),
            grpc_status if grpc_status is not None else "", self.response_flags, "mutual_tls")

    def labels(self, status: int, grpc_status: str | None) -> dict[str, str]:
        """Every value is non-empty (``peer_labels`` fills ``unknown``) except
        ``grpc_response_status``, which is empty for plain HTTP."""
        return dict(zip(HTTP_LABELS, self.key(status, grpc_status), strict=True))

    def finish(self, status: int, *, request_bytes: int, response_bytes: int,
               grpc_status: str | None = None, error: BaseException | str | None = None) -> bool:
        if self.finished:
            return False
        self.finished = True
        duration_ms = (time.monotonic() - self.start) * 1000.0
        key = self.key(status, grpc_status)
        flags = key[-2]  # response_flags
        m = self.metrics
        if m is not None:
            m.requests.labels(*key).inc()
            m.duration.observe(key, duration_ms)
            m.request_bytes.observe(key, float(request_bytes))
            m.response_bytes.observe(key, float(response_bytes))
        err = None if error is None else (str(error) or type(error).__name__)
        fields: list[tuple[str, Any]] = [
            ("src.addr", Bare(format_addr(self.src_addr))),
            ("src.workload", self.src_workload.name if self.src_workload else None),
            ("src.namespace", self.src_workload.namespace if self.src_workload else None),
            ("src.identity", self.src_principal),
            ("dst.addr", Bare(self.upstream) if self.upstream else None),
            ("dst.service", self.service.hostname if self.service else None),
            ("dst.workload", self.dst_workload.name if self.dst_workload else None),
            ("dst.namespace", self.dst_workload.namespace if self.dst_workload else None),
            ("dst.identity", str(self.dst_workload.identity()) if self.dst_workload else None),
            ("direction", "inbound"),
            ("http.method", self.method),
            ("http.host", self.authority),
            ("http.path", self.path),
            ("protocol", self.protocol),
            ("http.status", status),
            ("grpc.status", grpc_status),
            ("response_flags", flags),
            ("response_code_details", self.details),
            ("route", self.route),
            ("attempts", self.attempts or None),
            ("bytes_recv", request_bytes),
            ("bytes_sent", response_bytes),
            ("duration", f"{int(duration_ms)}ms"),
            ("error", err),
        ]
        fields = [(k, v) for k, v in fields if v is not None and v != ""]
        level = logging.INFO if status < 500 and err is None else logging.WARNING
        emit(self.log or access_logger(), level, "request complete", fields)
        return True


@dataclass(eq=False, slots=True)
class TcpRecord:
    """One TCP connection relayed at L4 through the waypoint."""

    metrics: WaypointMetrics | None
    src_addr: tuple[str, int]
    src_workload: Workload | None
    src_principal: str | None
    service: Service | None
    dst_workload: Workload | None = None
    upstream: str | None = None
    start: float = field(default_factory=time.monotonic)
    opened: bool = False
    finished: bool = False
    log: logging.Logger | None = None

    def _key(self, flags: str) -> tuple[str, ...]:
        """The connection's series, values in ``TCP_LABELS`` order."""
        return peer_key(self.src_workload, self.src_principal, self.dst_workload,
                        self.service) + ("tcp", flags, "mutual_tls")

    def open(self) -> None:
        if self.opened:
            return
        self.opened = True
        if self.metrics is not None:
            self.metrics.tcp_opened.labels(*self._key("-")).inc()

    def finish(self, sent: int, received: int, *, flags: str = "-",
               error: BaseException | str | None = None) -> bool:
        """``sent``: bytes client -> upstream; ``received``: upstream -> client."""
        if self.finished:
            return False
        self.finished = True
        m = self.metrics
        if m is not None:
            plain = self._key("-")
            m.tcp_closed.labels(*(plain if flags == "-" else self._key(flags))).inc()
            m.tcp_received.labels(*plain).inc(sent)
            m.tcp_sent.labels(*plain).inc(received)
        err = None if error is None else (str(error) or type(error).__name__)
        fields: list[tuple[str, Any]] = [
            ("src.addr", Bare(format_addr(self.src_addr))),
            ("src.workload", self.src_workload.name if self.src_workload else None),
            ("src.namespace", self.src_workload.namespace if self.src_workload else None),
            ("src.identity", self.src_principal),
            ("dst.addr", Bare(self.upstream) if self.upstream else None),
            ("dst.service", self.service.hostname if self.service else None),
            ("dst.workload", self.dst_workload.name if self.dst_workload else None),
            ("dst.namespace", self.dst_workload.namespace if self.dst_workload else None),
            ("direction", "inbound"),
            ("protocol", "tcp"),
            ("response_flags", flags),
            ("bytes_recv", sent),
            ("bytes_sent", received),
            ("duration", f"{int((time.monotonic() - self.start) * 1000)}ms"),
            ("error", err),
        ]
        fields = [(k, v) for k, v in fields if v is not None and v != ""]
        emit(self.log or access_logger(), logging.INFO if err is None else logging.WARNING,
             "connection complete", fields)
        return True
