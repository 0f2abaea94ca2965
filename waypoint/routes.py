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

Invariants: pure; parsing raises only ``FieldError``; ``route_in`` never raises and returns
``RouteAction``s whose backends have a positive total weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ambient.config._common import FieldError, as_list, as_map, as_str, check_keys, short
from waypoint.l7request import Request
from waypoint.policy import Fault, RateLimit, RetrySpec, parse_duration, parse_retry

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

GATEWAY_GROUP = "gateway.networking.k8s.io"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


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


# -------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParentRef:
    kind: str
    group: str
    namespace: str
    name: str
    port: int | None
    section: str | None


@dataclass(frozen=True)
class ParsedRoute:
    kind: str  # "HTTPRoute" | "GRPCRoute"
    namespace: str
    name: str
    created: str
    parents: tuple[ParentRef, ...]
    rules: tuple[tuple[RouteRule, tuple[RouteMatch, ...]], ...]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


# (from namespace, backend namespace, backend name, port, weight) -> Backend
BackendResolver = Callable[[str, str, str, int | None, int, str, str], Backend]

_ROUTE_TOP = {"apiVersion", "kind", "metadata", "spec", "status"}


def _regex(value: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except (re.error, RecursionError, OverflowError) as e:
        raise FieldError(f"{where} {short(value)} is not a valid regular expression: {e}") from None


def _value_matches(raw: Any, where: str, *, header: bool) -> tuple[ValueMatch, ...]:
    out: list[ValueMatch] = []
    seen: set[str] = set()
    for i, m in enumerate(as_list(raw, where)):
        w = f"{where}[{i}]"
        m = as_map(m, w)
        check_keys(m, {"type", "name", "value"}, w)
        name = as_str(m.get("name"), f"{w}.name")
        if header:
            if not _HEADER_NAME.match(name):
                raise FieldError(f"{w}.name {short(name)} is not an HTTP header name")
            name = name.lower()
        value = as_str(m.get("value"), f"{w}.value")
        kind = m.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise FieldError(f"{w}.type {short(kind)} is not Exact|RegularExpression")
        if name in seen:  # Gateway API: only the first entry for a name counts
            continue
        seen.add(name)
        rx = _regex(value, f"{w}.value") if kind == "RegularExpression" else None
        out.append(ValueMatch(name=name, kind=kind, value=value, regex=rx))
    return tuple(out)


def _path_match(raw: Any, where: str) -> PathMatch:
    if raw is None:
        return PathMatch("PathPrefix", "/")
    raw = as_map(raw, where)
    check_keys(raw, {"type", "value"}, where)
    kind = raw.get("type", "PathPrefix")
    value = as_str(raw.get("value", "/"), f"{where}.value")
    if kind in ("Exact", "PathPrefix"):
        if not value.startswith("/"):
            raise FieldError(f"{where}.value {short(value)} must start with /")
        return PathMatch(kind, value)
    if kind == "RegularExpression":
        return PathMatch(kind, value, _regex(value, f"{where}.value"))
    raise FieldError(f"{where}.type {short(kind)} is not Exact|PathPrefix|RegularExpression")


_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def _http_match(raw: Any, where: str) -> RouteMatch:
    raw = as_map(raw, where)
    check_keys(raw, {"path", "headers", "queryParams", "method"}, where)
    method = raw.get("method")
    if method is not None and method not in _METHODS:
        raise FieldError(f"{where}.method {short(method)} is not an HTTP method")
    return RouteMatch(
        path=_path_match(raw.get("path"), f"{where}.path"),
        headers=_value_matches(raw.get("headers"), f"{where}.headers", header=True),
        query=_value_matches(raw.get("queryParams"), f"{where}.queryParams", header=False),
        method=method,
    )


def _grpc_match(raw: Any, where: str) -> RouteMatch:
    raw = as_map(raw, where)
    check_keys(raw, {"method", "headers"}, where)
    headers = _value_matches(raw.get("headers"), f"{where}.headers", header=True)
    if raw.get("method") is None:
        return RouteMatch(path=PathMatch("PathPrefix", "/"), headers=headers)
    w = f"{where}.method"
    m = as_map(raw["method"], w)
    check_keys(m, {"type", "service", "method"}, w)
    kind = m.get("type", "Exact")
    svc = as_str(m["service"], f"{w}.service") if m.get("service") is not None else None
    meth = as_str(m["method"], f"{w}.method") if m.get("method") is not None else None
    if svc is None and meth is None:
        raise FieldError(f"{w}: set service, method or both")
    if kind == "Exact":
        for part, v in (("service", svc), ("method", meth)):
            if v is not None and (not v or "/" in v):
                raise FieldError(f"{w}.{part} {short(v)} must be non-empty without '/'")
        if svc and meth:
            path = PathMatch("Exact", f"/{svc}/{meth}")
        elif svc:
            path = PathMatch("PathPrefix", f"/{svc}/")
        else:
            p = "/[^/]+/" + re.escape(meth or "")
            path = PathMatch("RegularExpression", p, _regex(p, w))
    elif kind == "RegularExpression":
        p = f"/({svc or '[^/]+'})/({meth or '[^/]+'})"
        path = PathMatch("RegularExpression", p, _regex(p, w))
    else:
        raise FieldError(f"{w}.type {short(kind)} is not Exact|RegularExpression")
    return RouteMatch(path=path, headers=headers)


def _header_modifier(raw: Any, where: str) -> HeaderModifier:
    raw = as_map(raw, where)
    check_keys(raw, {"set", "add", "remove"}, where)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, h in enumerate(as_list(raw.get(key), f"{where}.{key}")):
            w = f"{where}.{key}[{i}]"
            h = as_map(h, w)
            check_keys(h, {"name", "value"}, w)
            name = as_str(h.get("name"), f"{w}.name")
            if not _HEADER_NAME.match(name):
                raise FieldError(f"{w}.name {short(name)} is not an HTTP header name")
            value = as_str(h.get("value"), f"{w}.value")
            if any(c in value for c in "\r\n\0"):
                raise FieldError(f"{w}.value must not contain CR, LF or NUL")
            out.append((name.lower(), value))
        return tuple(out)

    remove = []
    for i, n in enumerate(as_list(raw.get("remove"), f"{where}.remove")):
        n = as_str(n, f"{where}.remove[{i}]")
        if not _HEADER_NAME.match(n):
            raise FieldError(f"{where}.remove[{i}] {short(n)} is not an HTTP header name")
        remove.append(n.lower())
    return HeaderModifier(set=pairs("set"), add=pairs("add"), remove=tuple(remove))


def _path_modifier(raw: Any, where: str) -> PathModifier:
    raw = as_map(raw, where)
    check_keys(raw, {"type", "replaceFullPath", "replacePrefixMatch"}, where)
    kind = raw.get("type")
    if kind == "ReplaceFullPath":
        value = as_str(raw.get("replaceFullPath"), f"{where}.replaceFullPath")
    elif kind == "ReplacePrefixMatch":
        value = as_str(raw.get("replacePrefixMatch"), f"{where}.replacePrefixMatch")
    else:
        raise FieldError(f"{where}.type {short(kind)} is not ReplaceFullPath|ReplacePrefixMatch")
    if not value.startswith("/"):
        raise FieldError(f"{where}: the new path {short(value)} must start with /")
    return PathModifier(kind, value)


def _hostname(raw: Any, where: str) -> str:
    h = as_str(raw, where)
    if not h or any(c in h for c in "/ \r\n\0?#@"):
        raise FieldError(f"{where} {short(h)} is not a hostname")
    return h


def _redirect(raw: Any, where: str) -> Redirect:
    raw = as_map(raw, where)
    check_keys(raw, {"scheme", "hostname", "path", "port", "statusCode"}, where)
    scheme = raw.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise FieldError(f"{where}.scheme {short(scheme)} is not http|https")
    port = raw.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= 65535):
        raise FieldError(f"{where}.port {short(port)} is not a port number")
    status = raw.get("statusCode", 302)
    if status not in (301, 302, 303, 307, 308):
        raise FieldError(f"{where}.statusCode {short(status)} is not 301|302|303|307|308")
    return Redirect(
        scheme=scheme,
        hostname=_hostname(raw["hostname"], f"{where}.hostname") if raw.get("hostname") else None,
        path=_path_modifier(raw["path"], f"{where}.path") if raw.get("path") else None,
        port=port,
        status=status,
    )


