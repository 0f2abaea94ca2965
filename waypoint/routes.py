"""HTTPRoute / GRPCRoute routing for the waypoint: parse the routes, then pick one per request.

Role: turns Gateway API routes attached (GAMMA: ``parentRefs`` of kind Service) to the
services a waypoint serves into a ``RouteTable``, and answers ``route_in(table, req)`` with a
``RouteAction`` (where to send it and how), a ``DirectResponse`` (redirect, misconfigured rule)
or ``NoRoute`` (routes exist for the service but none matches: 404, as Gateway API requires).

Precedence across every rule of every route attached to the addressed service (Gateway API,
regex placed after prefixes): Exact path > longest PathPrefix > RegularExpression; then a
method match; then most header matches; then most query matches; then the oldest route
(``creationTimestamp``), then ``namespace/name`` alphabetically; then rule and match order.
A request to a service with no route attached goes to that service (the default route).
Consumer routes (route namespace != service namespace) apply only to clients in the route's
namespace and, for them, replace the producer routes.  A gRPC request uses the GRPCRoutes
attached to its service if there are any, else the HTTPRoutes.

Parsing lives in ``route_parse.py``.  Invariants: pure; ``route_in`` never raises and returns
``RouteAction``s whose backends have a positive total weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from waypoint.l7request import Request
from waypoint.policy import Fault, RateLimit, RetrySpec

__all__ = [
    "Backend",
    "DirectResponse",
    "Entry",
    "HeaderModifier",
    "NoRoute",
    "RouteAction",
    "RouteRule",
    "RouteTable",
    "pick_backend",
    "route_in",
]


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Backend:
    """A weighted destination: a Service (``host`` is its FQDN) and port.

    ``invalid`` says why the backendRef cannot be used (unknown kind, missing port, missing
    ReferenceGrant, unknown Service); requests picked for it get a 500, as Gateway API asks.
    An empty ``host`` (default route of workload-addressed traffic) means "the original
    destination address"."""

    host: str
    namespace: str
    port: int
    weight: int = 1
    invalid: str | None = None


