"""Outbound routing decisions: pure, table-driven, with the endpoint choice injected."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from ambient.identity import SpiffeId
from ambient.model import (
    GatewayAddress,
    HealthStatus,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ambient.store import MeshStore
from ztunnel.route import (
    HBONE_PORT,
    Hbone,
    NoRoute,
    Passthrough,
    format_authority,
    route_outbound,
    waypoint_bypass,
    weighted_choice,
)

ip = ipaddress.ip_address
HOST = "backend.shop.svc.cluster.local"
SVC_KEY = f"shop/{HOST}"
WAYPOINT = GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"))
OTHER_SAN = "spiffe://cluster.local/ns/shop/sa/canary"


def wl(name, addr, *, sa="backend", hbone=True, healthy=True, services=None, **kw):
    return Workload(
        uid=f"Kubernetes//Pod/shop/{name}",
        name=name,
        namespace="shop",
        addresses=(ip(addr),) if addr else (),
        tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
        service_account=sa,
        status=HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY,
        services=services if services is not None else {},
        **kw,
    )


def svc(vip="10.96.0.10", ports=None, hostname=HOST, sans=(), **kw):
    return Service(
        name=hostname.split(".")[0],
        namespace="shop",
        hostname=hostname,
        vips=(NetworkAddress("", ip(vip)),),
        ports=ports if ports is not None else {80: 8080, 81: 0},
        subject_alt_names=tuple(sans),
        **kw,
    )


def state(*objs):
    store = MeshStore()
    assert store.apply(list(objs)) == []
    return store.snapshot


def first(candidates):
    return sorted(candidates, key=lambda c: c[0].uid)[0]


def last(candidates):
    return sorted(candidates, key=lambda c: c[0].uid)[-1]


def no_choice(candidates):  # pragma: no cover - called only on a bug
    raise AssertionError(f"choose must not be called, got {candidates}")


def ident(sa, ns="shop"):
    return SpiffeId("cluster.local", ns, sa)


# Endpoints of the backend service: two HBONE pods (one maps the named port 81), one plain pod.
BACKEND_1 = wl("backend-1", "10.0.0.11", services={SVC_KEY: {80: 8080, 81: 9091}})
BACKEND_2 = wl("backend-2", "10.0.0.12", services={SVC_KEY: {80: 8080}})
PLAIN = wl("legacy", "10.0.0.30", sa="default", hbone=False)
V6 = wl("v6", "fd00::7")
BASE = state(
    BACKEND_1, BACKEND_2, PLAIN, V6, svc(sans=(OTHER_SAN, "not-a-spiffe-id", "dns:backend"))
)


# (id, dst ip, dst port, choose, expected address, expected authority, expected sa's)
HBONE_CASES = [
    ("pod ip of an HBONE workload", "10.0.0.11", 9000, no_choice, ("10.0.0.11", HBONE_PORT), "10.0.0.11:9000", {"backend"}),
    ("pod ip keeps the port as given", "10.0.0.12", 1, no_choice, ("10.0.0.12", HBONE_PORT), "10.0.0.12:1", {"backend"}),
    ("ipv6 pod authority in brackets", "fd00::7", 8080, no_choice, ("fd00::7", HBONE_PORT), "[fd00::7]:8080", {"backend"}),
    ("service vip, first endpoint", "10.96.0.10", 80, first, ("10.0.0.11", HBONE_PORT), "10.0.0.11:8080", {"backend", "canary"}),
    ("service vip, second endpoint", "10.96.0.10", 80, last, ("10.0.0.12", HBONE_PORT), "10.0.0.12:8080", {"backend", "canary"}),
    ("named (0) target port resolved per workload", "10.96.0.10", 81, first, ("10.0.0.11", HBONE_PORT), "10.0.0.11:9091", {"backend", "canary"}),
]  # fmt: skip


@pytest.mark.parametrize(
    "dst,port,choose,address,authority,sas",
    [c[1:] for c in HBONE_CASES],
    ids=[c[0] for c in HBONE_CASES],
)
def test_hbone_routes(dst, port, choose, address, authority, sas):
    r = route_outbound(BASE, None, dst, port, choose=choose)
    assert isinstance(r, Hbone)
    assert r.address == address
    assert r.authority == authority
    assert r.workload.addresses[0] == ip(address[0])
    assert r.identities == frozenset(ident(sa) for sa in sas)


def test_pod_ip_route_has_no_service_and_only_the_workload_identity():
    r = route_outbound(BASE, None, "10.0.0.11", 9000, choose=no_choice)
    assert r.service is None
    assert r.identities == frozenset({BACKEND_1.identity()})


def test_service_route_carries_the_service():
    r = route_outbound(BASE, None, "10.96.0.10", 80, choose=first)
    assert isinstance(r, Hbone)
    assert r.service is not None and r.service.key == SVC_KEY


def test_choose_sees_only_endpoints_with_the_mapped_target_port():
    seen = []

    def spy(candidates):
        seen.append(sorted((w.name, p) for w, p in candidates))
        return candidates[0]

    route_outbound(BASE, None, "10.96.0.10", 80, choose=spy)
    route_outbound(BASE, None, "10.96.0.10", 81, choose=spy)
    # Port 81 has target 0 (named): backend-2 did not resolve it, so it is no endpoint.
    assert seen == [[("backend-1", 8080), ("backend-2", 8080)], [("backend-1", 9091)]]


# (id, dst ip, dst port, expected address, expected workload name or None)
PASSTHROUGH_CASES = [
    ("non-HBONE workload", "10.0.0.30", 5432, ("10.0.0.30", 5432), "legacy"),
    ("unknown ipv4", "192.0.2.1", 443, ("192.0.2.1", 443), None),
    ("unknown ipv6", "2001:db8::1", 443, ("2001:db8::1", 443), None),
]  # fmt: skip


@pytest.mark.parametrize(
    "dst,port,address,name",
    [c[1:] for c in PASSTHROUGH_CASES],
    ids=[c[0] for c in PASSTHROUGH_CASES],
)
def test_passthrough_routes(dst, port, address, name):
    r = route_outbound(BASE, None, dst, port, choose=no_choice)
    assert isinstance(r, Passthrough)
    assert r.address == address
    assert r.service is None
    assert (r.workload.name if r.workload else None) == name


def test_service_endpoint_without_hbone_is_passthrough_to_target_port():
    s = state(wl("plain", "10.0.0.40", hbone=False, services={SVC_KEY: {80: 7070}}), svc())
    r = route_outbound(s, None, "10.96.0.10", 80, choose=first)
    assert isinstance(r, Passthrough)
    assert r.address == ("10.0.0.40", 7070)
    assert r.service is not None and r.service.key == SVC_KEY


def test_service_target_port_used_when_workload_has_no_mapping_for_the_port():
    s = state(wl("b", "10.0.0.41", services={SVC_KEY: {}}), svc(ports={80: 8443}))
    r = route_outbound(s, None, "10.96.0.10", 80, choose=first)
    assert isinstance(r, Hbone) and r.authority == "10.0.0.41:8443"


# (id, objects, dst ip, dst port, words the reason must contain)
NOROUTE_CASES = [
    ("service has no such port", (BACKEND_1, svc()), "10.96.0.10", 9999, ("9999", SVC_KEY)),
    ("only unhealthy endpoints", (wl("sick", "10.0.0.50", healthy=False, services={SVC_KEY: {80: 8080}}), svc()), "10.96.0.10", 80, ("healthy", SVC_KEY)),
    ("no endpoints at all", (svc(),), "10.96.0.10", 80, ("healthy", SVC_KEY)),
    ("named target port nobody resolved", (BACKEND_2, svc()), "10.96.0.10", 81, ("healthy", SVC_KEY)),
    ("service with a waypoint", (BACKEND_1, svc(waypoint=WAYPOINT)), "10.96.0.10", 80, ("waypoint", SVC_KEY)),
    ("workload with a waypoint", (wl("wp", "10.0.0.60", waypoint=WAYPOINT),), "10.0.0.60", 80, ("waypoint", "shop/wp")),
    ("workload without address via service", (wl("noaddr", None, services={SVC_KEY: {80: 8080}}), svc()), "10.96.0.10", 80, ("address", "shop/noaddr")),
]  # fmt: skip


@pytest.mark.parametrize(
    "objs,dst,port,words", [c[1:] for c in NOROUTE_CASES], ids=[c[0] for c in NOROUTE_CASES]
)
def test_no_route(objs, dst, port, words):
    r = route_outbound(state(*objs), None, dst, port, choose=first)
    assert isinstance(r, NoRoute)
    for w in words:
        assert w in r.reason


def test_unhealthy_endpoints_are_never_offered_to_choose():
    sick = wl("sick", "10.0.0.50", healthy=False, services={SVC_KEY: {80: 8080}})
    s = state(sick, BACKEND_1, svc())
    offered = []

    def spy(candidates):
        offered.extend(w.name for w, _ in candidates)
        return candidates[0]

    r = route_outbound(s, None, "10.96.0.10", 80, choose=spy)
    assert offered == ["backend-1"]
    assert isinstance(r, Hbone) and r.address == ("10.0.0.11", HBONE_PORT)


def test_service_noroute_names_the_service_object():
    r = route_outbound(state(svc()), None, "10.96.0.10", 1234, choose=no_choice)
    assert isinstance(r, NoRoute) and r.service is not None and r.service.key == SVC_KEY


def test_vip_on_another_network_is_not_this_service():
    r = route_outbound(BASE, None, "10.96.0.10", 80, network="net2", choose=no_choice)
    assert isinstance(r, Passthrough) and r.address == ("10.96.0.10", 80)


def test_ipv6_service_endpoint_authority_in_brackets():
    s = state(wl("b6", "fd00::9", services={SVC_KEY: {80: 8080}}), svc(vip="fd00:96::10"))
    r = route_outbound(s, None, "fd00:96::10", 80, choose=first)
    assert isinstance(r, Hbone)
    assert r.address == ("fd00::9", HBONE_PORT)
    assert r.authority == "[fd00::9]:8080"


@pytest.mark.parametrize(
    "addr,port,want",
    [("10.0.0.1", 80, "10.0.0.1:80"), ("fd00::1", 15008, "[fd00::1]:15008"), ("::", 1, "[::]:1")],
)
def test_format_authority(addr, port, want):
    assert format_authority(addr, port) == want


# -- weighted_choice ------------------------------------------------------------------------


def _weighted(cap_a, cap_b):
    a = wl("a", "10.0.1.1", capacity=cap_a)
    b = wl("b", "10.0.1.2", capacity=cap_b)
    return a, b, [(a, 80), (b, 81)]


def test_weighted_choice_returns_one_of_the_candidates_with_its_port():
    a, b, cands = _weighted(1, 1)
    random.seed(1)
    for _ in range(50):
        assert weighted_choice(cands) in cands


def test_weighted_choice_matches_random_choices_with_capacity_weights():
    """Exact picks under a fixed seed: capacity is the weight."""
    a, b, cands = _weighted(1, 9)
    random.seed(1234)
    got = [weighted_choice(cands)[0].name for _ in range(200)]
    random.seed(1234)
    want = [random.choices(["a", "b"], weights=[1, 9], k=1)[0] for _ in range(200)]
    assert got == want
    counts = collections.Counter(got)
    assert counts["b"] > counts["a"] > 0


@pytest.mark.parametrize("cap", [0, 1])
def test_weighted_choice_capacity_zero_counts_as_one(cap):
    a, b, cands = _weighted(cap, 1)
    random.seed(99)
    got = [weighted_choice(cands)[0].name for _ in range(200)]
    random.seed(99)
    want = [random.choices(["a", "b"], weights=[1, 1], k=1)[0] for _ in range(200)]
    assert got == want


def test_single_candidate_is_always_chosen():
    a, _, _ = _weighted(5, 1)
    assert weighted_choice([(a, 8080)]) == (a, 8080)


def test_default_choose_is_weighted_choice():
    random.seed(7)
    r = route_outbound(BASE, None, "10.96.0.10", 80)
    assert isinstance(r, Hbone)
    assert r.address[0] in ("10.0.0.11", "10.0.0.12")


# -- waypoints --------------------------------------------------------------------------------

WP_HOST = "waypoint.shop.svc.cluster.local"
WP_KEY = f"shop/{WP_HOST}"
WP_SAN = "spiffe://cluster.local/ns/shop/sa/waypoint-san"
# The waypoint: a Service on 15008 with two proxies (not captured: tunnel protocol NONE).
WP_1 = wl("waypoint-1", "10.0.9.1", sa="waypoint", hbone=False, services={WP_KEY: {15008: 15008}})
WP_2 = wl("waypoint-2", "10.0.9.2", sa="waypoint", hbone=False, services={WP_KEY: {15008: 15008}})
WP_SICK = wl("waypoint-3", "10.0.9.3", sa="waypoint", healthy=False, services={WP_KEY: {15008: 15008}})
WP_SVC = svc(vip="10.96.9.9", hostname=WP_HOST, ports={15008: 15008}, sans=(WP_SAN,))
BY_NAME = GatewayAddress(NamespacedHostname("shop", WP_HOST))
BY_VIP = GatewayAddress(NetworkAddress("", ip("10.96.9.9")))
BY_POD_IP = GatewayAddress(NetworkAddress("", ip("10.0.9.2")))
REVIEWS_KEY = "shop/reviews.shop.svc.cluster.local"
REVIEWS_1 = wl("reviews-1", "10.0.1.21", sa="reviews", services={REVIEWS_KEY: {80: 8081}})
FRONTEND = wl("frontend", "10.0.1.5", sa="frontend")


def wp_state(svc_wp=None, wl_wp=None, extra=()):
    reviews_1 = wl("reviews-1", "10.0.1.21", sa="reviews", services={REVIEWS_KEY: {80: 8081}},
                   waypoint=wl_wp)
    reviews = svc(vip="10.96.0.30", hostname="reviews.shop.svc.cluster.local", ports={80: 8081},
                  waypoint=svc_wp)
    return state(WP_1, WP_2, WP_SICK, WP_SVC, reviews_1, reviews, FRONTEND, *extra)


# (id, service waypoint, workload waypoint, dst ip, dst port, source, choose, address, authority, service key)
WAYPOINT_CASES = [
    ("service VIP to the service's waypoint, by hostname", BY_NAME, None, "10.96.0.30", 80, FRONTEND, first, ("10.0.9.1", 15008), "10.96.0.30:80", REVIEWS_KEY),
    ("second waypoint proxy when chosen", BY_NAME, None, "10.96.0.30", 80, FRONTEND, last, ("10.0.9.2", 15008), "10.96.0.30:80", REVIEWS_KEY),
    ("waypoint referenced by its VIP", BY_VIP, None, "10.96.0.30", 80, FRONTEND, first, ("10.0.9.1", 15008), "10.96.0.30:80", REVIEWS_KEY),
    ("waypoint referenced by a proxy's own IP", BY_POD_IP, None, "10.96.0.30", 80, FRONTEND, no_choice, ("10.0.9.2", 15008), "10.96.0.30:80", REVIEWS_KEY),
    ("service waypoint taken for any port of the service", BY_NAME, None, "10.96.0.30", 9999, FRONTEND, first, ("10.0.9.1", 15008), "10.96.0.30:9999", REVIEWS_KEY),
    ("pod IP to the workload's waypoint keeps the pod authority", None, BY_NAME, "10.0.1.21", 8081, FRONTEND, first, ("10.0.9.1", 15008), "10.0.1.21:8081", None),
    ("unknown source still goes to the waypoint", BY_NAME, None, "10.96.0.30", 80, None, first, ("10.0.9.1", 15008), "10.96.0.30:80", REVIEWS_KEY),
]  # fmt: skip


@pytest.mark.parametrize(
    "svc_wp,wl_wp,dst,port,source,choose,address,authority,skey",
    [c[1:] for c in WAYPOINT_CASES],
    ids=[c[0] for c in WAYPOINT_CASES],
)
def test_routes_to_waypoint(svc_wp, wl_wp, dst, port, source, choose, address, authority, skey):
    r = route_outbound(wp_state(svc_wp, wl_wp), source, dst, port, choose=choose)
    assert isinstance(r, Hbone), r
    assert r.waypoint is True
    assert r.address == address
    assert r.authority == authority  # the original destination, never the waypoint's
    assert r.workload.service_account == "waypoint"
    assert (r.service.key if r.service else None) == skey
    # The proxy's identity plus the waypoint Service's SANs (none when named by a proxy IP).
    sans = set() if svc_wp is BY_POD_IP else {SpiffeId.parse(WP_SAN)}
    assert r.identities == frozenset({ident("waypoint")} | sans)


def test_waypoint_choice_sees_only_healthy_proxies_on_the_hbone_port():
    offered = []

    def spy(candidates):
        offered.append(sorted((w.name, p) for w, p in candidates))
        return candidates[0]

    route_outbound(wp_state(BY_NAME), FRONTEND, "10.96.0.30", 80, choose=spy)
    assert offered == [[("waypoint-1", 15008), ("waypoint-2", 15008)]]


def test_ipv6_original_destination_authority_in_brackets():
    s = state(WP_1, WP_SVC, svc(vip="fd00:96::30", hostname="r6.shop.svc.cluster.local", waypoint=BY_NAME))
    r = route_outbound(s, None, "fd00:96::30", 80, choose=first)
    assert isinstance(r, Hbone) and r.waypoint and r.authority == "[fd00:96::30]:80"


# (id, service waypoint, workload waypoint, extra objects, dst, port, words in the reason)
WAYPOINT_NOROUTE = [
    ("waypoint service unknown", GatewayAddress(NamespacedHostname("shop", "ghost.shop.svc.cluster.local")), None, (), "10.96.0.30", 80, ("ghost", "unknown", REVIEWS_KEY)),
    ("waypoint address unknown", GatewayAddress(NetworkAddress("", ip("192.0.2.9"))), None, (), "10.96.0.30", 80, ("192.0.2.9", "unknown")),
    ("workload waypoint unknown", None, GatewayAddress(NamespacedHostname("shop", "ghost.shop.svc.cluster.local")), (), "10.0.1.21", 8081, ("workload shop/reviews-1", "ghost")),
]  # fmt: skip


@pytest.mark.parametrize(
    "svc_wp,wl_wp,extra,dst,port,words",
    [c[1:] for c in WAYPOINT_NOROUTE],
    ids=[c[0] for c in WAYPOINT_NOROUTE],
)
def test_unknown_waypoint_fails_closed(svc_wp, wl_wp, extra, dst, port, words):
    r = route_outbound(wp_state(svc_wp, wl_wp, extra), FRONTEND, dst, port, choose=first)
    assert isinstance(r, NoRoute), r
    for w in words:
        assert w in r.reason


def test_waypoint_without_ready_proxy_fails_closed():
    sick_only = state(WP_SICK, WP_SVC, svc(vip="10.96.0.30", hostname="reviews.shop.svc.cluster.local", waypoint=BY_NAME))
    r = route_outbound(sick_only, FRONTEND, "10.96.0.30", 80, choose=no_choice)
    assert isinstance(r, NoRoute) and "no ready proxy" in r.reason
    assert r.service is not None and r.service.key == REVIEWS_KEY


def test_waypoint_service_without_hbone_port_fails_closed():
    s = state(wl("w", "10.0.9.7", services={WP_KEY: {80: 80}}), svc(vip="10.96.9.9", hostname=WP_HOST, ports={80: 80}),
              svc(vip="10.96.0.30", hostname="reviews.shop.svc.cluster.local", waypoint=BY_NAME))
    assert isinstance(route_outbound(s, FRONTEND, "10.96.0.30", 80, choose=no_choice), NoRoute)


@pytest.mark.parametrize("svc_wp,wl_wp,dst,port", [
    (BY_NAME, None, "10.96.0.30", 80),
    (None, BY_NAME, "10.0.1.21", 8081),
    (BY_VIP, BY_VIP, "10.0.1.21", 8081),
])
def test_traffic_from_the_waypoint_never_loops_back(svc_wp, wl_wp, dst, port):
    r = route_outbound(wp_state(svc_wp, wl_wp), WP_2, dst, port, choose=first)
    assert isinstance(r, Hbone) and not r.waypoint
    assert r.address == ("10.0.1.21", HBONE_PORT) and r.authority == "10.0.1.21:8081"


def test_pod_ip_of_a_service_waypoint_user_goes_direct():
    """waypoint-for: service (the default) binds only the service: pod IPs go direct, and the
    destination ztunnel decides (see waypoint_bypass)."""
    r = route_outbound(wp_state(BY_NAME), FRONTEND, "10.0.1.21", 8081, choose=no_choice)
    assert isinstance(r, Hbone) and not r.waypoint and r.address == ("10.0.1.21", HBONE_PORT)


# -- inbound: traffic that must come through a waypoint ----------------------------------------

WP_ID, FE_ID = ident("waypoint"), ident("frontend")

# (id, service waypoint, workload waypoint, dst port, peer, allowed, words in the reason)
BYPASS_CASES = [
    ("no waypoint: anyone", None, None, 8081, FE_ID, True, ()),
    ("service waypoint, peer is the waypoint", BY_NAME, None, 8081, WP_ID, True, ()),
    ("service waypoint, peer skips it", BY_NAME, None, 8081, FE_ID, False, ("reviews-1:8081", REVIEWS_KEY, "frontend")),
    ("service waypoint, plaintext peer", BY_NAME, None, 8081, None, False, ("without identity",)),
    ("service waypoint, port the service does not target", BY_NAME, None, 9000, FE_ID, True, ()),
    ("waypoint by VIP, peer is the waypoint", BY_VIP, None, 8081, WP_ID, True, ()),
    ("waypoint by a proxy IP, peer is the waypoint", BY_POD_IP, None, 8081, WP_ID, True, ()),
    ("waypoint service SAN accepted", BY_NAME, None, 8081, SpiffeId.parse(WP_SAN), True, ()),
    ("workload waypoint, any port", None, BY_NAME, 9000, FE_ID, False, ("workload shop/reviews-1",)),
    ("workload waypoint, peer is the waypoint", None, BY_NAME, 9000, WP_ID, True, ()),
    ("unknown waypoint refuses everyone", GatewayAddress(NamespacedHostname("shop", "ghost.shop.svc.cluster.local")), None, 8081, WP_ID, False, ("ghost",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "svc_wp,wl_wp,port,peer,allowed,words",
    [c[1:] for c in BYPASS_CASES],
    ids=[c[0] for c in BYPASS_CASES],
)
def test_waypoint_bypass(svc_wp, wl_wp, port, peer, allowed, words):
    s = wp_state(svc_wp, wl_wp)
    target = s.workload_by_uid("Kubernetes//Pod/shop/reviews-1")
    reason = waypoint_bypass(s, target, port, peer)
    assert (reason is None) == allowed, reason
    for w in words:
        assert w in reason


def test_bypass_named_target_port_resolved_per_workload():
    s = state(WP_1, WP_SVC, wl("r", "10.0.1.30", services={REVIEWS_KEY: {80: 9999}}),
              svc(vip="10.96.0.30", hostname="reviews.shop.svc.cluster.local", ports={80: 0}, waypoint=BY_NAME))
    target = s.workload_by_uid("Kubernetes//Pod/shop/r")
    assert waypoint_bypass(s, target, 9999, FE_ID) is not None
    assert waypoint_bypass(s, target, 8081, FE_ID) is None