def _rewrite(raw: Any, where: str) -> UrlRewrite:
    raw = as_map(raw, where)
    check_keys(raw, {"hostname", "path"}, where)
    return UrlRewrite(
        hostname=_hostname(raw["hostname"], f"{where}.hostname") if raw.get("hostname") else None,
        path=_path_modifier(raw["path"], f"{where}.path") if raw.get("path") else None,
    )


_HTTP_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
}
_GRPC_FILTERS = {k: v for k, v in _HTTP_FILTERS.items() if "Header" in k}


def _filters(raw: Any, where: str, allowed: dict[str, str]) -> dict[str, Any]:
    """The rule's filters by type (each type at most once)."""
    out: dict[str, Any] = {}
    for i, f in enumerate(as_list(raw, where)):
        w = f"{where}[{i}]"
        f = as_map(f, w)
        kind = f.get("type")
        if kind not in allowed:
            raise FieldError(
                f"{w}.type {short(kind)} is not supported by this waypoint (supported: "
                f"{', '.join(sorted(allowed))})"
            )
        check_keys(f, {"type", allowed[kind]}, w)
        if kind in out:
            raise FieldError(f"{w}: filter {kind} appears twice in one rule")
        field_name = allowed[kind]
        w2 = f"{w}.{field_name}"
        if kind.endswith("HeaderModifier"):
            out[kind] = _header_modifier(f.get(field_name), w2)
        elif kind == "RequestRedirect":
            out[kind] = _redirect(f.get(field_name), w2)
        else:
            out[kind] = _rewrite(f.get(field_name), w2)
    if "RequestRedirect" in out and "URLRewrite" in out:
        raise FieldError(f"{where}: RequestRedirect and URLRewrite cannot be used together")
    return out


