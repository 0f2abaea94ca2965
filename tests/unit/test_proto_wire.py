"""Wire-format checks for our .proto files against hand-computed encodings.

Every expected byte string below was worked out by hand from the field numbers in the Istio /
Envoy contract: a tag is the varint of ``(field_number << 3) | wire_type`` (wire type 0 =
varint, 2 = length-delimited), so e.g. Workload.uid (20, LEN) is 162 = varint ``a2 01``.
If a field number drifts, these tests break.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf import any_pb2, duration_pb2, empty_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient import api
from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2
from ambient.api.google.rpc import status_pb2
from ambient.api.istio.security import authorization_pb2 as sec
from ambient.api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ambient.api.istio.workload import workload_pb2 as wl
from ambient.api.istio.workload.zds import zds_pb2 as zds

IP_10_0_0_1 = bytes([10, 0, 0, 1])


def h(text: str) -> bytes:
    """Hex with whitespace, for readable literals."""
    return bytes.fromhex(text)


def _zds_del(uid: str) -> zds.WorkloadRequest:
    # `del` is a Python keyword, so the oneof member needs the kwargs form.
    return zds.WorkloadRequest(**{"del": zds.DelWorkload(uid=uid)})


# (id, builder, expected bytes). Builders are callables so that a construction error fails only
# that case.
CASES: list[tuple[str, Callable[[], Message], bytes]] = [
    # ---------------------------------------------------------------- istio.workload.Workload
    ("workload-uid", lambda: wl.Workload(uid="x"), h("a2 01 01 78")),
    # Lower field numbers are written first: name (1) before uid (20).
    ("workload-name-uid", lambda: wl.Workload(uid="x", name="a"), h("0a 01 61  a2 01 01 78")),
    ("workload-addresses", lambda: wl.Workload(addresses=[IP_10_0_0_1]), h("1a 04 0a 00 00 01")),
    (
        "workload-addresses-v4-v6",
        lambda: wl.Workload(addresses=[IP_10_0_0_1, bytes(15) + b"\x01"]),
        h("1a 04 0a 00 00 01  1a 10" + " 00" * 15 + " 01"),
    ),
    ("workload-network", lambda: wl.Workload(network="n"), h("22 01 6e")),
    (
        "workload-canonical",
        lambda: wl.Workload(canonical_name="c", canonical_revision="v"),
        h("52 01 63  5a 01 76"),
    ),
    ("workload-workload-name", lambda: wl.Workload(workload_name="w"), h("6a 01 77")),
    (
        "workload-network-gateway",
        lambda: wl.Workload(network_gateway=wl.GatewayAddress(hbone_mtls_port=15008)),
        # 15008 = 117*128 + 32 -> a0 75; GatewayAddress = 18 a0 75; field 19 LEN = 154 = 9a 01
        h("9a 01 03 18 a0 75"),
    ),
    (
        "workload-full",
        lambda: wl.Workload(
            uid="u",
            name="n",
            namespace="ns",
            addresses=[IP_10_0_0_1],
            tunnel_protocol=wl.HBONE,
            trust_domain="td",
            service_account="sa",
            waypoint=wl.GatewayAddress(
                address=wl.NetworkAddress(address=bytes([10, 0, 0, 2])), hbone_mtls_port=15008
            ),
            node="nd",
            workload_type=wl.POD,
            native_tunnel=True,
            authorization_policies=["ns/p"],
            status=wl.UNHEALTHY,
            cluster_id="c",
            hostname="h",
            services={"ns/s": wl.PortList(ports=[wl.Port(service_port=80, target_port=8080)])},
            application_tunnel=wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.PROXY),
            locality=wl.Locality(region="r", zone="z", subzone="s"),
            network_mode=wl.HOST_NETWORK,
            extensions=[wl.Extension(name="e")],
            capacity=wrappers_pb2.UInt32Value(value=2),
        ),
        h(
            "0a 01 6e"  # 1 name
            " 12 02 6e 73"  # 2 namespace
            " 1a 04 0a 00 00 01"  # 3 addresses
            " 28 01"  # 5 tunnel_protocol HBONE
            " 32 02 74 64"  # 6 trust_domain
            " 3a 02 73 61"  # 7 service_account
            " 42 0b 12 06 12 04 0a 00 00 02 18 a0 75"  # 8 waypoint{address{address}, 15008}
            " 4a 02 6e 64"  # 9 node
            " 60 02"  # 12 workload_type POD
            " 70 01"  # 14 native_tunnel
            " 82 01 04 6e 73 2f 70"  # 16 authorization_policies
            " 88 01 01"  # 17 status UNHEALTHY
            " 92 01 01 63"  # 18 cluster_id
            " a2 01 01 75"  # 20 uid
            " aa 01 01 68"  # 21 hostname
            # 22 services: entry{1: "ns/s", 2: PortList{1: Port{80, 8080 = 90 3f}}}
            " b2 01 0f 0a 04 6e 73 2f 73 12 07 0a 05 08 50 10 90 3f"
            " ba 01 02 08 01"  # 23 application_tunnel{PROXY}
            " c2 01 09 0a 01 72 12 01 7a 1a 01 73"  # 24 locality
            " c8 01 01"  # 25 network_mode HOST_NETWORK
            " d2 01 03 0a 01 65"  # 26 extensions
            " da 01 02 08 02"  # 27 capacity{2}
        ),
    ),
    # ------------------------------------------------------------------ istio.workload.Address
    ("address-workload", lambda: wl.Address(workload=wl.Workload(uid="x")), h("0a 04 a2 01 01 78")),
    ("address-service", lambda: wl.Address(service=wl.Service(hostname="h")), h("12 03 1a 01 68")),
    ("address-empty-workload", lambda: wl.Address(workload=wl.Workload()), h("0a 00")),
    # ------------------------------------------------------------------ istio.workload.Service
    (
        "service-subject-alt-names",
        lambda: wl.Service(subject_alt_names=["a", "b"]),
        h("32 01 61  32 01 62"),
    ),
    (
        "service-full",
        lambda: wl.Service(
            name="s",
            namespace="ns",
            hostname="s.ns",
            addresses=[wl.NetworkAddress(network="n1", address=bytes([10, 96, 0, 1]))],
            ports=[wl.Port(service_port=443, target_port=8443, app_protocol=wl.HTTP2)],
            subject_alt_names=["spiffe://a"],
            waypoint=wl.GatewayAddress(
                hostname=wl.NamespacedHostname(namespace="w", hostname="wp"),
                hbone_mtls_port=15008,
            ),
            load_balancing=wl.LoadBalancing(
                routing_preference=[wl.LoadBalancing.NETWORK, wl.LoadBalancing.REGION],
                mode=wl.LoadBalancing.FAILOVER,
                health_policy=wl.LoadBalancing.ALLOW_ALL,
            ),
            ip_families=wl.DUAL,
            extensions=[wl.Extension(name="x", config=any_pb2.Any(type_url="t", value=b"v"))],
            canonical=True,
            ingress_use_waypoint=True,
            weighted_waypoints=[
                wl.WeightedWaypoint(destination=wl.GatewayAddress(hbone_mtls_port=1), weight=7)
            ],
            visibility=wl.Service.NAMESPACE,
        ),
        h(
            "0a 01 73"  # 1 name
            " 12 02 6e 73"  # 2 namespace
            " 1a 04 73 2e 6e 73"  # 3 hostname
            " 22 0a 0a 02 6e 31 12 04 0a 60 00 01"  # 4 addresses
            " 2a 08 08 bb 03 10 fb 41 18 02"  # 5 ports{443, 8443, HTTP2}
            " 32 0a 73 70 69 66 66 65 3a 2f 2f 61"  # 6 subject_alt_names
            " 3a 0c 0a 07 0a 01 77 12 02 77 70 18 a0 75"  # 7 waypoint{hostname, 15008}
            " 42 08 0a 02 06 01 10 02 18 01"  # 8 load_balancing (packed enum list)
            " 48 03"  # 9 ip_families DUAL
            " 52 0b 0a 01 78 12 06 0a 01 74 12 01 76"  # 10 extensions{name, Any}
            " 58 01"  # 11 canonical
            " 60 01"  # 12 ingress_use_waypoint
            " 6a 06 0a 02 18 01 10 07"  # 13 weighted_waypoints
            " 70 01"  # 14 visibility NAMESPACE
        ),
    ),
    # ------------------------------------------------------------------ istio.workload parts
    (
        "network-address-cidr-zero-length",
        # `length` is proto3 optional: an explicit 0 is still written.
        lambda: wl.NetworkAddress(address=bytes(4), length=0),
        h("12 04 00 00 00 00  18 00"),
    ),
    ("network-address-no-length", lambda: wl.NetworkAddress(network="n"), h("0a 01 6e")),
    (
        "port",
        lambda: wl.Port(service_port=1, target_port=2, app_protocol=wl.TLS),
        h("08 01 10 02 18 05"),
    ),
    (
        "application-tunnel",
        lambda: wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.PROXY, port=15001),
        # 15001 = 117*128 + 25 -> 99 75
        h("08 01 10 99 75"),
    ),
    # ----------------------------------------------------------- istio.security.Authorization
    (
        "authorization",
        lambda: sec.Authorization(
            name="p",
            namespace="ns",
            scope=sec.WORKLOAD_SELECTOR,
            action=sec.DENY,
            groups=[sec.Group(rules=[sec.Rules(matches=[sec.Match(destination_ports=[80, 443])])])],
            dry_run=True,
        ),
        h(
            "0a 01 70  12 02 6e 73  18 02  20 01"
            " 2a 09 0a 07 12 05 4a 03 50 bb 03"  # groups -> rules -> matches -> ports (packed)
            " 30 01"
        ),
    ),
    (
        "authorization-extensions",
        lambda: sec.Authorization(extensions=[wl.Extension(name="e")]),
        h("3a 03 0a 01 65"),
    ),
    ("authorization-empty-group", lambda: sec.Authorization(groups=[sec.Group()]), h("2a 00")),
    (
        "match-destination-ports-packed",
        lambda: sec.Match(destination_ports=[15008]),
        h("4a 02 a0 75"),
    ),
    (
        "match-all-fields",
        lambda: sec.Match(
            namespaces=[sec.StringMatch(exact="a")],
            not_namespaces=[sec.StringMatch(prefix="b")],
            principals=[sec.StringMatch(suffix="c")],
            not_principals=[sec.StringMatch(presence=empty_pb2.Empty())],
            source_ips=[sec.Address(address=bytes([10, 0, 0, 0]), length=8)],
            not_source_ips=[sec.Address(address=bytes([127, 0, 0, 1]), length=32)],
            destination_ips=[sec.Address(address=bytes(15) + b"\x01", length=128)],
            not_destination_ips=[sec.Address()],
            destination_ports=[15008],
            not_destination_ports=[9999],
            service_accounts=[sec.ServiceAccountMatch(namespace="ns", serviceAccount="sa")],
            not_service_accounts=[sec.ServiceAccountMatch(serviceAccount="x")],
            extensions=[wl.Extension(name="e")],
        ),
        h(
            "0a 03 0a 01 61"  # 1 namespaces{exact}
            " 12 03 12 01 62"  # 2 not_namespaces{prefix}
            " 1a 03 1a 01 63"  # 3 principals{suffix}
            " 22 02 22 00"  # 4 not_principals{presence{}}
            " 2a 08 0a 04 0a 00 00 00 10 08"  # 5 source_ips 10.0.0.0/8
            " 32 08 0a 04 7f 00 00 01 10 20"  # 6 not_source_ips 127.0.0.1/32
            " 3a 15 0a 10" + " 00" * 15 + " 01 10 80 01"  # 7 destination_ips ::1/128
            " 42 00"  # 8 not_destination_ips{}
            " 4a 02 a0 75"  # 9 destination_ports [15008]
            " 52 02 8f 4e"  # 10 not_destination_ports [9999]
            " 5a 08 0a 02 6e 73 12 02 73 61"  # 11 service_accounts
            " 62 03 12 01 78"  # 12 not_service_accounts
            " 6a 03 0a 01 65"  # 13 extensions
        ),
    ),
    # ---------------------------------------------------------------- istio.workload.zds
    ("zds-hello", lambda: zds.ZdsHello(version=zds.V1), h("08 01")),
    (
        "zds-add",
        lambda: zds.WorkloadRequest(
            add=zds.AddWorkload(
                uid="u1",
                workload_info=zds.WorkloadInfo(name="p", namespace="ns", service_account="sa"),
            )
        ),
        h("0a 11  0a 02 75 31  12 0b 0a 01 70 12 02 6e 73 1a 02 73 61"),
    ),
    (
        "zds-keep",
        lambda: zds.WorkloadRequest(keep=zds.KeepWorkload(uid="u1")),
        h("2a 04 0a 02 75 31"),
    ),
    ("zds-del", lambda: _zds_del("u1"), h("12 04 12 02 75 31")),
    ("zds-del-uid-tag", lambda: zds.DelWorkload(uid="u"), h("12 01 75")),
    (
        "zds-snapshot-sent",
        lambda: zds.WorkloadRequest(snapshot_sent=zds.SnapshotSent()),
        h("1a 00"),
    ),
    ("zds-ack-ok", lambda: zds.WorkloadResponse(ack=zds.Ack()), h("0a 00")),
    (
        "zds-ack-error",
        lambda: zds.WorkloadResponse(ack=zds.Ack(error="no")),
        h("0a 04 0a 02 6e 6f"),
    ),
    ("zds-ack-error-tag", lambda: zds.Ack(error="e"), h("0a 01 65")),
    # ------------------------------------------------------------------ istio.v1.auth
    (
        "ca-request",
        lambda: ca_pb2.IstioCertificateRequest(
            csr="C",
            validity_duration=86400,
            metadata=struct_pb2.Struct(
                fields={"ImpersonatedIdentity": struct_pb2.Value(string_value="s")}
            ),
        ),
        h(
            "0a 01 43"  # 1 csr
            " 18 80 a3 05"  # 3 validity_duration 86400 = 5*16384 + 35*128 + 0
            " 22 1d 0a 1b 0a 14"  # 4 metadata{fields entry{key (20 bytes)
        )
        + b"ImpersonatedIdentity"
        + h("12 03 1a 01 73"),  # value{string_value "s"}}}
    ),
    (
        "ca-request-negative-validity",
        lambda: ca_pb2.IstioCertificateRequest(validity_duration=-1),
        h("18" + " ff" * 9 + " 01"),
    ),
    (
        "ca-response",
        lambda: ca_pb2.IstioCertificateResponse(cert_chain=["a", "b"]),
        h("0a 01 61  0a 01 62"),
    ),
    # ------------------------------------------------------------------ envoy / google.rpc
    (
        "delta-request",
        lambda: discovery_pb2.DeltaDiscoveryRequest(
            node=base_pb2.Node(id="z"),
            type_url=api.ADDRESS_TYPE_URL,
            resource_names_subscribe=["*"],
            resource_names_unsubscribe=["*"],
            initial_resource_versions={"a": "1"},
            response_nonce="n",
            error_detail=status_pb2.Status(code=3, message="m"),
        ),
        h("0a 03 0a 01 7a  12 2a")  # node{id}; type_url is 42 bytes long
        + b"type.googleapis.com/istio.workload.Address"
        + h(
            "1a 01 2a"  # 3 subscribe "*"
            " 22 01 2a"  # 4 unsubscribe "*"
            " 2a 06 0a 01 61 12 01 31"  # 5 initial_resource_versions {"a": "1"}
            " 32 01 6e"  # 6 response_nonce
            " 3a 05 08 03 12 01 6d"  # 7 error_detail{code 3, message}
        ),
    ),
    (
        "delta-response",
        lambda: discovery_pb2.DeltaDiscoveryResponse(
            system_version_info="v",
            resources=[
                discovery_pb2.Resource(
                    version="1",
                    name="r",
                    resource=any_pb2.Any(type_url="t", value=b"x"),
                    aliases=["al"],
                )
            ],
            type_url="t",
            nonce="n",
            removed_resources=["gone"],
            control_plane=base_pb2.ControlPlane(identifier="i"),
        ),
        h(
            "0a 01 76"  # 1 system_version_info
            " 12 12 0a 01 31 12 06 0a 01 74 12 01 78 1a 01 72 22 02 61 6c"  # 2 resources
            " 22 01 74"  # 4 type_url
            " 2a 01 6e"  # 5 nonce
            " 32 04 67 6f 6e 65"  # 6 removed_resources
            " 3a 03 0a 01 69"  # 7 control_plane
        ),
    ),
    (
        "resource-ttl-cache-control",
        lambda: discovery_pb2.Resource(
            ttl=duration_pb2.Duration(seconds=5),
            cache_control=discovery_pb2.Resource.CacheControl(do_not_cache=True),
        ),
        h("32 02 08 05  3a 02 08 01"),
    ),
    (
        "node",
        lambda: base_pb2.Node(
            id="i",
            cluster="c",
            metadata=struct_pb2.Struct(),
            locality=base_pb2.Locality(region="r", zone="z", sub_zone="s"),
            user_agent_name="ambient",
            user_agent_version="0.1",
            client_features=["f"],
        ),
        h("0a 01 69  12 01 63  1a 00  22 09 0a 01 72 12 01 7a 1a 01 73  32 07")
        + b"ambient"
        + h("3a 03")
        + b"0.1"
        + h("52 01 66"),
    ),
    (
        "status",
        lambda: status_pb2.Status(code=14, details=[any_pb2.Any(type_url="t")]),
        h("08 0e  1a 03 0a 01 74"),
    ),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_encoding_matches_hand_computed_bytes(
    build: Callable[[], Message], expected: bytes
) -> None:
    msg = build()
    assert msg.SerializeToString(deterministic=True) == expected
    back = type(msg)()
    back.ParseFromString(expected)
    assert back == msg


def test_workload_uid_tag_arithmetic() -> None:
    # The docstring's worked example, spelled out: (20 << 3) | 2 = 162 -> varint a2 01.
    assert (20 << 3) | 2 == 162 == 0xA2
    assert wl.Workload(uid="x").SerializeToString()[:2] == b"\xa2\x01"


def test_ztunnel_rule_clause_bytes_decode_as_groups() -> None:
    # ztunnel's copy names Authorization field 5 `rules` (Rule{clauses=1}, Clause{matches=2}).
    # The bytes it would produce are field 5 -> field 1 -> field 2 -> Match, i.e. ours.
    ztunnel_bytes = h("2a 08 0a 06 12 04 4a 02 a0 75")
    msg = sec.Authorization.FromString(ztunnel_bytes)
    assert list(msg.groups[0].rules[0].matches[0].destination_ports) == [15008]


def test_unpacked_ports_are_accepted() -> None:
    # Producers may send repeated scalars unpacked (tag 0x48, varint); parsers must accept it.
    msg = sec.Match.FromString(h("48 50  48 bb 03"))
    assert list(msg.destination_ports) == [80, 443]


def test_unknown_fields_round_trip() -> None:
    # A newer peer may add fields; they must survive a parse/serialize cycle (proxies re-emit).
    data = h("a2 01 01 78  f8 07 2a")  # uid="x", then unknown field 127 varint 42
    msg = wl.Workload.FromString(data)
    assert msg.uid == "x"
    assert msg.SerializeToString() == data


def test_workload_reserved_field_15_is_not_declared() -> None:
    assert 15 not in wl.Workload.DESCRIPTOR.fields_by_number
    assert 4 not in wl.GatewayAddress.DESCRIPTOR.fields_by_number
    assert 4 not in zds.WorkloadInfo.DESCRIPTOR.fields_by_number


def test_type_urls() -> None:
    assert api.ADDRESS_TYPE_URL == "type.googleapis.com/" + wl.Address.DESCRIPTOR.full_name
    assert (
        api.AUTHORIZATION_TYPE_URL
        == "type.googleapis.com/" + sec.Authorization.DESCRIPTOR.full_name
    )
    packed = any_pb2.Any()
    packed.Pack(wl.Address(workload=wl.Workload(uid="x")))
    assert packed.type_url == api.ADDRESS_TYPE_URL
    packed.Pack(sec.Authorization(name="p"))
    assert packed.type_url == api.AUTHORIZATION_TYPE_URL


def test_full_names() -> None:
    assert wl.Workload.DESCRIPTOR.full_name == "istio.workload.Workload"
    assert zds.WorkloadRequest.DESCRIPTOR.full_name == "istio.workload.zds.WorkloadRequest"
    assert sec.StringMatch.DESCRIPTOR.full_name == "istio.security.StringMatch"
    assert ca_pb2.IstioCertificateRequest.DESCRIPTOR.full_name == (
        "istio.v1.auth.IstioCertificateRequest"
    )
    assert discovery_pb2.DeltaDiscoveryRequest.DESCRIPTOR.full_name == (
        "envoy.service.discovery.v3.DeltaDiscoveryRequest"
    )
    assert base_pb2.Node.DESCRIPTOR.full_name == "envoy.config.core.v3.Node"
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"


def test_grpc_method_paths() -> None:
    ca = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    method = ca.methods_by_name["CreateCertificate"]
    assert f"/{ca.full_name}/{method.name}" == (
        "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    )
    assert not method.client_streaming and not method.server_streaming

    ads = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    delta = ads.methods_by_name["DeltaAggregatedResources"]
    assert f"/{ads.full_name}/{delta.name}" == (
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
    )
    assert delta.client_streaming and delta.server_streaming
    assert delta.input_type is discovery_pb2.DeltaDiscoveryRequest.DESCRIPTOR
    assert delta.output_type is discovery_pb2.DeltaDiscoveryResponse.DESCRIPTOR

    # The generated stubs exist with the expected names.
    assert hasattr(ca_pb2_grpc, "IstioCertificateServiceStub")
    assert hasattr(ca_pb2_grpc, "add_IstioCertificateServiceServicer_to_server")
    assert hasattr(ads_pb2_grpc, "AggregatedDiscoveryServiceStub")
    assert hasattr(ads_pb2_grpc, "add_AggregatedDiscoveryServiceServicer_to_server")


def test_json_names_match_local_config_yaml() -> None:
    # The local-config YAML and config_dump use these camelCase names.
    w = json_format.MessageToDict(
        wl.Workload(service_account="sa", trust_domain="td", canonical_name="c", uid="u")
    )
    assert w == {"serviceAccount": "sa", "trustDomain": "td", "canonicalName": "c", "uid": "u"}
    s = json_format.MessageToDict(wl.Service(subject_alt_names=["x"]))
    assert s == {"subjectAltNames": ["x"]}
    a = json_format.MessageToDict(
        sec.Authorization(
            dry_run=True,
            groups=[
                sec.Group(
                    rules=[
                        sec.Rules(
                            matches=[
                                sec.Match(
                                    not_destination_ports=[9999],
                                    service_accounts=[sec.ServiceAccountMatch(serviceAccount="sa")],
                                )
                            ]
                        )
                    ]
                )
            ],
        )
    )
    assert a == {
        "dryRun": True,
        "groups": [
            {
                "rules": [
                    {
                        "matches": [
                            {
                                "notDestinationPorts": [9999],
                                "serviceAccounts": [{"serviceAccount": "sa"}],
                            }
                        ]
                    }
                ]
            }
        ],
    }


def test_enum_values() -> None:
    assert (wl.NONE, wl.HBONE, wl.LEGACY_ISTIO_MTLS) == (0, 1, 2)
    assert [
        wl.AppProtocol.Value(n) for n in ("UNKNOWN", "HTTP11", "HTTP2", "GRPC", "TCP", "TLS")
    ] == list(range(6))
    assert (wl.HEALTHY, wl.UNHEALTHY) == (0, 1)
    assert (wl.DEPLOYMENT, wl.CRONJOB, wl.POD, wl.JOB) == (0, 1, 2, 3)
    assert (wl.STANDARD, wl.HOST_NETWORK) == (0, 1)
    assert (wl.AUTOMATIC, wl.IPV4_ONLY, wl.IPV6_ONLY, wl.DUAL) == (0, 1, 2, 3)
    assert (wl.Service.PUBLIC, wl.Service.NAMESPACE) == (0, 1)
    assert (wl.ApplicationTunnel.NONE, wl.ApplicationTunnel.PROXY) == (0, 1)
    assert [wl.LoadBalancing.Scope.Name(i) for i in range(7)] == [
        "UNSPECIFIED_SCOPE",
        "REGION",
        "ZONE",
        "SUBZONE",
        "NODE",
        "CLUSTER",
        "NETWORK",
    ]
    assert [wl.LoadBalancing.Mode.Name(i) for i in range(4)] == [
        "UNSPECIFIED_MODE",
        "STRICT",
        "FAILOVER",
        "PASSTHROUGH",
    ]
    assert (wl.LoadBalancing.ONLY_HEALTHY, wl.LoadBalancing.ALLOW_ALL) == (0, 1)
    assert (sec.GLOBAL, sec.NAMESPACE, sec.WORKLOAD_SELECTOR) == (0, 1, 2)
    assert (sec.ALLOW, sec.DENY) == (0, 1)
    assert (zds.NOT_USED, zds.V1) == (0, 1)


# ----------------------------------------------------------------------------- robustness

_MODULES = [wl, sec, zds, ca_pb2, discovery_pb2, base_pb2, status_pb2]
TOP_LEVEL = sorted(
    (
        cls
        for mod in _MODULES
        for cls in (getattr(mod, name) for name in mod.DESCRIPTOR.message_types_by_name)
    ),
    key=lambda c: c.DESCRIPTOR.full_name,
)
SAMPLES = [c[2] for c in CASES]


def test_top_level_message_list_is_complete() -> None:
    names = {c.DESCRIPTOR.full_name for c in TOP_LEVEL}
    expected = {
        *(
            f"istio.workload.{n}"
            for n in (
                "Address",
                "Workload",
                "Service",
                "GatewayAddress",
                "NetworkAddress",
                "NamespacedHostname",
                "Port",
                "PortList",
                "LoadBalancing",
                "Locality",
                "ApplicationTunnel",
                "WeightedWaypoint",
                "Extension",
            )
        ),
        *(
            f"istio.security.{n}"
            for n in (
                "Authorization",
                "Group",
                "Rules",
                "Match",
                "Address",
                "ServiceAccountMatch",
                "StringMatch",
            )
        ),
        *(
            f"istio.workload.zds.{n}"
            for n in (
                "ZdsHello",
                "WorkloadInfo",
                "AddWorkload",
                "KeepWorkload",
                "DelWorkload",
                "SnapshotSent",
                "Ack",
                "WorkloadRequest",
                "WorkloadResponse",
            )
        ),
        "istio.v1.auth.IstioCertificateRequest",
        "istio.v1.auth.IstioCertificateResponse",
        "envoy.service.discovery.v3.DeltaDiscoveryRequest",
        "envoy.service.discovery.v3.DeltaDiscoveryResponse",
        "envoy.service.discovery.v3.Resource",
        "envoy.config.core.v3.Node",
        "envoy.config.core.v3.Locality",
        "envoy.config.core.v3.ControlPlane",
        "google.rpc.Status",
    }
    assert names == expected


def _parse_or_decode_error(cls: type[Message], data: bytes) -> None:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        return
    # Whatever parsed must re-encode and re-parse to an equal message.
    again = cls()
    again.ParseFromString(msg.SerializeToString())
    assert again == msg


@settings(max_examples=400, deadline=None)
@given(cls=st.sampled_from(TOP_LEVEL), data=st.binary(max_size=256))
def test_random_bytes_parse_or_raise_decode_error(cls: type[Message], data: bytes) -> None:
    _parse_or_decode_error(cls, data)


@settings(max_examples=400, deadline=None)
@given(
    cls=st.sampled_from(TOP_LEVEL),
    sample=st.sampled_from(SAMPLES),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
def test_mutated_samples_parse_or_raise_decode_error(
    cls: type[Message], sample: bytes, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(sample[:cut] if cut < len(sample) else sample)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    _parse_or_decode_error(cls, bytes(data))
