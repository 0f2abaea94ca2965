"""build_config: which services, routes and policies reach a waypoint; bad objects skipped."""

from __future__ import annotations

from typing import Any

import pytest
from waypoint_l7_helpers import (
    authz,
    backend,
    base_objects,
    httproute,
    mkreq,
    namespace,
    parent,
    service,
    traffic_policy,
)

from waypoint.l7 import NoRoute, RouteAction, authorize, build_config, route


def build(objs: dict[str, dict[str, Any]]):  # type: ignore[no-untyped-def]
    return build_config(objs, "app", "wp")


def test_services_bound_by_namespace_and_service_labels() -> None:
    objs = dict([
        namespace("app", {"istio.io/use-waypoint": "wp"}),
        namespace("other", {"istio.io/use-waypoint": "wp",
                            "istio.io/use-waypoint-namespace": "app"}),
        namespace("third"),
        service("app", "inherits"),
        service("app", "opted-out", labels={"istio.io/use-waypoint": "none"}),
        service("app", "elsewhere", labels={"istio.io/use-waypoint": "wp2"}),
        service("other", "cross"),
        service("third", "own", labels={"istio.io/use-waypoint": "wp",
                                        "istio.io/use-waypoint-namespace": "app"}),
        service("third", "wrong-ns", labels={"istio.io/use-waypoint": "wp"}),  # means third/wp
    ])
    cfg, problems = build(objs)
    assert problems == []
    assert cfg.services == {
        "inherits.app.svc.cluster.local", "cross.other.svc.cluster.local",
        "own.third.svc.cluster.local"}


@pytest.mark.parametrize("traffic,bound", [("service", True), ("all", True),
                                           ("workload", False), ("none", False)])
def test_waypoint_for_decides_whether_services_come_here(traffic: str, bound: bool) -> None:
    objs = base_objects()
    objs["Gateway/app/wp"] = {"kind": "Gateway", "metadata": {
        "name": "wp", "namespace": "app", "labels": {"istio.io/waypoint-for": traffic}},
        "spec": {"gatewayClassName": "istio-waypoint"}}
    cfg, _ = build(objs)
    assert ("web.app.svc.cluster.local" in cfg.services) is bound


def test_cluster_domain_and_trust_domain_are_used() -> None:
    objs = base_objects()
    objs.update([authz("app", "sa", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                     "rules": [{"from": [{"source": {
                                         "serviceAccounts": ["client/sleep"]}}]}]})])
    cfg, _ = build_config(objs, "app", "wp", trust_domain="corp.example",
                          cluster_domain="k8s.local")
    assert "web.app.svc.k8s.local" in cfg.services
    r = mkreq("/", principal="corp.example/ns/client/sa/sleep")
    r = type(r)(**{**r.__dict__, "dst": type(r.dst)("web.app.svc.k8s.local", "app", 80)})
    assert authorize(cfg, r).allowed
    r2 = type(r)(**{**r.__dict__, "src": type(r.src)("10.0.0.5", "cluster.local/ns/client/sa/sleep",
                                                      "client")})
    assert not authorize(cfg, r2).allowed


def test_routes_for_services_of_other_waypoints_are_ignored_silently() -> None:
    objs = base_objects()
    objs.update([service("else", "x"),
                 httproute("else", "r", [{"backendRefs": [backend("x")]}], [parent("x")]),
                 httproute("else", "bad", [{"backendRefs": "nope"}], [parent("x")])])
    cfg, problems = build(objs)
    assert problems == [] and cfg.routes.http == {}


def test_route_attached_to_the_waypoint_gateway_is_reported() -> None:
    objs = base_objects()
    objs.update([httproute("app", "gw", [{"backendRefs": [backend()]}],
                           [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                             "name": "wp"}])])
    cfg, problems = build(objs)
    assert len(problems) == 1 and "attach routes to the Service" in problems[0]
    assert cfg.routes.http == {}


def test_unknown_section_name_is_reported() -> None:
    objs = base_objects()
    objs.update([httproute("app", "r", [{"backendRefs": [backend()]}],
                           [parent("web", sectionName="grpc")])])
    _, problems = build(objs)
    assert len(problems) == 1 and "sectionName 'grpc'" in problems[0]


