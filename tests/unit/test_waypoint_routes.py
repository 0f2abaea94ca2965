"""Routing tables for the waypoint: matches, precedence, splits, filters, timeouts, retries."""

from __future__ import annotations

import random
from typing import Any

import pytest
from waypoint_l7_helpers import (
    backend,
    cfg_of,
    httproute,
    mkreq,
    parent,
    service,
)

from waypoint.l7 import (
    Backend,
    DirectResponse,
    HeaderModifier,
    NoRoute,
    RouteAction,
    pick_backend,
    route,
)
from waypoint.policy import RetrySpec
from waypoint.routes import PathModifier


def grant(ns: str, from_kind: str, from_ns: str) -> tuple[str, dict[str, Any]]:
    return f"ReferenceGrant/{ns}/allow", {
        "kind": "ReferenceGrant", "metadata": {"name": "allow", "namespace": ns},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": from_kind,
                           "namespace": from_ns}],
                 "to": [{"group": "", "kind": "Service"}]}}


def rule(port: int, *matches: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A rule whose single backend is ``web:<port>`` - the port tells rules apart."""
    r: dict[str, Any] = {"matches": list(matches), "backendRefs": [backend("web", port)]}
    r.update(extra)
    return r


def prefix(v: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": v}, **kw}


PRECEDENCE_RULES = [
    rule(3, prefix("/foo")),
    rule(1, {"path": {"type": "Exact", "value": "/foo"}}),
    rule(6, {"path": {"type": "RegularExpression", "value": "/r/[0-9]+"}}),
    rule(5, prefix("/foo", headers=[{"name": "X-V", "value": "2"}])),
    rule(4, prefix("/foo", method="POST")),
    rule(2, prefix("/foo/bar/")),
    rule(8, prefix("/q")),
    rule(7, prefix("/q", queryParams=[{"name": "a", "value": "1"}])),
    rule(10, prefix("/h", headers=[{"name": "a", "value": "1"}])),
    rule(9, prefix("/h", headers=[{"name": "a", "value": "1"}, {"name": "b", "value": "1"}])),
    rule(11, prefix("/hr", headers=[{"type": "RegularExpression", "name": "x-id",
                                     "value": "[0-9]+"}])),
    rule(12, {"path": {"type": "RegularExpression", "value": "/foo/.*/baz"}}),
]


@pytest.fixture(scope="module")
def precedence_cfg():  # type: ignore[no-untyped-def]
    cfg, problems = cfg_of(httproute("app", "many", PRECEDENCE_RULES))
    assert problems == []
    return cfg


@pytest.mark.parametrize(
    "method,path,query,headers,want",
    [
        ("GET", "/foo", "", (), 1),  # exact beats every prefix
        ("GET", "/foo/", "", (), 3),  # exact does not match a trailing slash
        ("GET", "/foo/bar", "", (), 2),  # "/foo/bar/" prefix ignores its trailing slash
        ("GET", "/foo/bar/x", "", (), 2),  # longest prefix wins
        ("POST", "/foo/bar/x", "", (), 2),  # ... even over a method match
        ("GET", "/foo/x", "", (), 3),
        ("POST", "/foo/x", "", (), 4),  # method beats no method at equal prefix
        ("GET", "/foo/x", "", (("x-v", "2"),), 5),  # header match (name case-insensitive)
        ("POST", "/foo/x", "", (("x-v", "2"),), 4),  # method ranks above headers
        ("GET", "/foo/a/baz", "", (), 3),  # prefix beats regex
        ("GET", "/r/12", "", (), 6),
        ("GET", "/q", "a=1", (), 7),  # query match beats none
        ("GET", "/q", "b=1&a=1", (), 7),
        ("GET", "/q", "a=2", (), 8),
        ("GET", "/q", "a=1%20", (), 8),  # decoded value "1 " is not "1"
        ("GET", "/h", "", (("a", "1"), ("b", "1")), 9),  # most headers wins
        ("GET", "/h", "", (("a", "1"),), 10),
        ("GET", "/hr", "", (("x-id", "42"),), 11),
    ],
)
def test_match_precedence(precedence_cfg, method, path, query, headers, want) -> None:  # type: ignore[no-untyped-def]
    a = route(precedence_cfg, mkreq(path, method=method, query=query, headers=headers))
    assert isinstance(a, RouteAction), a
    assert [b.port for b in a.backends] == [want]


@pytest.mark.parametrize(
    "path,headers",
    [("/foobar", ()), ("/r/x", ()), ("/hr", (("x-id", "4a"),)), ("/hr", ()), ("/", ())],
)
def test_no_rule_matches_is_404(precedence_cfg, path, headers) -> None:  # type: ignore[no-untyped-def]
    a = route(precedence_cfg, mkreq(path, headers=headers))
    assert isinstance(a, NoRoute)
    assert a.status == 404 and a.response_flag == "NR"


def test_service_without_routes_gets_default_route_to_itself(precedence_cfg) -> None:  # type: ignore[no-untyped-def]
    a = route(precedence_cfg, mkreq("/anything", svc="api"))
    assert isinstance(a, RouteAction)
    assert a.route_name == "default"
    assert a.backends == (Backend("api.app.svc.cluster.local", "app", 80),)


def test_workload_addressed_default_route_has_empty_host(precedence_cfg) -> None:  # type: ignore[no-untyped-def]
    a = route(precedence_cfg, mkreq("/x", svc=""))
    assert isinstance(a, RouteAction) and a.backends[0].host == ""


def test_ties_between_routes_oldest_then_alphabetical() -> None:
    same = [rule(20, prefix("/"))]
    r_b = httproute("app", "b", [rule(2, prefix("/"))])
    r_a = httproute("app", "a", [rule(1, prefix("/"))])
    cfg, _ = cfg_of(r_b, r_a)
    a = route(cfg, mkreq("/x"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 1  # alphabetical
    old = httproute("app", "z", [rule(3, prefix("/"))], created="2020-01-01T00:00:00Z")
    new = httproute("app", "a", [rule(1, prefix("/"))], created="2024-01-01T00:00:00Z")
    cfg, _ = cfg_of(old, new)
    a = route(cfg, mkreq("/x"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 3  # oldest
    # within one route, the first rule in list order wins
    cfg, _ = cfg_of(httproute("app", "one", [*same, rule(9, prefix("/"))]))
    a = route(cfg, mkreq("/x"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 20


def test_parent_port_and_section_name_limit_the_route_to_one_port() -> None:
    cfg, problems = cfg_of(
        httproute("app", "p", [rule(1, prefix("/"))], [parent("web", 8080)]),
        httproute("app", "s", [rule(2, prefix("/"))], [parent("web-v2", sectionName="http")]),
    )
    assert problems == []
    assert route(cfg, mkreq("/", port=8080)).backends[0].port == 1  # type: ignore[union-attr]
    d = route(cfg, mkreq("/", port=80))
    assert isinstance(d, RouteAction) and d.route_name == "default"
    assert route(cfg, mkreq("/", svc="web-v2")).backends[0].port == 2  # type: ignore[union-attr]
    d = route(cfg, mkreq("/", svc="web-v2", port=81))
    assert isinstance(d, RouteAction) and d.route_name == "default"


def test_consumer_route_applies_only_to_its_namespace_and_replaces_producer_routes() -> None:
    cfg, problems = cfg_of(
        httproute("app", "producer", [rule(1, prefix("/"))]),
        httproute("client", "consumer", [{"matches": [prefix("/only")],
                                          "backendRefs": [backend("web", 2, namespace="app")]}],
                  [parent("web", namespace="app")]),
        grant("app", "HTTPRoute", "client"),
    )
    assert problems == []
    a = route(cfg, mkreq("/only", src_ns="client"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 2
    assert isinstance(route(cfg, mkreq("/other", src_ns="client")), NoRoute)
    a = route(cfg, mkreq("/only", src_ns="elsewhere"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 1


def test_grpc_routes_serve_grpc_requests() -> None:
    grpc_rules = [
        {"matches": [{"method": {"service": "pkg.Echo", "method": "Say"}}],
         "backendRefs": [backend("web", 1)]},
        {"matches": [{"method": {"service": "pkg.Echo"}}], "backendRefs": [backend("web", 2)]},
        {"matches": [{"method": {"method": "Ping"}}], "backendRefs": [backend("web", 3)]},
        {"matches": [{"method": {"type": "RegularExpression", "service": "pkg\\..*",
                                 "method": "Get.*"}}], "backendRefs": [backend("web", 4)]},
    ]
    cfg, problems = cfg_of(
        httproute("app", "g", grpc_rules, kind="GRPCRoute"),
        httproute("app", "h", [rule(9, prefix("/"))]),
    )
    assert problems == []
    cases = {"/pkg.Echo/Say": 1, "/pkg.Echo/Other": 2, "/x.Y/Ping": 3, "/pkg.Store/GetA": 4}
    for path, port in cases.items():
        a = route(cfg, mkreq(path, method="POST", grpc=True))
        assert isinstance(a, RouteAction) and a.backends[0].port == port, path
    assert isinstance(route(cfg, mkreq("/x.Y/Nope", method="POST", grpc=True)), NoRoute)
    a = route(cfg, mkreq("/pkg.Echo/Say", method="POST"))  # not gRPC: HTTPRoutes
    assert isinstance(a, RouteAction) and a.backends[0].port == 9


# -------------------------------------------------------------------------- weights


def test_pick_backend_follows_weights_statistically() -> None:
    bs = (Backend("a", "n", 80, 90), Backend("z", "n", 80, 0), Backend("b", "n", 80, 10))
    rng = random.Random(1234)
    n = 20000
    counts = {"a": 0, "b": 0, "z": 0}
    for _ in range(n):
        counts[pick_backend(bs, rng.random()).host] += 1
    assert counts["z"] == 0
    assert 0.88 < counts["a"] / n < 0.92


@pytest.mark.parametrize(
    "r,want", [(0.0, "a"), (0.2999, "a"), (0.3, "b"), (0.9999999, "b"), (1.0, "a"), (-1, "a")]
)
def test_pick_backend_edges(r: float, want: str) -> None:
    bs = (Backend("z0", "n", 80, 0), Backend("a", "n", 80, 3), Backend("b", "n", 80, 7),
          Backend("z1", "n", 80, 0))
    assert pick_backend(bs, r).host == want


def test_pick_backend_without_positive_weight_raises_and_route_answers_500() -> None:
    with pytest.raises(ValueError):
        pick_backend((Backend("a", "n", 80, 0),), 0.5)
    cfg, _ = cfg_of(httproute("app", "zero", [
        {"backendRefs": [backend("web", 80, 0), backend("web-v2", 80, 0)]},
        {"matches": [prefix("/none")]},
    ]))
    d = route(cfg, mkreq("/x"))
    assert isinstance(d, DirectResponse) and d.status == 500
    # a rule without backendRefs also answers 500 (Gateway API)
    d = route(cfg, mkreq("/none"))
    assert isinstance(d, DirectResponse) and d.status == 500


def test_split_route_carries_both_backends() -> None:
    cfg, problems = cfg_of(httproute("app", "split", [
        {"backendRefs": [backend("web", 80, 90), backend("web-v2", 80, 10)]}
    ]))
    assert problems == []
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction)
    assert [(b.host, b.weight) for b in a.backends] == [
        ("web.app.svc.cluster.local", 90), ("web-v2.app.svc.cluster.local", 10)]


@pytest.mark.parametrize(
    "ref,extra,invalid",
    [
        (backend("web", None), {}, "has no port"),
        (backend("nope"), {}, "does not exist"),
        (backend("web", kind="ServiceImport", group="multicluster.x-k8s.io"), {}, "not supported"),
        (backend("other", namespace="other"), {}, "ReferenceGrant"),
        (backend("other", namespace="other"), {"grant": True}, None),
    ],
)
def test_invalid_backend_refs_are_marked_and_reported(ref, extra, invalid) -> None:  # type: ignore[no-untyped-def]
    objs = [httproute("app", "r", [{"backendRefs": [ref]}]), service("other", "other")]
    if extra.get("grant"):
        objs.append(grant("other", "HTTPRoute", "app"))
    cfg, problems = cfg_of(*objs)
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction)
    if invalid is None:
        assert a.backends[0].invalid is None and problems == []
    else:
        assert invalid in (a.backends[0].invalid or "")
        assert any("HTTPRoute app/r" in p and invalid in p for p in problems)


# ---------------------------------------------------------------- filters, rewrites


def test_header_modifier_apply_order() -> None:
    hm = HeaderModifier(set=(("x-a", "new"),), add=(("x-b", "2"),), remove=("x-gone",))
    got = hm.apply([("X-A", "old"), ("x-b", "1"), ("x-gone", "1"), ("keep", "k")])
    assert got == [("x-b", "1"), ("keep", "k"), ("x-a", "new"), ("x-b", "2")]


def test_header_modifiers_come_from_filters() -> None:
    cfg, problems = cfg_of(httproute("app", "h", [{
        "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Set", "value": "1"}], "add": [{"name": "x-add", "value": "2"}],
                "remove": ["X-Remove"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "add": [{"name": "x-resp", "value": "r"}]}},
        ],
        "backendRefs": [backend()],
    }]))
    assert problems == []
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction)
    assert a.request_headers == HeaderModifier(set=(("x-set", "1"),), add=(("x-add", "2"),),
                                               remove=("x-remove",))
    assert a.response_headers == HeaderModifier(add=(("x-resp", "r"),))


@pytest.mark.parametrize(
    "kind,value,matched,path,want",
    [
        ("ReplacePrefixMatch", "/bar", "/foo", "/foo/baz", "/bar/baz"),
        ("ReplacePrefixMatch", "/bar", "/foo", "/foo", "/bar"),
        ("ReplacePrefixMatch", "/bar", "/foo/", "/foo/", "/bar/"),
        ("ReplacePrefixMatch", "/", "/prefix", "/prefix/one", "/one"),
        ("ReplacePrefixMatch", "/", "/prefix", "/prefix", "/"),
        ("ReplacePrefixMatch", "/xyz/", "/foo", "/foo/bar", "/xyz/bar"),
        ("ReplacePrefixMatch", "/a", "/", "/x/y", "/a/x/y"),
        ("ReplaceFullPath", "/new", "/foo", "/foo/bar", "/new"),
    ],
)
def test_path_modifier(kind: str, value: str, matched: str, path: str, want: str) -> None:
    assert PathModifier(kind, value).apply(path, matched) == want


def test_url_rewrite_in_route_action() -> None:
    cfg, problems = cfg_of(httproute("app", "rw", [{
        "matches": [prefix("/v1")],
        "filters": [{"type": "URLRewrite", "urlRewrite": {
            "hostname": "internal.example", "path": {"type": "ReplacePrefixMatch",
                                                     "replacePrefixMatch": "/api/v2"}}}],
        "backendRefs": [backend()],
    }]))
    assert problems == []
    a = route(cfg, mkreq("/v1/users", query="a=1"))
    assert isinstance(a, RouteAction)
    assert (a.rewrite_authority, a.rewrite_path) == ("internal.example", "/api/v2/users")
    b = route(cfg, mkreq("/v1"))
    assert isinstance(b, RouteAction) and b.rewrite_path == "/api/v2"


@pytest.mark.parametrize(
    "redirect,req_kw,status,location",
    [
        ({}, {}, 302, "http://web.app.svc.cluster.local/old/x?q=1"),
        ({"statusCode": 301, "scheme": "https"}, {}, 301,
         "https://web.app.svc.cluster.local/old/x?q=1"),
        ({"hostname": "new.example", "port": 8443, "scheme": "https"}, {}, 302,
         "https://new.example:8443/old/x?q=1"),
        ({"hostname": "new.example"}, {"port": 8080}, 302, "http://new.example:8080/old/x?q=1"),
        ({"scheme": "http"}, {"port": 8080}, 302, "http://web.app.svc.cluster.local/old/x?q=1"),
        ({"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}, {}, 302,
         "http://web.app.svc.cluster.local/new/x?q=1"),
        ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/"}}, {}, 302,
         "http://web.app.svc.cluster.local/?q=1"),
    ],
)
def test_redirects(redirect, req_kw, status, location) -> None:  # type: ignore[no-untyped-def]
    cfg, problems = cfg_of(httproute("app", "redir", [{
        "matches": [prefix("/old")],
        "filters": [{"type": "RequestRedirect", "requestRedirect": redirect}],
    }], [parent("web")]))
    assert problems == []
    d = route(cfg, mkreq("/old/x", query="q=1", **req_kw))
    assert isinstance(d, DirectResponse)
    assert d.status == status and dict(d.headers)["location"] == location


# ---------------------------------------------------------------- timeouts, retries


@pytest.mark.parametrize(
    "timeouts,want",
    [
        ({"request": "10s"}, (10.0, None)),
        ({"request": "1m30s", "backendRequest": "500ms"}, (90.0, 0.5)),
        ({"request": "1h"}, (3600.0, None)),
        ({"request": "0s"}, (None, None)),  # zero disables the timeout
        ({"backendRequest": "2s"}, (None, 2.0)),
    ],
)
def test_timeouts(timeouts: dict[str, str], want: tuple[float | None, float | None]) -> None:
    cfg, problems = cfg_of(httproute("app", "t", [{"timeouts": timeouts,
                                                   "backendRefs": [backend()]}]))
    assert problems == []
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction) and (a.timeout_s, a.backend_timeout_s) == want


@pytest.mark.parametrize(
    "retry,want",
    [
        (None, None),
        ({}, RetrySpec(attempts=2, codes=(503,), backoff_s=0.025)),
        ({"attempts": 3, "codes": [502, 503], "backoff": "100ms"},
         RetrySpec(attempts=3, codes=(502, 503), backoff_s=0.1)),
        ({"attempts": 0}, RetrySpec(attempts=0, codes=(503,), backoff_s=0.025)),
    ],
)
def test_retries(retry: dict[str, Any] | None, want: RetrySpec | None) -> None:
    r: dict[str, Any] = {"backendRefs": [backend()]}
    if retry is not None:
        r["retry"] = retry
    cfg, problems = cfg_of(httproute("app", "r", [r]))
    assert problems == []
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction) and a.retry == want
    if want is not None:
        assert a.retry is not None and a.retry.max_backoff_s == pytest.approx(10 * want.backoff_s)


@pytest.mark.parametrize(
    "bad_rule,fragment",
    [
        ({"timeouts": {"request": "10"}}, "is not a duration"),
        ({"timeouts": {"request": "1s", "backendRequest": "2s"}}, "longer than request"),
        ({"timeouts": {"idle": "1s"}}, "unknown field"),
        ({"retry": {"attempts": -1}}, "attempts"),
        ({"retry": {"codes": [200]}}, "codes[0]"),
        ({"retry": {"backoff": "soon"}}, "backoff"),
        ({"matches": [{"path": {"type": "RegularExpression", "value": "("}}]},
         "regular expression"),
        ({"matches": [{"path": {"type": "Glob", "value": "/x"}}]}, "Glob"),
        ({"matches": [{"path": {"value": "x"}}]}, "must start with /"),
        ({"matches": [{"method": "FETCH"}]}, "not an HTTP method"),
        ({"filters": [{"type": "RequestMirror", "requestMirror": {}}]}, "not supported"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
            "type": "ReplacePrefixMatch", "replacePrefixMatch": "/x"}}}],
          "matches": [{"path": {"type": "Exact", "value": "/a"}}]}, "PathPrefix"),
        ({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]},
         "statusCode"),
        ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "bad name", "value": "v"}]}}]}, "header name"),
        ({"sessionPersistence": {}}, "unknown field"),
    ],
)
def test_bad_route_rules_skip_the_route_with_a_problem(bad_rule, fragment) -> None:  # type: ignore[no-untyped-def]
    good = httproute("app", "good", [{"matches": [prefix("/good")],
                                      "backendRefs": [backend("web", 1)]}])
    bad = httproute("app", "bad", [{"backendRefs": [backend("web", 2)], **bad_rule}])
    cfg, problems = cfg_of(good, bad)
    assert len(problems) == 1 and problems[0].startswith("HTTPRoute app/bad: ")
    assert fragment in problems[0] and problems[0].endswith("skipped")
    a = route(cfg, mkreq("/good"))
    assert isinstance(a, RouteAction) and a.backends[0].port == 1
    assert isinstance(route(cfg, mkreq("/other")), NoRoute)