def _backend_refs(raw: Any, where: str, ns: str, resolve: BackendResolver) -> tuple[Backend, ...]:
    out = []
    for i, b in enumerate(as_list(raw, where)):
        w = f"{where}[{i}]"
        b = as_map(b, w)
        check_keys(b, {"group", "kind", "name", "namespace", "port", "weight"}, w)
        group = b.get("group", "")
        kind = b.get("kind", "Service")
        name = as_str(b.get("name"), f"{w}.name")
        bns = as_str(b.get("namespace", ns), f"{w}.namespace")
        port = b.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise FieldError(f"{w}.port {short(port)} is not a port number")
        weight = b.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000000:
            raise FieldError(f"{w}.weight {short(weight)} is not an integer 0..1000000")
        out.append(resolve(ns, bns, name, port, weight, str(group), str(kind)))
    return tuple(out)


def _parent_refs(raw: Any, ns: str) -> tuple[ParentRef, ...]:
    out = []
    for i, p in enumerate(as_list(raw, "spec.parentRefs")):
        w = f"spec.parentRefs[{i}]"
        p = as_map(p, w)
        check_keys(p, {"group", "kind", "namespace", "name", "port", "sectionName"}, w)
        port = p.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 1 <= port <= 65535):
            raise FieldError(f"{w}.port {short(port)} is not a port number")
        section = p.get("sectionName")
        out.append(ParentRef(
            kind=str(p.get("kind", "Gateway")),
            group=str(p.get("group", GATEWAY_GROUP)),
            namespace=as_str(p.get("namespace", ns), f"{w}.namespace"),
            name=as_str(p.get("name"), f"{w}.name"),
            port=port,
            section=as_str(section, f"{w}.sectionName") if section is not None else None,
        ))
    return tuple(out)


