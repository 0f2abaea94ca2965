"""The L7 decisions' view of one HTTP request: ``Request``, ``Source``, ``Destination``.

Role: the input type shared by routing (``routes.py``), authorization (``authz.py``) and the
filters (``filters.py``).  The proxy (``proxy.py``/``http.py``) builds one ``Request`` per
HTTP request from the parsed head and the HBONE tunnel it arrived in; the decision functions
only read it.

Invariants:
- Frozen and I/O-free: building one never fails on odd input (the proxy has already rejected
  malformed HTTP); decisions never raise on any ``Request``.
- ``headers`` holds lowercase names in arrival order, repeated names kept; ``path`` has no
  query (``query`` is the raw string after ``?``, without the ``?``).
- ``src.principal`` is the peer's SPIFFE identity, with or without ``spiffe://`` (both are
  accepted everywhere); ``None`` for a peer without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

__all__ = ["Destination", "Request", "Source"]


@dataclass(frozen=True)
class Source:
    """The client: its original IP and, when it came over mTLS, its identity."""

    ip: str
    principal: str | None = None  # "cluster.local/ns/a/sa/b" (or with spiffe://)
    namespace: str | None = None


@dataclass(frozen=True)
class Destination:
    """The service the client addressed (the original VIP:port's service).

    ``service_host`` is the FQDN (``name.ns.svc.cluster.local``); empty when the client
    addressed a workload directly, in which case ``address`` (original IP) is where the
    default route goes.
    """

    service_host: str
    service_namespace: str
    port: int
    address: str = ""  # the original destination IP, if the proxy knows it


@dataclass(frozen=True)
class Request:
    """One HTTP request as the L7 decision layer sees it."""

    method: str
    scheme: str  # "http" or "https" (as the client spoke to the service)
    authority: str  # Host / :authority, possibly with ":port"
    path: str  # without the query
    query: str  # raw query string, without "?"
    headers: tuple[tuple[str, str], ...]  # (lowercase name, value), in order
    protocol: str  # "HTTP/1.1" | "HTTP/2"
    grpc: bool
    src: Source
    dst: Destination

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case); repeated headers joined with ``,``."""
        name = name.lower()
        if name in (":authority", "host"):
            return self.authority
        if name == ":method":
            return self.method
        if name == ":path":
            return self.path + ("?" + self.query if self.query else "")
        if name == ":scheme":
            return self.scheme
        values = [v for n, v in self.headers if n == name]
        return ",".join(values) if values else None

    def query_params(self) -> tuple[tuple[str, str], ...]:
        """Decoded ``(name, value)`` pairs of the query string, in order (blank values kept)."""
        try:
            return tuple(parse_qsl(self.query, keep_blank_values=True))
        except ValueError:  # only on pathological input; treat as no parameters
            return ()

    @property
    def host(self) -> str:
        """The authority without its port (IPv6 brackets kept)."""
        return strip_port(self.authority)


def strip_port(authority: str) -> str:
    """``"a.b:80"`` -> ``"a.b"``; ``"[::1]:80"`` -> ``"[::1]"``; no port -> unchanged."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end >= 0 else authority
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return authority
