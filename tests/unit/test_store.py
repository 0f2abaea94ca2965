"""MeshStore: per-entry rejection, last-good-stays, indexes, endpoints and policy scoping."""

from __future__ import annotations

import ipaddress

from ambient.api.istio.security import authorization_pb2 as apb
from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.model import (
    Action,
    NetworkAddress,
    Policy,
    Scope,
    Service,
    Workload,
    to_proto,
)
from ambient.store import AUTHORIZATION_TYPE_URL, MeshStore

ip = ipaddress.ip_address
SVC = "shop/db.shop.svc.cluster.local"


def wl(name, addr="10.0.0.1", ns="shop", services=None, node="n1", pols=(), **kw):
    return Workload(
        uid=f"K//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=(ip(addr),) if addr else (),
        node=node,
        services=services or {},
        authorization_policies=tuple(pols),
        **kw,
    )


def svc(ports=None, vip="10.96.0.1", hostname="db.shop.svc.cluster.local"):
    return Service(
        name="db",
        namespace="shop",
        hostname=hostname,
        vips=(NetworkAddress("", ip(vip)),),
        ports=ports if ports is not None else {5432: 8080},
    )


def pol(name, ns="shop", scope=Scope.NAMESPACE):
    return Policy(name, ns, scope, Action.DENY)


def test_apply_protos_and_models_and_lookups():
    st = MeshStore()
    rej = st.apply([to_proto(wl("a")), svc(), pol("p")])
    assert rej == []
    s = st.snapshot
    assert s.version == 1
    assert s.workload_by_uid("K//Pod/shop/a").name == "a"
    assert s.workload_by_address("", "10.0.0.1").name == "a"
    assert s.workload_by_address("other", "10.0.0.1") is None
    assert s.service_by_vip("", ip("10.96.0.1")).key == SVC
    assert s.service_by_key(SVC).name == "db"
    assert [w.name for w in s.workloads_on_node("n1")] == ["a"]
    assert s.policies["shop/p"].action is Action.DENY


def test_bad_entry_rejected_alone_and_last_good_stays():
    st = MeshStore()
    st.apply([wl("a")])
    bad = to_proto(wl("a", addr="10.0.0.9")).workload
    bad.addresses[0] = b"\x01\x02"
    rej = st.apply([wpb.Address(workload=bad), wl("b", addr="10.0.0.2")])
    assert len(rej) == 1
    assert rej[0].key == "K//Pod/shop/a"
    assert "addresses[0]" in rej[0].message
    s = st.snapshot
    assert s.workload_by_uid("K//Pod/shop/a").addresses == (ip("10.0.0.1"),)
    assert s.workload_by_uid("K//Pod/shop/b") is not None


def test_rejected_policy_keeps_last_good():
    st = MeshStore()
    st.apply([pol("p")])
    bad = apb.Authorization(name="p", namespace="shop", scope=42)
    rej = st.apply([bad])
    assert [r.key for r in rej] == ["shop/p"]
    assert st.snapshot.policies["shop/p"].scope is Scope.NAMESPACE


def test_snapshots_are_immutable_and_versioned():
    st = MeshStore()
    st.apply([wl("a")])
    old = st.snapshot
    st.apply([wl("a", addr="10.0.0.5")])
    assert old.workload_by_address("", "10.0.0.1").name == "a"
    assert st.snapshot.workload_by_address("", "10.0.0.1") is None
    assert st.snapshot.workload_by_address("", "10.0.0.5").name == "a"
    assert st.snapshot.version == old.version + 1


def test_no_change_no_version_bump_no_notify():
    st = MeshStore()
    seen = []
    st.subscribe(seen.append)
    st.apply([wl("a")])
    st.apply([wl("a")])
    assert len(seen) == 1 and seen[0] is st.snapshot and st.snapshot.version == 1


def test_subscribe_and_unsubscribe_and_failing_subscriber():
    st = MeshStore()
    seen = []

    def boom(_s):
        raise RuntimeError("x")

    st.subscribe(boom)
    unsub = st.subscribe(seen.append)
    st.apply([wl("a")])
    unsub()
    st.apply([wl("b", addr="10.0.0.2")])
    assert len(seen) == 1


def test_removals_by_key_and_kind():
    st = MeshStore()
    st.apply([wl("a"), svc(), pol("p"), Policy("db.shop.svc.cluster.local", "shop")])
    st.apply(removals=[("service", SVC)])
    s = st.snapshot
    assert s.service_by_key(SVC) is None and "shop/db.shop.svc.cluster.local" in s.policies
    st.apply(removals=[(AUTHORIZATION_TYPE_URL, "shop/p"), "K//Pod/shop/a"])
    s = st.snapshot
    assert "shop/p" not in s.policies
    assert s.workload_by_uid("K//Pod/shop/a") is None
    assert s.workload_by_address("", "10.0.0.1") is None
    assert s.workloads_on_node("n1") == []


