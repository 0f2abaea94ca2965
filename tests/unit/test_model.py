"""Model conversions: proto -> model validation errors and lossless round trips."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import ipaddress

import pytest

from ambient.api.istio.security import authorization_pb2 as apb
from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.model import (
    Action,
    ApplicationTunnel,
    GatewayAddress,
    HealthStatus,
    LoadBalancing,
    Locality,
    Match,
    ModelError,
    NamespacedHostname,
    NetworkAddress,
    Policy,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    from_proto,
    to_proto,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network


def _wl(**kw):
    base = dict(uid="Kubernetes//Pod/ns1/a", name="a", namespace="ns1")
    base.update(kw)
    return wpb.Workload(**base)


def test_workload_defaults_like_ztunnel():
    w = from_proto(wpb.Address(workload=_wl(addresses=[bytes([10, 0, 0, 1])])))
    assert w.trust_domain == "cluster.local"
    assert w.service_account == "default"
    assert w.cluster_id == "Kubernetes"
    assert w.capacity == 1
    assert w.tunnel_protocol is TunnelProtocol.NONE
    assert w.status is HealthStatus.HEALTHY
    assert w.addresses == (ip("10.0.0.1"),)
    assert str(w.identity()) == "spiffe://cluster.local/ns/ns1/sa/default"


BAD_WORKLOADS = [
    ("empty uid", _wl(uid=""), "uid is empty"),
    ("short ip", _wl(addresses=[b"\x01\x02\x03"]), "addresses[0]: address has 3 bytes"),
    ("legacy tunnel", _wl(tunnel_protocol=wpb.LEGACY_ISTIO_MTLS), "tunnel_protocol"),
    ("unknown enum", _wl(status=7), "status has unknown value 7"),
    ("bad services key", _wl(services={"nohost": wpb.PortList()}), "not 'namespace/hostname'"),
    (
        "service port 0",
        _wl(services={"a/b": wpb.PortList(ports=[wpb.Port(service_port=0, target_port=1)])}),
        "port 0 is out of range",
    ),
    (
        "target port too big",
        _wl(services={"a/b": wpb.PortList(ports=[wpb.Port(service_port=80, target_port=70000)])}),
        "port 70000 is out of range",
    ),
    ("bad identity", _wl(service_account="Not_Valid"), "service account"),
    ("bad policy key", _wl(authorization_policies=["nokey"]), "authorization_policies[0]"),
    (
        "waypoint without destination",
        _wl(waypoint=wpb.GatewayAddress(hbone_mtls_port=15008)),
        "neither address nor hostname",
    ),
]


@pytest.mark.parametrize(
    "proto,msg", [c[1:] for c in BAD_WORKLOADS], ids=[c[0] for c in BAD_WORKLOADS]
)
def test_bad_workloads_name_resource_and_field(proto, msg):
    with pytest.raises(ModelError) as e:
        from_proto(proto)
    assert msg in str(e.value)
    if proto.uid:
        assert proto.uid in str(e.value)


BAD_SERVICES = [
    ("no hostname", wpb.Service(name="s", namespace="n"), "hostname is empty"),
    ("no namespace", wpb.Service(name="s", hostname="h"), "namespace is empty"),
    (
        "bad vip",
        wpb.Service(namespace="n", hostname="h", addresses=[wpb.NetworkAddress(address=b"\x01")]),
        "service n/h: addresses[0]",
    ),
    (
        "bad port",
        wpb.Service(namespace="n", hostname="h", ports=[wpb.Port(service_port=65536)]),
        "out of range",
    ),
]


@pytest.mark.parametrize(
    "proto,msg", [c[1:] for c in BAD_SERVICES], ids=[c[0] for c in BAD_SERVICES]
)
def test_bad_services(proto, msg):
    with pytest.raises(ModelError) as e:
        from_proto(proto)
    assert msg in str(e.value)


def _auth_with(match):
    return apb.Authorization(
        name="p", namespace="n", groups=[apb.Group(rules=[apb.Rules(matches=[match])])]
    )


BAD_POLICIES = [
    ("no name", apb.Authorization(namespace="n"), "name and namespace"),
    ("bad ip", _auth_with(apb.Match(source_ips=[apb.Address(address=b"12345")])),
     "groups[0].rules[0].matches[0].source_ips[0]"),
    ("prefix too long", _auth_with(apb.Match(source_ips=[apb.Address(address=b"\x01\x02\x03\x04", length=33)])),
     "prefix length 33"),
    ("port 0", _auth_with(apb.Match(destination_ports=[0])), "destination_ports"),
    ("bad scope", apb.Authorization(name="p", namespace="n", scope=9), "scope has unknown value"),
]  # fmt: skip


@pytest.mark.parametrize(
    "proto,msg", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES]
)
def test_bad_policies(proto, msg):
    with pytest.raises(ModelError) as e:
        from_proto(proto)
    assert msg in str(e.value)


def test_unset_string_match_is_dropped_like_ztunnel():
    p = from_proto(_auth_with(apb.Match(principals=[apb.StringMatch()])))
    assert p.groups[0][0][0].is_empty()


ROUND_TRIP = [
    Workload(uid="u1", name="a", namespace="ns"),
    Workload(
        uid="c//Pod/ns/b",
        name="b",
        namespace="ns",
        addresses=(ip("10.0.0.2"), ip("fd00::2")),
        hostname="b.example",
        network="net1",
        tunnel_protocol=TunnelProtocol.HBONE,
        trust_domain="td.example",
        service_account="sa-b",
        waypoint=GatewayAddress(NetworkAddress("net1", ip("10.0.0.9")), 15008),
        network_gateway=GatewayAddress(NamespacedHostname("gw", "eastwest.gw.svc"), 15009),
        node="node-1",
        native_tunnel=True,
        application_tunnel=ApplicationTunnel("PROXY", 15088),
        canonical_name="b",
        canonical_revision="v2",
        workload_name="b-deploy",
        workload_type="POD",
        services={"ns/s.ns.svc.cluster.local": {80: 8080, 443: 0}},
        authorization_policies=("ns/p1", "istio-system/x"),
        status=HealthStatus.UNHEALTHY,
        cluster_id="c",
        locality=Locality("r", "z", "sz"),
        network_mode="HOST_NETWORK",
        capacity=3,
    ),
    Service(name="s", namespace="ns", hostname="s.ns.svc.cluster.local"),
    Service(
        name="s",
        namespace="ns",
        hostname="s.ns.svc.cluster.local",
        vips=(NetworkAddress("", ip("10.96.0.1")), NetworkAddress("n2", ip("fd00::1"))),
        ports={80: 8080, 81: 0},
        subject_alt_names=("spiffe://cluster.local/ns/ns/sa/s",),
        waypoint=GatewayAddress(NamespacedHostname("ns", "wp.ns.svc.cluster.local")),
        load_balancing=LoadBalancing(("NETWORK", "NODE"), "FAILOVER", "ALLOW_ALL"),
        ip_families="DUAL",
        canonical=True,
    ),
    Policy("p", "ns"),
    Policy(
        "p",
        "ns",
        Scope.WORKLOAD_SELECTOR,
        Action.DENY,
        (
            (
                (
                    Match(
                        namespaces=(StringMatch("exact", "a"),),
                        not_namespaces=(StringMatch("prefix", "b"),),
                        principals=(StringMatch("suffix", "/sa/x"),),
                        not_principals=(StringMatch("presence"),),
                        source_ips=(net("10.0.0.0/8"),),
                        not_source_ips=(net("fd00::/64"),),
                        destination_ips=(net("192.168.1.1/32"),),
                        not_destination_ips=(net("0.0.0.0/0"),),
                        destination_ports=(80, 443),
                        not_destination_ports=(9999,),
                        service_accounts=(ServiceAccountMatch("ns", "sa"),),
                        not_service_accounts=(ServiceAccountMatch("ns", "bad"),),
                    ),
                    Match(),
                ),
                (),
            ),
            (),
        ),
        dry_run=True,
    ),
]


@pytest.mark.parametrize("obj", ROUND_TRIP, ids=lambda o: f"{type(o).__name__}-{o.key}")
def test_round_trip(obj):
    msg = to_proto(obj)
    again = from_proto(msg)
    assert again == obj
    # and through the wire bytes
    assert from_proto(type(msg).FromString(msg.SerializeToString())) == obj
    assert isinstance(obj.to_json(), dict)


def test_model_objects_are_immutable():
    w = ROUND_TRIP[1]
    with pytest.raises(AttributeError):
        w.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        w.services["ns/x"] = {}  # type: ignore[index]
    hash(w)


def test_policy_json_uses_ztunnel_spelling():
    js = ROUND_TRIP[-1].to_json()
    assert js["scope"] == "WorkloadSelector" and js["action"] == "Deny" and js["dryRun"] is True
    m = js["rules"][0][0][0]
    assert m["notPrincipals"] == [{"Presence": []}]
    assert m["sourceIps"] == ["10.0.0.0/8"]
    assert m["serviceAccounts"] == [{"namespace": "ns", "serviceAccount": "sa"}]
