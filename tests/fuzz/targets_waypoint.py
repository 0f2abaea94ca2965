"""Fuzz harness for the waypoint's L7 layer: ``build_config`` over fuzzed HTTPRoute /
AuthorizationPolicy objects, then ``route`` / ``authorize`` / ``admit`` / ``pick_backend`` /
``normalize_path`` over fuzzed requests.  ``build_config`` promises to report bad objects as
problems (an "internal error" problem is a bug it swallowed), the decisions never to raise.

``waypoint_h1`` drives the downstream HTTP/1.1 server (``serve_h1``) over an in-memory
stream: whatever bytes arrive, it returns (no exception, no hang) and writes only HTTP/1.1
responses.  Not covered: the waypoint's HTTP/2 codec (``waypoint/h2conn.py``), asyncio code
over h2 whose frame parsing is the same h2 the HBONE targets exercise.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from fuzz.bytesource import ByteSource, json_like
from waypoint.h1 import Limits, serve_h1
from waypoint.l7 import (
    Destination,
    RateLimiters,
    Request,
    RouteAction,
    Source,
    admit,
    authorize,
    build_config,
    normalize_path,
    pick_backend,
    route,
)
from waypoint.message import HttpRequest, HttpResponse

BASE: dict[str, dict[str, Any]] = {
    "Namespace//app": {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "app", "labels": {"istio.io/use-waypoint": "wp"}}},
    "Gateway/app/wp": {"kind": "Gateway", "metadata": {"name": "wp", "namespace": "app"},
                       "spec": {"gatewayClassName": "istio-waypoint"}},
    "Service/app/web": {"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "web", "namespace": "app"},
                        "spec": {"ports": [{"name": "http", "port": 80}]}},
    "HTTPRoute/app/r": {"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "app"},
                        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                                 "rules": [{"matches": [{"path": {"type": "PathPrefix",
                                                                  "value": "/api"}}],
                                            "backendRefs": [{"name": "web", "port": 80,
                                                             "weight": 3}]}]}},
    "AuthorizationPolicy/app/p": {"kind": "AuthorizationPolicy",
                                  "metadata": {"name": "p", "namespace": "app"},
                                  "spec": {"targetRefs": [{"kind": "Service", "name": "web"}],
                                           "action": "DENY",
                                           "rules": [{"to": [{"operation": {
                                               "methods": ["DELETE"], "paths": ["/admin*"]}}]}]}},
}
KEYS = ("parentRefs", "rules", "matches", "path", "type", "value", "headers", "queryParams",
        "method", "backendRefs", "name", "port", "weight", "filters", "requestHeaderModifier",
        "set", "add", "remove", "urlRewrite", "requestRedirect", "hostname", "statusCode",
        "timeouts", "request", "backendRequest", "retry", "attempts", "codes", "targetRefs",
        "action", "from", "to", "when", "source", "operation", "principals", "namespaces",
        "ipBlocks", "remoteIpBlocks", "methods", "paths", "hosts", "ports", "key", "values",
        "notValues", "kind", "group", "namespace", "sectionName", "replacePrefixMatch",
        "ReplaceFullPath", "Exact", "PathPrefix", "RegularExpression", "fault", "delay",
        "abort", "percentage", "localRateLimit", "tokens", "interval")
METHODS = ("GET", "POST", "DELETE", "", "get", "CONNECT", "\u00e9")
PATHS = ("/", "/api", "/api/../admin", "/admin/x", "", "//a/./b", "/%2e%2e/", "a", "/\x00")


def _request(src: ByteSource) -> Request:
    return Request(
        method=src.choice(METHODS), scheme=src.choice(("http", "https", "")),
        authority=src.choice(("web.app.svc.cluster.local:80", "[::1]:80", "", "a:b:c",
                              src.text(20))),
        path=src.choice(PATHS) if src.flag() else src.text(30), query=src.text(20),
        headers=tuple((src.choice(("x", "cookie", "user-agent", "", ":path")), src.text(10))
                      for _ in range(src.int(0, 3))),
        protocol=src.choice(("HTTP/1.1", "HTTP/2")), grpc=src.flag(),
        src=Source(ip=src.choice(("10.0.0.5", "fd00::5", "", "x")),
                   principal=src.choice((None, "cluster.local/ns/c/sa/s", "spiffe://x", "")),
                   namespace=src.choice((None, "c", ""))),
        dst=Destination(service_host=src.choice(("web.app.svc.cluster.local", "", "x")),
                        service_namespace=src.choice(("app", "")),
                        port=src.choice((80, 0, 65535, -1)), address=src.choice(("", "10.96.0.1"))),
    )


def waypoint_l7(data: bytes) -> None:
    src = ByteSource(data)
    objs = copy.deepcopy(BASE)
    for _ in range(src.int(0, 3)):
        key = src.choice(sorted(objs))
        obj = objs[key]
        spec = obj.setdefault("spec", {})
        if isinstance(spec, dict):
            spec[src.choice(KEYS)] = json_like(src, KEYS)
        if src.u8() % 8 == 0:
            obj["spec"] = json_like(src, KEYS)
    cfg, problems = build_config(objs, "app", "wp")
    assert not any("internal error" in p for p in problems), problems
    limiters = RateLimiters()
    for i in range(src.int(1, 3)):
        req = _request(src)
        authorize(cfg, req)
        act = route(cfg, req)
        normalize_path(req.path)
        if isinstance(act, RouteAction):
            admit(act, limiters, float(i), src.u8() / 256, src.u8() / 256)
            if any(b.weight > 0 for b in act.backends):
                pick_backend(act.backends, src.u8() / 256)


def waypoint_seeds() -> list[bytes]:
    return [b"\x00\x01" + b"\x00" * 40, b"\x01\x03\x05\x07" + b"\x01" * 60]


class _Stream:
    """An in-memory tunnel: yields the input in chunks, then EOF; records what is written."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.out = bytearray()

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        self.out += data

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        self.chunks.clear()


async def _echo(req: HttpRequest) -> HttpResponse:
    body = await req.body.read_all(1 << 20)
    return HttpResponse.local(200, f"{req.method} {req.target} {len(body)}")


def waypoint_h1(data: bytes) -> None:
    """``serve_h1`` over fuzzed request bytes (split at fuzzed points)."""
    src = ByteSource(data)
    step = src.choice((1, 5, 64, 4096, 1 << 20))
    raw = src.rest()
    stream = _Stream([raw[i : i + step] for i in range(0, len(raw), step)])
    limits = Limits(max_head=4096, header_timeout=5.0, idle_timeout=5.0)
    asyncio.run(asyncio.wait_for(serve_h1(stream, _echo, limits=limits), 30))
    assert not stream.out or stream.out.startswith(b"HTTP/1.1 "), bytes(stream.out[:40])


def waypoint_h1_seeds() -> list[bytes]:
    return [b"\x03GET /a?b=c HTTP/1.1\r\nHost: web\r\n\r\n",
            b"\x02POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /2 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n",
            b"\x04PUT / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"]