def test_address_conflict_last_wins_then_falls_back():
    st = MeshStore()
    st.apply([wl("a"), wl("b")])  # same IP
    assert st.snapshot.workload_by_address("", "10.0.0.1").name == "b"
    st.apply(removals=["K//Pod/shop/b"])
    assert st.snapshot.workload_by_address("", "10.0.0.1").name == "a"


# (id, service ports, workload port map, service port asked, expected target or None)
ENDPOINT_CASES = [
    ("workload map wins", {5432: 8080}, {5432: 9000}, 5432, 9000),
    ("service target", {5432: 8080}, {}, 5432, 8080),
    ("named port resolved by workload", {5432: 0}, {5432: 7000}, 5432, 7000),
    ("named port unresolved: skipped", {5432: 0}, {}, 5432, None),
    ("port not on service", {5432: 8080}, {5432: 9000}, 80, None),
]


def test_endpoints_table():
    for name, sports, wports, asked, want in ENDPOINT_CASES:
        st = MeshStore()
        st.apply([svc(ports=sports), wl("a", services={SVC: wports})])
        eps = st.snapshot.endpoints(SVC, asked)
        got = eps[0].target_port if eps else None
        assert got == want, name
        if eps:
            assert eps[0].workload.name == "a"


def test_endpoints_track_workload_changes():
    st = MeshStore()
    st.apply([svc(), wl("a", services={SVC: {}}), wl("b", addr="10.0.0.2", services={SVC: {}})])
    assert [e.workload.name for e in st.snapshot.endpoints(SVC, 5432)] == ["a", "b"]
    st.apply([wl("b", addr="10.0.0.2")])  # b leaves the service
    assert [w.name for w in st.snapshot.endpoint_workloads(SVC)] == ["a"]
    st.apply(removals=["K//Pod/shop/a"])
    assert st.snapshot.endpoints(SVC, 5432) == []


def test_policies_for_scoping():
    st = MeshStore()
    st.apply([
        pol("ns-pol"),
        pol("other-ns", ns="web"),
        pol("global", ns="istio-system", scope=Scope.GLOBAL),
        pol("sel", scope=Scope.WORKLOAD_SELECTOR),
        pol("sel-unlisted", scope=Scope.WORKLOAD_SELECTOR),
    ])  # fmt: skip
    w = wl("a", pols=["shop/sel", "shop/missing"])
    keys = [p.key for p in st.snapshot.policies_for(w)]
    assert keys == ["shop/ns-pol", "istio-system/global", "shop/sel"]


def test_global_policies_restricted_to_root_namespace_when_configured():
    for root, want in ((None, {"a/g", "istio-system/g"}), ("istio-system", {"istio-system/g"})):
        st = MeshStore(root_namespace=root)
        st.apply(
            [pol("g", ns="a", scope=Scope.GLOBAL), pol("g", ns="istio-system", scope=Scope.GLOBAL)]
        )
        assert {p.key for p in st.snapshot.policies_for(wl("x", ns="b"))} == want


def test_policy_scope_change_reindexes():
    st = MeshStore()
    st.apply([pol("p")])
    st.apply([pol("p", scope=Scope.WORKLOAD_SELECTOR)])
    assert st.snapshot.policies_for(wl("a")) == []


def test_replace_all_removes_missing_keys():
    st = MeshStore()
    st.apply([wl("a"), wl("b", addr="10.0.0.2"), pol("p")])
    st.replace_all([wl("a")])
    s = st.snapshot
    assert set(s.workloads) == {"K//Pod/shop/a"} and not s.policies


def test_dump_shape():
    st = MeshStore()
    st.apply([svc(), wl("a", services={SVC: {5432: 9000}}), pol("p")])
    d = st.dump()
    assert set(d) >= {"workloads", "services", "policies"}
    assert d["workloads"][0]["workloadIps"] == ["10.0.0.1"]
    assert d["services"][0]["vips"] == ["/10.96.0.1"]
    assert d["services"][0]["endpoints"]["K//Pod/shop/a"]["port"] == {"5432": 9000}
    assert d["policies"][0]["action"] == "Deny"


def test_unknown_upsert_type_rejected():
    st = MeshStore()
    rej = st.apply([object()])
    assert len(rej) == 1 and "unsupported" in rej[0].message