@dataclass(frozen=True)
class HeaderModifier:
    """Gateway API header filter: ``remove`` first, then ``set`` (replace), then ``add``.
    Names are lowercase."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` (any case) modified; kept headers keep their order and case."""
        drop = set(self.remove) | {n for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclass(frozen=True)
class RouteAction:
    """Send the request to one of ``backends`` (``pick_backend``), modified as said here."""

    backends: tuple[Backend, ...]
    route_name: str  # "HTTPRoute/ns/name/rule" or "default"; for telemetry
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    rewrite_authority: str | None = None  # new Host/:authority, if rewritten
    rewrite_path: str | None = None  # new path (without query), if rewritten
    timeout_s: float | None = None  # whole request incl. retries; None = no timeout
    backend_timeout_s: float | None = None  # each try
    retry: RetrySpec | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    rate_limit_key: str = ""  # the bucket (one per route rule) for RateLimiters


@dataclass(frozen=True)
class DirectResponse:
    """Answer without contacting a backend (redirect, rate limit, fault abort, bad rule)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    route_name: str = ""
    response_flag: str = "-"  # Envoy-style flag for telemetry (RL, FI, ...)
    reason: str = ""  # for logs


@dataclass(frozen=True)
class NoRoute:
    """Routes are attached to the service but none matches: answer 404."""

    reason: str
    status: int = 404
    response_flag: str = "NR"


# --------------------------------------------------------------------------- match model


@dataclass(frozen=True)
class PathMatch:
    kind: str  # "Exact" | "PathPrefix" | "RegularExpression"
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "Exact":
            return path == self.value
        if self.kind == "PathPrefix":
            p = self.value.rstrip("/")
            return p == "" or path == p or path.startswith(p + "/")
        return self.regex is not None and self.regex.fullmatch(path) is not None


@dataclass(frozen=True)
class ValueMatch:
    name: str  # header names lowercase; query names as written (case-sensitive)
    kind: str  # "Exact" | "RegularExpression"
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.kind == "Exact":
            return actual == self.value
        return self.regex is not None and self.regex.fullmatch(actual) is not None


@dataclass(frozen=True)
class RouteMatch:
    path: PathMatch
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches(self, req: Request) -> bool:
        if self.method is not None and req.method != self.method:
            return False
        if not self.path.matches(req.path):
            return False
        if any(not h.matches(req.header(h.name)) for h in self.headers):
            return False
        if self.query:
            params: dict[str, str] = {}
            for k, v in req.query_params():
                params.setdefault(k, v)
            if any(not q.matches(params.get(q.name)) for q in self.query):
                return False
        return True

    def rank(self) -> tuple[int, int, int, int, int]:
        kind = {"Exact": 0, "PathPrefix": 1}.get(self.path.kind, 2)
        length = -len(self.path.value) if kind < 2 else 0
        return (kind, length, 0 if self.method else 1, -len(self.headers), -len(self.query))


@dataclass(frozen=True)
class PathModifier:
    kind: str  # "ReplaceFullPath" | "ReplacePrefixMatch"
    value: str

    def apply(self, path: str, matched_prefix: str) -> str:
        if self.kind == "ReplaceFullPath":
            return self.value
        prefix = matched_prefix.rstrip("/")
        rest = path[len(prefix):] if path.startswith(prefix) else path
        new = self.value.rstrip("/") + rest
        return new if new.startswith("/") else "/" + new


@dataclass(frozen=True)
class UrlRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status: int = 302

    def location(self, req: Request, matched_prefix: str) -> str:
        scheme = self.scheme or req.scheme or "http"
        host = self.hostname or req.host
        if self.port is not None:
            port = self.port
        elif self.scheme:
            port = 443 if scheme == "https" else 80
        else:
            port = req.dst.port
        path = self.path.apply(req.path, matched_prefix) if self.path else req.path
        show_port = (scheme, port) not in (("http", 80), ("https", 443))
        q = "?" + req.query if req.query else ""
        return f"{scheme}://{host}{':' + str(port) if show_port else ''}{path}{q}"


@dataclass(frozen=True)
class RouteRule:
    """One rule of one route, with everything needed to act on it."""

    name: str  # route_name
    section: str | None = None  # the rule's own name, if any (HTTPTrafficPolicy sectionName)
    backends: tuple[Backend, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    rewrite: UrlRewrite | None = None
    redirect: Redirect | None = None
    timeout_s: float | None = None
    backend_timeout_s: float | None = None
    retry: RetrySpec | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Entry:
    """One match of one rule, attached to one service (and maybe only one of its ports)."""

    rank: tuple[Any, ...]
    match: RouteMatch
    rule: RouteRule
    port: int | None = None
    consumer_ns: str | None = None  # set for consumer routes


@dataclass(frozen=True)
class RouteTable:
    """Entries per service host, each tuple already in precedence order."""

    http: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)
    grpc: Mapping[str, tuple[Entry, ...]] = field(default_factory=dict)
    # service host -> (fault, rate limit) from an HTTPTrafficPolicy targeting the Service
    service_traffic: Mapping[str, tuple[Fault | None, RateLimit | None]] = field(
        default_factory=dict
    )


# -------------------------------------------------------------------------------- routing


def route_in(table: RouteTable, req: Request) -> RouteAction | DirectResponse | NoRoute:
    """The routing decision for ``req`` (see the module docstring for the rules)."""
    host = req.dst.service_host
    entries: tuple[Entry, ...] = ()
    if req.grpc:
        entries = tuple(e for e in table.grpc.get(host, ()) if e.port in (None, req.dst.port))
    if not entries:
        entries = tuple(e for e in table.http.get(host, ()) if e.port in (None, req.dst.port))
    mine = [e for e in entries if e.consumer_ns is not None and e.consumer_ns == req.src.namespace]
    candidates = mine or [e for e in entries if e.consumer_ns is None]
    if not candidates:
        return _default_action(table, req)
    for e in candidates:
        if e.match.matches(req):
            return _act(e, req)
    return NoRoute(reason=f"no route rule for {host or req.dst.address}:{req.dst.port} matches "
                   f"{req.method} {req.path}")


def _default_action(table: RouteTable, req: Request) -> RouteAction:
    host = req.dst.service_host
    fault, rl = table.service_traffic.get(host, (None, None))
    return RouteAction(
        backends=(Backend(host=host, namespace=req.dst.service_namespace, port=req.dst.port),),
        route_name="default",
        fault=fault,
        rate_limit=rl,
        rate_limit_key=f"Service/{host}:{req.dst.port}",
    )


def _act(e: Entry, req: Request) -> RouteAction | DirectResponse:
    rule = e.rule
    prefix = e.match.path.value if e.match.path.kind == "PathPrefix" else ""
    if rule.redirect is not None:
        return DirectResponse(
            status=rule.redirect.status,
            headers=(("location", rule.redirect.location(req, prefix)),),
            route_name=rule.name,
            reason="redirect",
        )
    if not any(b.weight > 0 for b in rule.backends):
        why = "has no backendRefs" if not rule.backends else "gives every backend weight 0"
        return DirectResponse(
            status=500, route_name=rule.name, response_flag="NR",
            reason=f"route rule {rule.name} {why}",
        )
    rw_host = rw_path = None
    if rule.rewrite is not None:
        rw_host = rule.rewrite.hostname
        if rule.rewrite.path is not None:
            rw_path = rule.rewrite.path.apply(req.path, prefix)
    return RouteAction(
        backends=rule.backends,
        route_name=rule.name,
        request_headers=rule.request_headers,
        response_headers=rule.response_headers,
        rewrite_authority=rw_host,
        rewrite_path=rw_path,
        timeout_s=rule.timeout_s,
        backend_timeout_s=rule.backend_timeout_s,
        retry=rule.retry,
        fault=rule.fault,
        rate_limit=rule.rate_limit,
        rate_limit_key=rule.name,
    )


def pick_backend(backends: tuple[Backend, ...] | list[Backend], r: float) -> Backend:
    """The backend a uniform draw ``r`` in [0, 1) selects, in proportion to the weights.

    Weight-0 backends are never picked.  ``ValueError`` if no backend has a positive weight
    (``route_in`` never returns such an action)."""
    live = [b for b in backends if b.weight > 0]
    if not live:
        raise ValueError("no backend with a positive weight")
    total = sum(b.weight for b in live)
    x = (r if 0.0 <= r < 1.0 else 0.0) * total
    acc = 0
    for b in live:
        acc += b.weight
        if x < acc:
            return b
    return live[-1]
