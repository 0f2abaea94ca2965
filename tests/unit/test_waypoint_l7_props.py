"""Property tests: route/authorize/admit never raise on any request; build_config on any junk."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waypoint_l7_helpers import authz, backend, base_objects, httproute, traffic_policy

from waypoint.l7 import (
    DirectResponse,
    NoRoute,
    RateLimiters,
    Request,
    RouteAction,
    admit,
    authorize,
    build_config,
    normalize_path,
    pick_backend,
    route,
)
from waypoint.l7request import Destination, Source


def _objects() -> dict[str, dict[str, Any]]:
    objs = base_objects()
    objs.update([
        httproute("app", "r", [
            {"matches": [{"path": {"type": "RegularExpression", "value": "/r/[a-z]+"},
                          "headers": [{"type": "RegularExpression", "name": "x-a",
                                       "value": ".*"}],
                          "queryParams": [{"name": "q", "value": "1"}], "method": "GET"}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "h"}}],
             "backendRefs": [backend("web", 80, 3), backend("web-v2", 80, 1)]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/p"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
                 "type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
             "backendRefs": [backend()]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/redir"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {
                 "type": "ReplacePrefixMatch", "replacePrefixMatch": "/x"}}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/"}}], "backendRefs": [backend()]},
        ]),
        httproute("app", "g", [{"matches": [{"method": {"service": "s", "method": "m"}}],
                                "backendRefs": [backend()]}], kind="GRPCRoute"),
        authz("app", "a", {"targetRefs": [{"kind": "Service", "name": "web"}], "rules": [
            {"from": [{"source": {"principals": ["*"], "ipBlocks": ["10.0.0.0/8"],
                                  "notNamespaces": ["x*"]}}],
             "to": [{"operation": {"paths": ["/r*"], "hosts": ["*.local"], "ports": ["80"]}}],
             "when": [{"key": "request.headers[x-a]", "values": ["*"]},
                      {"key": "source.ip", "notValues": ["10.9.0.0/16"]},
                      {"key": "destination.port", "values": ["80"]}]}]}),
        authz("app", "d", {"targetRefs": [{"kind": "Gateway", "name": "wp",
                                           "group": "gateway.networking.k8s.io"}],
                           "action": "DENY", "rules": [{"to": [{"operation": {
                               "notMethods": ["GET"]}}]}]}),
        traffic_policy("app", "t", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                    "rateLimit": {"requestsPerUnit": 1},
                                    "fault": {"abort": {"httpStatus": 503, "percentage": 50}}}),
    ])
    return objs


CFG, PROBLEMS = build_config(_objects(), "app", "wp")

text = st.text(max_size=40)
headers = st.lists(st.tuples(st.sampled_from(["x-a", "host", "cookie", "x-b"]) | text, text),
                   max_size=5).map(tuple)
requests = st.builds(
    Request,
    method=st.sampled_from(["GET", "POST", "PUT"]) | text,
    scheme=st.sampled_from(["http", "https"]) | text,
    authority=st.sampled_from(["web.app.svc.cluster.local:80", "[::1]:80", ""]) | text,
    path=st.sampled_from(["/", "/r/abc", "/p/x", "/redir/y", "/s/m"]) | text,
    query=st.sampled_from(["", "q=1", "q=%zz&&=", "a" * 30]) | text,
    headers=headers,
    protocol=st.sampled_from(["HTTP/1.1", "HTTP/2"]),
    grpc=st.booleans(),
    src=st.builds(Source, ip=st.sampled_from(["10.0.0.1", "::ffff:10.1.2.3", "fd00::1"]) | text,
                  principal=st.none() | text | st.just("cluster.local/ns/a/sa/b"),
                  namespace=st.none() | text),
    dst=st.builds(Destination,
                  service_host=st.sampled_from(["web.app.svc.cluster.local",
                                                "api.app.svc.cluster.local", ""]) | text,
                  service_namespace=st.sampled_from(["app", ""]),
                  port=st.integers(min_value=0, max_value=70000),
                  address=st.sampled_from(["", "10.96.0.1"]) | text),
)


def test_property_config_is_clean() -> None:
    assert PROBLEMS == []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.floats(min_value=0, max_value=1, exclude_max=True),
       st.floats(allow_nan=True))
def test_route_authorize_admit_never_raise(req: Request, r: float, t: float) -> None:
    a = route(CFG, req)
    assert isinstance(a, RouteAction | DirectResponse | NoRoute)
    if isinstance(a, DirectResponse):
        assert "error" not in a.reason  # a real decision, not the defensive fallback
    if isinstance(a, RouteAction):
        assert pick_backend(a.backends, r) in a.backends
        adm = admit(a, RateLimiters(), t, r, r)
        assert adm.delay_s >= 0
    d = authorize(CFG, req)
    assert "authorization error" not in d.reason
    assert normalize_path(req.path).startswith("/")


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["kind", "name", "type", "value", "path", "rules", "matches", "from",
                         "to", "when", "key", "values", "source", "operation", "paths",
                         "targetRefs", "parentRefs", "backendRefs", "port", "weight",
                         "filters", "headers", "group", "fault", "rateLimit", "abort",
                         "delay", "httpStatus", "percentage", "fixedDelay", "namespace"])
        | st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["HTTPRoute", "GRPCRoute", "AuthorizationPolicy", "HTTPTrafficPolicy"]),
       junk, junk)
def test_build_config_never_raises_on_junk(kind: str, spec: Any, parents: Any) -> None:
    objs = _objects()
    obj: dict[str, Any] = {"apiVersion": "ambient.io/v1alpha1", "kind": kind,
                           "metadata": {"name": "j", "namespace": "app"}, "spec": spec}
    if isinstance(spec, dict):
        spec.setdefault("parentRefs", [{"kind": "Service", "group": "", "name": "web"}]
                        if parents is None else parents)
        spec.setdefault("targetRefs", [{"kind": "Service", "name": "web"}])
    objs[f"{kind}/app/j"] = obj
    cfg, problems = build_config(objs, "app", "wp")
    assert not any("internal error" in p for p in problems), problems
    route(cfg, Request("GET", "http", "web", "/r/a", "", (), "HTTP/1.1", False,
                       Source("10.0.0.1"), Destination("web.app.svc.cluster.local", "app", 80)))
