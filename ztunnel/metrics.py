"""ztunnel's Prometheus metrics: the ``istio_tcp_*`` family, ``istio_build`` and the in-pod
workload manager gauges, with exactly Istio's names and label sets.

Role: hold the counters that ``ztunnel.result.ConnectionResult`` drives, and render them for the
stats port (15020). Names and labels match istio/ztunnel (``src/proxy/metrics.rs``,
``src/metrics/meta.rs``, ``src/inpod/metrics.rs``): the ``istio_`` prefix, ``_total`` on
counters, the 23 ``CommonTrafficLabels`` in Istio's order (plus its 4 locality
labels), ``unknown`` for a missing value.

Invariants:
- Every ``Metrics`` owns its families; nothing is global, so several proxies (and tests) in
  one process never share counters.
- Series are plain cells in a dict: an increment on the data path is one attribute add on a
  cell looked up once per connection. A scrape renders them with ``ambient.promtext`` (no
  ``prometheus_client`` in ztunnel's process); no ``_created`` series (upstream has none).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from importlib import metadata

from ambient import promtext

__all__ = [
    "COMMON_TRAFFIC_LABELS",
    "CONTENT_TYPE",
    "LOCALITY_LABELS",
    "TRAFFIC_LABELS",
    "UNKNOWN",
    "Cell",
    "Family",
    "Metrics",
]

UNKNOWN = "unknown"
CONTENT_TYPE = promtext.TEXT_CONTENT_TYPE

# Istio's CommonTrafficLabels, in upstream's declaration order (it is also the exposition order).
COMMON_TRAFFIC_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
# Upstream flattens these locality labels after the common ones. They are "optional" there, but
# set whenever a source or destination workload is known, which is every proxied connection; we
# always emit them (``unknown`` when the workload has no locality) to keep one label set.
LOCALITY_LABELS: tuple[str, ...] = (
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)
TRAFFIC_LABELS: tuple[str, ...] = COMMON_TRAFFIC_LABELS + LOCALITY_LABELS


def _version() -> str:
    try:
        return metadata.version("ambient")
    except metadata.PackageNotFoundError:
        return UNKNOWN


class Cell:
    """One series' value. Mutated only from the event loop (or under the GIL), read by collect."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Family:
    """A counter or gauge family with a fixed label set; ``labels(*values)`` returns its cell."""

    def __init__(self, name: str, documentation: str, kind: str, labelnames: Sequence[str]):
        if kind not in ("counter", "gauge"):
            raise ValueError(f"unsupported metric kind {kind!r}")
        self.name = name
        self.documentation = documentation
        self.kind = kind
        self.labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        self._lock = threading.Lock()  # only guards creation; increments are on the cell

    def labels(self, *values: str) -> Cell:
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}"
            )
        cell = self._cells.get(values)
        if cell is None:
            with self._lock:
                cell = self._cells.setdefault(values, Cell())
        return cell

    def value(self, *values: str) -> float:
        """Current value of one series (0 if it was never created); for tests and dumps."""
        cell = self._cells.get(tuple(values))
        return cell.value if cell is not None else 0.0

    def series(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return {k: c.value for k, c in self._cells.items()}


class Metrics:
    """All ztunnel metrics (one set per proxy)."""

    def __init__(self, *, version: str | None = None):
        self.version = version or _version()
        fams: list[Family] = []

        def fam(name: str, doc: str, kind: str, labels: Sequence[str]) -> Family:
            f = Family(name, doc, kind, labels)
            fams.append(f)
            return f

        tl = TRAFFIC_LABELS
        # Counter names are given without "_total"; the exposition adds it, as upstream does.
        self.connections_opened = fam(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            "counter",
            tl,
        )
        self.connections_closed = fam(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            "counter",
            tl,
        )
        self.received_bytes = fam(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            "counter",
            tl,
        )
        self.sent_bytes = fam(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            "counter",
            tl,
        )
        self.connections_failed = fam(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
            "counter",
            tl,
        )
        self.sockets_open = fam(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets (unstable)",
            "gauge",
            ("reporter",),
        )
        self.build = fam("istio_build", "Istio component build info", "gauge", ("component", "tag"))
        self.active_proxy_count = fam(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
            "gauge",
            (),
        )
        self.pending_proxy_count = fam(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
            "gauge",
            (),
        )
        self.proxies_started = fam(
            "workload_manager_proxies_started",
            "The total number of proxies that were started (unstable)",
            "counter",
            (),
        )
        self.proxies_stopped = fam(
            "workload_manager_proxies_stopped",
            "The total number of proxies that were stopped (unstable)",
            "counter",
            (),
        )

        self.build.labels("ztunnel", self.version).set(1)
        # Unlabelled series exist from the start, so a scrape shows 0 rather than nothing.
        for f in (
            self.active_proxy_count,
            self.pending_proxy_count,
            self.proxies_started,
            self.proxies_stopped,
        ):
            f.labels()
        self.families: tuple[Family, ...] = tuple(fams)

    def __iter__(self) -> Iterator[Family]:
        return iter(self.families)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of these metrics."""
        return promtext.render(self.families)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """Render for a scrape with the given ``Accept`` header: (body, content type).

        Without an Accept header (or one that does not ask for OpenMetrics) this is
        ``render()`` with ``CONTENT_TYPE``; a Prometheus server asking for OpenMetrics gets it.
        """
        return promtext.exposition(self.families, accept)
