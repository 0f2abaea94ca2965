"""Parsing of Gateway API ``HTTPRoute`` / ``GRPCRoute`` objects into routing rules.

Role: the strict reader behind ``routes.py``: one route object -> ``ParsedRoute`` (its parent
refs and its rules with compiled matches, filters, timeouts, retries and resolved backends),
and ``entries_for`` to spread a route's matches into a ``RouteTable``'s per-service entries.
``build_config`` (``l7config.py``) decides which parents are ours and resolves backendRefs
through the ``BackendResolver`` it passes in.

Invariants: pure; raises only ``FieldError`` with a message naming the field (anything a
route may set that this waypoint does not implement is an error, never silently ignored);
regular expressions are compiled here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ambient.config._common import FieldError, as_list, as_map, as_str, check_keys, short
from waypoint.policy import parse_duration, parse_retry
from waypoint.routes import (
    Backend,
    Entry,
    HeaderModifier,
    PathMatch,
    PathModifier,
    Redirect,
    RouteMatch,
    RouteRule,
    UrlRewrite,
    ValueMatch,
)

__all__ = ["BackendResolver", "ParentRef", "ParsedRoute", "entries_for", "parse_route"]

GATEWAY_GROUP = "gateway.networking.k8s.io"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")



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