BAD_OBJECTS: list[tuple[str, dict[str, Any], str]] = [
    ("HTTPRoute/app/b1", {"kind": "HTTPRoute", "metadata": {"name": "b1", "namespace": "app"},
                          "spec": {"parentRefs": [parent()], "rules": "all"}}, "HTTPRoute app/b1"),
    ("HTTPRoute/app/b2", {"kind": "HTTPRoute", "metadata": {"name": "b2", "namespace": "app"},
                          "spec": {"parentRefs": [parent()], "rules": [{"matches": [
                              {"path": {"type": "Exact", "value": 3}}]}]}}, "HTTPRoute app/b2"),
    ("GRPCRoute/app/b3", {"kind": "GRPCRoute", "metadata": {"name": "b3", "namespace": "app"},
                          "spec": {"parentRefs": [parent()], "rules": [{"matches": [
                              {"method": {}}]}]}}, "GRPCRoute app/b3"),
    ("GRPCRoute/app/b4", {"kind": "GRPCRoute", "metadata": {"name": "b4", "namespace": "app"},
                          "spec": {"parentRefs": [parent()], "rules": [{"timeouts": {}}]}},
     "GRPCRoute app/b4"),
    ("AuthorizationPolicy/app/b5", {"kind": "AuthorizationPolicy",
                                    "metadata": {"name": "b5", "namespace": "app"},
                                    "spec": {"targetRefs": ["wp"]}},
     "AuthorizationPolicy app/b5"),
    ("HTTPTrafficPolicy/app/b6", {"apiVersion": "ambient.io/v1", "kind": "HTTPTrafficPolicy",
                                  "metadata": {"name": "b6", "namespace": "app"}, "spec": {}},
     "HTTPTrafficPolicy app/b6"),
    ("HTTPTrafficPolicy/app/b7", {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
                                  "metadata": {"name": "b7", "namespace": "app"}, "spec": None,
                                  "extra": 1}, "HTTPTrafficPolicy app/b7"),
]


def _good_objects() -> dict[str, dict[str, Any]]:
    objs = base_objects()
    objs.update([
        httproute("app", "good", [{"matches": [{"path": {"type": "PathPrefix", "value": "/g"}}],
                                   "backendRefs": [backend("web-v2")]}]),
        authz("app", "deny-x", {"targetRefs": [{"kind": "Service", "name": "web"}],
                                "action": "DENY", "rules": [{"to": [{"operation": {
                                    "paths": ["/x"]}}]}]}),
        traffic_policy("app", "rl", {"targetRefs": [{"kind": "Service", "name": "api"}],
                                     "rateLimit": {"requestsPerUnit": 3}}),
    ])
    return objs


def _check_good_applies(cfg) -> None:  # type: ignore[no-untyped-def]
    a = route(cfg, mkreq("/g"))
    assert isinstance(a, RouteAction) and a.backends[0].host.startswith("web-v2.")
    assert isinstance(route(cfg, mkreq("/h")), NoRoute)
    assert not authorize(cfg, mkreq("/x")).allowed
    api = route(cfg, mkreq("/", svc="api"))
    assert isinstance(api, RouteAction) and api.rate_limit is not None


@pytest.mark.parametrize("key,obj,name", BAD_OBJECTS, ids=[k for k, _, _ in BAD_OBJECTS])
def test_each_bad_object_yields_a_problem_and_the_rest_applies(key: str, obj: dict[str, Any],
                                                               name: str) -> None:
    objs = _good_objects()
    objs[key] = obj
    cfg, problems = build(objs)
    assert len(problems) == 1, problems
    assert problems[0].startswith(name + ": ")
    _check_good_applies(cfg)


def test_all_bad_objects_together() -> None:
    objs = _good_objects()
    objs.update({k: o for k, o, _ in BAD_OBJECTS})
    cfg, problems = build(objs)
    assert len(problems) == len(BAD_OBJECTS)
    _check_good_applies(cfg)


@pytest.mark.parametrize("junk", [None, 3, "x", [], {"metadata": 5}, {"spec": []}])
def test_junk_objects_never_raise(junk: Any) -> None:
    objs = _good_objects()
    for kind in ("HTTPRoute", "GRPCRoute", "AuthorizationPolicy", "HTTPTrafficPolicy",
                 "Service", "Namespace", "Gateway", "ReferenceGrant"):
        objs[f"{kind}/app/junk"] = junk  # type: ignore[assignment]
    cfg, problems = build(objs)
    assert not any("internal error" in p for p in problems), problems
    _check_good_applies(cfg)


def test_empty_objects() -> None:
    cfg, problems = build({})
    assert problems == [] and cfg.services == frozenset()
    a = route(cfg, mkreq("/"))
    assert isinstance(a, RouteAction) and a.route_name == "default"
    assert authorize(cfg, mkreq("/")).allowed


def test_refused_objects_are_listed_and_the_state_keeps_their_last_good_version() -> None:
    from waypoint_l7_helpers import WP, WP_NS, backend, base_objects, cfg_of, httproute

    from controlplane.objects import Update
    from waypoint.state import WaypointState

    good = httproute("app", "split", [{"backendRefs": [backend("web-v2", weight=1)]}])
    bad = httproute("app", "split", [{"backendRefs": [backend("web-v2", weight=-5)]}])
    cfg, problems = cfg_of(bad)
    assert "HTTPRoute/app/split" in cfg.rejected, problems

    st = WaypointState(WP, WP_NS)
    st.apply(Update(upserts={**base_objects(), good[0]: good[1]}, resync=True))
    before = st.snapshot().l7.routes
    st.apply(Update(upserts={bad[0]: bad[1]}))
    assert st.snapshot().l7.routes == before  # the broken edit did not replace the route