def parse_route(obj: dict[str, Any], resolve: BackendResolver) -> ParsedRoute:
    """An ``HTTPRoute`` or ``GRPCRoute`` object -> ``ParsedRoute`` (``FieldError`` if bad)."""
    check_keys(obj, _ROUTE_TOP)
    kind = obj.get("kind")
    if kind not in ("HTTPRoute", "GRPCRoute"):
        raise FieldError(f"kind {short(kind)} is not HTTPRoute|GRPCRoute")
    meta = as_map(obj.get("metadata"), "metadata")
    ns = str(meta.get("namespace") or "default")
    name = as_str(meta.get("name"), "metadata.name")
    spec = as_map(obj.get("spec"), "spec")
    check_keys(spec, {"parentRefs", "hostnames", "rules"}, "spec")
    grpc = kind == "GRPCRoute"
    rule_keys = ({"name", "matches", "filters", "backendRefs"} if grpc
                 else {"name", "matches", "filters", "backendRefs", "timeouts", "retry"})
    rules = []
    names: set[str] = set()
    for i, r in enumerate(as_list(spec.get("rules"), "spec.rules")):
        w = f"spec.rules[{i}]"
        r = as_map(r, w)
        check_keys(r, rule_keys, w)
        section = as_str(r["name"], f"{w}.name") if r.get("name") is not None else None
        if section is not None:
            if section in names:
                raise FieldError(f"{w}.name {short(section)} is used by two rules")
            names.add(section)
        parse_m = _grpc_match if grpc else _http_match
        raw_matches = as_list(r.get("matches"), f"{w}.matches") or [{}]
        matches = tuple(parse_m(m, f"{w}.matches[{j}]") for j, m in enumerate(raw_matches))
        filters = _filters(r.get("filters"), f"{w}.filters", _GRPC_FILTERS if grpc
                           else _HTTP_FILTERS)
        for f in ("RequestRedirect", "URLRewrite"):
            pm = getattr(filters.get(f), "path", None)
            if pm is not None and pm.kind == "ReplacePrefixMatch" and any(
                m.path.kind != "PathPrefix" for m in matches
            ):
                raise FieldError(f"{w}: {f} with ReplacePrefixMatch needs every match to be a "
                                 "PathPrefix path match")
        timeout = backend_timeout = None
        if r.get("timeouts") is not None:
            t = as_map(r["timeouts"], f"{w}.timeouts")
            check_keys(t, {"request", "backendRequest"}, f"{w}.timeouts")
            if "request" in t:
                timeout = parse_duration(t["request"], f"{w}.timeouts.request") or None
            if "backendRequest" in t:
                backend_timeout = (
                    parse_duration(t["backendRequest"], f"{w}.timeouts.backendRequest") or None
                )
            if timeout and backend_timeout and backend_timeout > timeout:
                raise FieldError(f"{w}.timeouts.backendRequest is longer than request")
        retry = parse_retry(r["retry"], f"{w}.retry") if r.get("retry") is not None else None
        backends = _backend_refs(r.get("backendRefs"), f"{w}.backendRefs", ns, resolve)
        if "RequestRedirect" in filters and backends:
            raise FieldError(f"{w}: a RequestRedirect rule cannot also have backendRefs")
        rules.append((RouteRule(
            name=f"{kind}/{ns}/{name}/{section if section is not None else i}",
            section=section,
            backends=backends,
            request_headers=filters.get("RequestHeaderModifier"),
            response_headers=filters.get("ResponseHeaderModifier"),
            rewrite=filters.get("URLRewrite"),
            redirect=filters.get("RequestRedirect"),
            timeout_s=timeout,
            backend_timeout_s=backend_timeout,
            retry=retry,
        ), matches))
    return ParsedRoute(
        kind=kind,
        namespace=ns,
        name=name,
        created=str(meta.get("creationTimestamp") or ""),
        parents=_parent_refs(spec.get("parentRefs"), ns),
        rules=tuple(rules),
    )


def entries_for(route: ParsedRoute, rules: Iterable[RouteRule], port: int | None,
                consumer_ns: str | None) -> list[Entry]:
    """Entries of ``route`` (with its rules possibly replaced, same order) for one parent."""
    out = []
    for i, (rule, (_, matches)) in enumerate(zip(rules, route.rules, strict=True)):
        for j, m in enumerate(matches):
            rank = (*m.rank(), route.created, f"{route.namespace}/{route.name}", i, j)
            out.append(Entry(rank=rank, match=m, rule=rule, port=port, consumer_ns=consumer_ns))
    return out
