"""The delta xDS stream state machine and the snapshot cache, without any I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
import pytest

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import discovery_pb2
from ambient.api.google.rpc import status_pb2
from ambient.api.istio.security import authorization_pb2
from ambient.api.istio.workload import workload_pb2
from ambient.identity import SpiffeId
from controlplane.cache import SnapshotCache, resource_version
from controlplane.xds import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    AuthenticationError,
    Caller,
    DeltaStream,
    NodeId,
    XdsError,
    allow_all,
    client_certificate,
    compute_delta,
    parse_rejected_names,
    peer_identity,
)

NODE = "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"


def wl(uid: str, ip: bytes = b"\x0a\x00\x00\x01", name: str = "p") -> workload_pb2.Address:
    return workload_pb2.Address(workload=workload_pb2.Workload(
        uid=uid, name=name, namespace="default", addresses=[ip]))


def pol(name: str, ns: str = "default") -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(name=name, namespace=ns)


def req(
    type_url: str = ADDRESS_TYPE_URL,
    *,
    node: str | None = None,
    sub: tuple[str, ...] = (),
    unsub: tuple[str, ...] = (),
    initial: dict[str, str] | None = None,
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    r = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub,
        initial_resource_versions=initial or {}, response_nonce=nonce,
    )
    if node is not None:
        r.node.CopyFrom(base_pb2.Node(id=node))
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


@dataclass
class Fixture:
    cache: SnapshotCache = field(default_factory=SnapshotCache)

    def __post_init__(self) -> None:
        self.cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a"), "u/b": wl("u/b", b"\x0a\0\0\2"),
                                            "default/svc": svc("svc")})
        self.cache.apply(AUTHORIZATION_TYPE_URL, {"default/allow": pol("allow")})

    def stream(self) -> DeltaStream:
        counter = iter(range(1, 1000))
        return DeltaStream(self.cache, nonce=lambda: f"n{next(counter)}")

    def version(self, name: str, type_url: str = ADDRESS_TYPE_URL) -> str:
        entry = self.cache.get(type_url, name)
        assert entry is not None
        return entry.version


def svc(name: str) -> workload_pb2.Address:
    return workload_pb2.Address(service=workload_pb2.Service(
        name=name, namespace="default", hostname=f"{name}.default.svc.cluster.local"))


def names(resp: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return [r.name for r in resp.resources]


# -- subscription and the first response --------------------------------------------------------


@pytest.mark.parametrize(
    "sub,unsub,expect_names",
    [
        ((), (), ["default/svc", "u/a", "u/b"]),          # legacy wildcard (what ztunnel sends)
        (("*",), (), ["default/svc", "u/a", "u/b"]),      # explicit wildcard
        (("u/a",), (), ["u/a"]),                          # named subscription
        (("*",), ("*",), []),                             # on-demand "subscribe to nothing"
    ],
)
def test_first_request_gets_what_it_subscribes(sub, unsub, expect_names) -> None:
    f = Fixture()
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE, sub=sub, unsub=unsub))
    assert resp.type_url == ADDRESS_TYPE_URL
    assert resp.nonce == "n1"
    assert names(resp) == expect_names
    assert list(resp.removed_resources) == []
    for r in resp.resources:
        assert r.version == f.version(r.name)
        assert r.resource.type_url == ADDRESS_TYPE_URL
        decoded = workload_pb2.Address.FromString(r.resource.value)
        assert decoded == f.cache.get(ADDRESS_TYPE_URL, r.name).resource  # type: ignore[union-attr]
    assert s.node == NodeId("ztunnel", "10.0.0.5", "ztunnel-abc", "istio-system",
                            "istio-system.svc.cluster.local")


def test_first_request_of_an_empty_type_still_gets_a_response() -> None:
    cache = SnapshotCache()
    s = DeltaStream(cache)
    [resp] = s.handle_request(req(AUTHORIZATION_TYPE_URL, node=NODE))
    assert resp.type_url == AUTHORIZATION_TYPE_URL
    assert list(resp.resources) == [] and resp.nonce


def test_each_type_is_independent() -> None:
    f = Fixture()
    s = f.stream()
    [a] = s.handle_request(req(node=NODE))
    [p] = s.handle_request(req(AUTHORIZATION_TYPE_URL))
    assert names(a) == ["default/svc", "u/a", "u/b"] and names(p) == ["default/allow"]
    assert a.nonce != p.nonce
    # A change to one type pushes only that type.
    f.cache.apply(AUTHORIZATION_TYPE_URL, {"default/deny": pol("deny")})
    assert s.on_change(ADDRESS_TYPE_URL, {"default/deny"}) == []
    [push] = s.on_change(AUTHORIZATION_TYPE_URL, {"default/deny"})
    assert names(push) == ["default/deny"]


def test_named_subscription_reports_missing_names_and_follows_unsubscribe() -> None:
    f = Fixture()
    s = f.stream()
    [first] = s.handle_request(req(node=NODE, sub=("u/a", "u/missing")))
    assert names(first) == ["u/a"] and list(first.removed_resources) == ["u/missing"]
    # Later subscribe: only the new name is sent.
    [more] = s.handle_request(req(sub=("u/b",), nonce=first.nonce))
    assert names(more) == ["u/b"]
    # Changes to names not subscribed are not pushed.
    f.cache.apply(ADDRESS_TYPE_URL, {"default/svc": svc("svc2")})
    assert s.on_change(ADDRESS_TYPE_URL, {"default/svc"}) == []
    # Unsubscribe: no more pushes for it.
    assert s.handle_request(req(unsub=("u/a",), nonce=more.nonce)) == []
    f.cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", name="renamed")})
    assert s.on_change(ADDRESS_TYPE_URL, {"u/a"}) == []


# -- ACK and NACK --------------------------------------------------------------------------------


def test_ack_advances_and_sends_nothing() -> None:
    f = Fixture()
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE))
    assert s.handle_request(req(nonce=resp.nonce)) == []
    st = s.types[ADDRESS_TYPE_URL]
    assert (st.acks, st.nacks, st.acked_nonce, st.in_flight) == (1, 0, resp.nonce, {})


def test_stale_nonce_is_neither_ack_nor_nack() -> None:
    f = Fixture()
    s = f.stream()
    s.handle_request(req(node=NODE))
    assert s.handle_request(req(nonce="not-ours", error="boom")) == []
    st = s.types[ADDRESS_TYPE_URL]
    assert (st.acks, st.nacks) == (0, 0)


def test_nack_is_logged_with_node_type_names_reason_and_not_resent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = Fixture()
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE))
    f.cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", ip=b"\x01\x02\x03")})  # a bad change
    [push] = s.on_change(ADDRESS_TYPE_URL, {"u/a"})
    s.handle_request(req(nonce=resp.nonce))
    with caplog.at_level(logging.WARNING, logger="controlplane.xds"):
        out = s.handle_request(req(nonce=push.nonce,
                                   error="u/a: workload u/a: address of 3 bytes"))
    assert out == []
    assert s.types[ADDRESS_TYPE_URL].nacks == 1
    [rec] = [r for r in caplog.records if "NACK" in r.getMessage()]
    msg = rec.getMessage()
    assert NODE in msg and ADDRESS_TYPE_URL in msg
    assert "rejected u/a:" in msg and "address of 3 bytes" in msg
    # Another change elsewhere: the NACKed version of u/a is not re-sent with it.
    f.cache.apply(ADDRESS_TYPE_URL, {"u/c": wl("u/c", b"\x0a\0\0\3")})
    [next_push] = s.on_change(ADDRESS_TYPE_URL, {"u/a", "u/c"})
    assert names(next_push) == ["u/c"]
    # Once u/a's content changes again, it is pushed.
    f.cache.apply(ADDRESS_TYPE_URL, {"u/a": wl("u/a", ip=b"\x0a\0\0\x09")})
    [fixed] = s.on_change(ADDRESS_TYPE_URL, {"u/a"})
    assert names(fixed) == ["u/a"]


def test_nack_without_names_still_logs() -> None:
    assert parse_rejected_names("u/a: bad; u/b: worse; junk", ["u/a", "u/b", "u/c"]) == [
        "u/a", "u/b"]
    assert parse_rejected_names("something failed", ["u/a"]) == []
    assert parse_rejected_names("x: y", ["u/a"]) == []  # not a name of that response


# -- pushes -----------------------------------------------------------------------------------


def test_a_change_pushes_only_changed_resources() -> None:
    f = Fixture()
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE))
    s.handle_request(req(nonce=resp.nonce))
    changed = f.cache.apply(ADDRESS_TYPE_URL, {
        "u/a": wl("u/a"),                      # same content: not a change
        "u/b": wl("u/b", b"\x0a\0\0\x07"),     # changed
    })
    assert changed == {"u/b"}
    [push] = s.on_change(ADDRESS_TYPE_URL, changed)
    assert names(push) == ["u/b"] and push.resources[0].version == f.version("u/b")
    assert list(push.removed_resources) == []
    # Told about a name whose content it already has: nothing to send.
    assert s.on_change(ADDRESS_TYPE_URL, {"u/a", "u/b"}) == []


def test_removals_are_pushed_once() -> None:
    f = Fixture()
    s = f.stream()
    s.handle_request(req(node=NODE))
    changed = f.cache.apply(ADDRESS_TYPE_URL, removals={"u/a", "u/never"})
    assert changed == {"u/a"}
    [push] = s.on_change(ADDRESS_TYPE_URL, changed)
    assert list(push.removed_resources) == ["u/a"] and names(push) == []
    assert s.on_change(ADDRESS_TYPE_URL, {"u/a"}) == []


def test_system_version_info_follows_the_cache() -> None:
    f = Fixture()
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE))
    assert resp.system_version_info == str(f.cache.system_version)
    f.cache.apply(ADDRESS_TYPE_URL, removals={"u/a"})
    [push] = s.on_change(ADDRESS_TYPE_URL, {"u/a"})
    assert int(push.system_version_info) == int(resp.system_version_info) + 1


# -- reconnect ----------------------------------------------------------------------------------


def test_reconnect_with_initial_resource_versions_gets_only_differences() -> None:
    f = Fixture()
    initial = {
        "u/a": f.version("u/a"),         # up to date: not re-sent
        "u/b": "0123456789abcdef",       # stale: re-sent
        "u/gone": "fedcba9876543210",    # no longer exists: removed
        # "default/svc" not claimed: sent
    }
    s = f.stream()
    [resp] = s.handle_request(req(node=NODE, sub=("*",), initial=initial))
    assert names(resp) == ["default/svc", "u/b"]
    assert list(resp.removed_resources) == ["u/gone"]


def test_initial_versions_only_count_on_the_first_request_of_a_type() -> None:
    f = Fixture()
    s = f.stream()
    s.handle_request(req(node=NODE))
    assert s.handle_request(req(initial={"u/a": "zzz"})) == []
    assert s.types[ADDRESS_TYPE_URL].known["u/a"] == f.version("u/a")


def test_reconnect_after_identical_restart_sends_nothing_new() -> None:
    """Versions are content hashes: a fresh cache with the same content has the same versions."""
    first = Fixture()
    s1 = first.stream()
    [resp] = s1.handle_request(req(node=NODE))
    held = {r.name: r.version for r in resp.resources}
    second = Fixture()  # a restarted control plane, rebuilt from the same objects
    [again] = second.stream().handle_request(req(node=NODE, initial=held))
    assert names(again) == [] and list(again.removed_resources) == []


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_type_url_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    f = Fixture()
    s = f.stream()
    with caplog.at_level(logging.WARNING, logger="controlplane.xds"):
        assert s.handle_request(req("type.googleapis.com/istio.workload.Workload",
                                    node=NODE)) == []
    assert "does not serve" in caplog.text and "istio.workload.Workload" in caplog.text
    assert s.types == {}
    [resp] = s.handle_request(req())  # the stream still works
    assert len(resp.resources) == 3


@pytest.mark.parametrize(
    "node_id,fragment",
    [
        ("", "must carry node.id"),
        ("ztunnel~10.0.0.5~pod.ns", "3 '~'-separated parts"),
        ("ztunnel~10.0.0.5~pod.ns~ns.svc~extra", "5 '~'-separated parts"),
        ("envoy~10.0.0.5~pod.ns~ns.svc.cluster.local", "unknown proxy type 'envoy'"),
        ("ztunnel~10.0.0.500~pod.ns~ns.svc.cluster.local", "is not an IP address"),
        ("ztunnel~~pod.ns~ns.svc.cluster.local", "is not an IP address"),
        ("ztunnel~10.0.0.5~podns~ns.svc.cluster.local", "is not <pod>.<namespace>"),
        ("ztunnel~10.0.0.5~pod.~ns.svc.cluster.local", "is not <pod>.<namespace>"),
        ("ztunnel~10.0.0.5~pod.ns~", "empty DNS domain"),
    ],
)
def test_malformed_node_id_ends_the_stream(node_id: str, fragment: str) -> None:
    s = Fixture().stream()
    with pytest.raises(XdsError) as e:
        s.handle_request(req(node=node_id))
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.message
    if node_id:
        assert "POD_NAME, POD_NAMESPACE and INSTANCE_IP" in e.value.message


def test_first_request_without_node_is_refused() -> None:
    s = Fixture().stream()
    with pytest.raises(XdsError, match="must carry node.id"):
        s.handle_request(req())


@pytest.mark.parametrize(
    "node_id,expected",
    [
        (NODE, NodeId("ztunnel", "10.0.0.5", "ztunnel-abc", "istio-system",
                      "istio-system.svc.cluster.local")),
        ("sidecar~fd00::1~web.v1-abc.prod~prod.svc.cluster.local",
         NodeId("sidecar", "fd00::1", "web.v1-abc", "prod", "prod.svc.cluster.local")),
        ("router~10.1.2.3~waypoint-x.ns~ns.svc.example.org",
         NodeId("router", "10.1.2.3", "waypoint-x", "ns", "ns.svc.example.org")),
    ],
)
def test_node_id_parses(node_id: str, expected: NodeId) -> None:
    assert NodeId.parse(node_id) == expected
    assert str(expected) == node_id


# -- pure helpers ----------------------------------------------------------------------------------


def test_compute_delta_table() -> None:
    cache = SnapshotCache()
    cache.apply(ADDRESS_TYPE_URL, {"a": wl("a"), "b": wl("b", b"\x0a\0\0\2")})
    res = cache.resources(ADDRESS_TYPE_URL)
    va = res["a"].version
    everything = lambda n: True  # noqa: E731
    cases = [
        # known, names, subscribed, report_missing -> (send, removed)
        ({}, {"a", "b"}, everything, False, (["a", "b"], [])),
        ({"a": va}, {"a", "b"}, everything, False, (["b"], [])),
        ({"a": "old"}, {"a"}, everything, False, (["a"], [])),
        ({"x": "1"}, {"x"}, everything, False, ([], ["x"])),
        ({}, {"x"}, everything, False, ([], [])),
        ({}, {"x"}, everything, True, ([], ["x"])),
        ({}, {"a", "b"}, lambda n: n == "b", False, (["b"], [])),
        ({}, {"*"}, everything, True, ([], [])),
    ]
    for known, names_, sub, missing, expected in cases:
        assert compute_delta(res, known, names_, sub, report_missing=missing) == expected


def test_cache_versions_are_content_hashes_and_only_changes_notify() -> None:
    cache = SnapshotCache()
    heard: list[tuple[str, frozenset[str]]] = []
    unwatch = cache.watch(lambda t, n: heard.append((t, n)))
    assert cache.apply(ADDRESS_TYPE_URL, {"a": wl("a")}) == {"a"}
    v = cache.get(ADDRESS_TYPE_URL, "a")
    assert v is not None and v.version == resource_version(wl("a").SerializeToString(
        deterministic=True)) and len(v.version) == 16
    version, proto = cache.resources(ADDRESS_TYPE_URL)["a"][:2]
    assert version == v.version and proto == wl("a")
    assert cache.apply(ADDRESS_TYPE_URL, {"a": wl("a")}) == set()  # same content
    assert cache.apply(ADDRESS_TYPE_URL, removals={"nope"}) == set()
    assert heard == [(ADDRESS_TYPE_URL, frozenset({"a"}))] and cache.system_version == 1
    # Removal and upsert of one name in one batch: the upsert wins.
    assert cache.apply(ADDRESS_TYPE_URL, {"a": wl("a", name="x")}, {"a"}) == {"a"}
    assert cache.get(ADDRESS_TYPE_URL, "a") is not None
    unwatch()
    unwatch()
    cache.apply(ADDRESS_TYPE_URL, removals={"a"})
    assert len(heard) == 2 and cache.watcher_count == 0
    with pytest.raises(ValueError, match="empty name"):
        cache.apply(ADDRESS_TYPE_URL, {"": wl("z")})


def test_cache_apply_changes_and_replace() -> None:
    @dataclass
    class Changes:
        upserts: dict
        removals: dict

    cache = SnapshotCache()
    heard: list[tuple[str, frozenset[str]]] = []
    cache.watch(lambda t, n: heard.append((t, n)))
    out = cache.apply_changes(Changes(
        {ADDRESS_TYPE_URL: {"a": wl("a")}, AUTHORIZATION_TYPE_URL: {"ns/p": pol("p", "ns")}},
        {AUTHORIZATION_TYPE_URL: {"ns/old"}},
    ))
    assert out == {ADDRESS_TYPE_URL: {"a"}, AUTHORIZATION_TYPE_URL: {"ns/p"}}
    assert cache.system_version == 1 and len(heard) == 2
    assert cache.replace(ADDRESS_TYPE_URL, {"b": wl("b")}) == {"a", "b"}
    assert set(cache.resources(ADDRESS_TYPE_URL)) == {"b"}


def test_a_broken_watcher_does_not_stop_the_others() -> None:
    cache = SnapshotCache()
    heard = []

    def broken(t: str, n: frozenset[str]) -> None:
        raise RuntimeError("boom")

    cache.watch(broken)
    cache.watch(lambda t, n: heard.append(n))
    cache.apply(ADDRESS_TYPE_URL, {"a": wl("a")})
    assert heard == [{"a"}]


# -- authentication -----------------------------------------------------------------------------


def test_authenticators() -> None:
    peer = SpiffeId("cluster.local", "istio-system", "ztunnel")
    assert allow_all({}, None) == Caller()
    assert allow_all({}, peer) == Caller(peer.uri, "x509")
    assert client_certificate({"clusterid": "c1"}, peer) == Caller(peer.uri, "x509", "c1")
    with pytest.raises(AuthenticationError, match="no client certificate"):
        client_certificate({}, None)
    ctx = {"transport_security_type": [b"ssl"],
           "x509_subject_alternative_name": [b"istiod.example", peer.uri.encode()]}
    assert peer_identity(ctx) == peer
    assert peer_identity({"peer_spiffe_id": [b"spiffe://bad domain/x"]}) is None
    assert peer_identity({}) is None
