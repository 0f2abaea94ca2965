"""Structured property tests for xDS inputs: resources built field by field (valid, odd and
invalid values) into ``model.from_proto`` and its round trip, response sequences into
ztunnel's client, request sequences into the control plane's ``DeltaStream``, node ids.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import pytest
from fuzz.hypo import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import discovery_pb2
from ambient.api.istio.security import authorization_pb2 as apb
from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.model import ModelError, from_proto, to_proto
from ambient.store import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, MeshStore
from controlplane.cache import SnapshotCache
from controlplane.xds import PROXY_TYPES, SUPPORTED_TYPES, DeltaStream, NodeId, XdsError
from ztunnel.xds_client import XdsClientState


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)  # rejected resources are logged by design
    yield
    logging.disable(logging.NOTSET)


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
names = st.one_of(label, st.sampled_from(["", "A", "a/b", "-x", "x" * 70]), st.text(max_size=8))
ip_bytes = st.one_of(st.ip_addresses().map(lambda ip: ip.packed), st.binary(max_size=17))
ports = st.one_of(st.integers(0, 65535), st.integers(0, 2**32 - 1))
enums = st.integers(0, 6)


@st.composite
def gateways(draw: st.DrawFn, out: Any) -> None:
    if draw(st.booleans()):
        out.address.network = draw(names)
        out.address.address = draw(ip_bytes)
    elif draw(st.booleans()):
        out.hostname.namespace = draw(names)
        out.hostname.hostname = draw(names)
    out.hbone_mtls_port = draw(ports)


@st.composite
def workloads(draw: st.DrawFn) -> wpb.Address:
    w = wpb.Workload(uid=draw(names), name=draw(names), namespace=draw(names),
                     addresses=draw(st.lists(ip_bytes, max_size=3)), hostname=draw(names),
                     network=draw(names), trust_domain=draw(names),
                     service_account=draw(names), node=draw(names),
                     canonical_name=draw(names), workload_name=draw(names),
                     authorization_policies=draw(st.lists(names, max_size=2)),
                     cluster_id=draw(names))
    w.tunnel_protocol = draw(enums)
    w.workload_type = draw(enums)
    w.status = draw(enums)
    w.network_mode = draw(enums)
    if draw(st.booleans()):
        draw(gateways(w.waypoint))
    if draw(st.booleans()):
        draw(gateways(w.network_gateway))
    if draw(st.booleans()):
        w.application_tunnel.protocol = draw(enums)
        w.application_tunnel.port = draw(ports)
    for key in draw(st.lists(st.one_of(st.just("ns/svc.ns.svc"), names), max_size=2)):
        for _ in range(draw(st.integers(0, 2))):
            p = w.services[key].ports.add()
            p.service_port, p.target_port = draw(ports), draw(ports)
    if draw(st.booleans()):
        w.locality.region = draw(names)
    if draw(st.booleans()):
        w.capacity.value = draw(ports)
    return wpb.Address(workload=w)


@st.composite
def services(draw: st.DrawFn) -> wpb.Address:
    s = wpb.Service(name=draw(names), namespace=draw(names), hostname=draw(names),
                    subject_alt_names=draw(st.lists(names, max_size=2)))
    for _ in range(draw(st.integers(0, 2))):
        s.addresses.add(network=draw(names), address=draw(ip_bytes))
    for _ in range(draw(st.integers(0, 2))):
        s.ports.add(service_port=draw(ports), target_port=draw(ports))
    if draw(st.booleans()):
        draw(gateways(s.waypoint))
    if draw(st.booleans()):
        s.load_balancing.routing_preference.extend(draw(st.lists(st.integers(0, 8), max_size=3)))
        s.load_balancing.mode = draw(enums)
    s.ip_families = draw(enums)
    return wpb.Address(service=s)


@st.composite
def policies(draw: st.DrawFn) -> apb.Authorization:
    a = apb.Authorization(name=draw(names), namespace=draw(names), dry_run=draw(st.booleans()))
    a.scope = draw(enums)
    a.action = draw(enums)
    for _ in range(draw(st.integers(0, 2))):
        rule = a.groups.add().rules.add()
        for _ in range(draw(st.integers(0, 2))):
            m = rule.matches.add()
            for _ in range(draw(st.integers(0, 2))):
                sm = m.principals.add()
                kind = draw(st.sampled_from(["exact", "prefix", "suffix", "presence", None]))
                if kind == "presence":
                    sm.presence.SetInParent()
                elif kind:
                    setattr(sm, kind, draw(names))
            for _ in range(draw(st.integers(0, 2))):
                m.source_ips.add(address=draw(ip_bytes), length=draw(st.integers(0, 200)))
            m.destination_ports.extend(draw(st.lists(ports, max_size=2)))
            if draw(st.booleans()):
                m.service_accounts.add(namespace=draw(names), serviceAccount=draw(names))
    return a


resources = st.one_of(workloads(), services(), policies())


@fuzz_settings(500)
@given(resources)
def test_from_proto_round_trip(msg: Any) -> None:
    """``from_proto`` accepts or raises ModelError; what it accepts survives a round trip
    through ``to_proto`` and renders as ztunnel's config dump."""
    try:
        obj = from_proto(msg)
    except ModelError:
        return
    assert from_proto(to_proto(obj)) == obj
    json.dumps(obj.to_json())
    wire = type(msg).FromString(to_proto(obj).SerializeToString())
    assert from_proto(wire) == obj


def _response(type_url: str, items: list[tuple[str, Any]], removed: list[str], nonce: str,
              wrong_type: bool) -> discovery_pb2.DeltaDiscoveryResponse:
    r = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce,
                                             removed_resources=removed)
    for name, msg in items:
        res = r.resources.add(name=name, version="v1")
        res.resource.type_url = "x" if wrong_type else type_url
        res.resource.value = msg.SerializeToString()
    return r


xds_names = st.sampled_from(["a", "b", "c", "d"])


@fuzz_settings(200)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.tuples(xds_names, st.one_of(
    workloads(), services())), max_size=3), st.lists(xds_names, max_size=2), st.booleans()),
    max_size=5))
def test_client_applies_any_response_sequence(seq: list[Any]) -> None:
    """Responses of valid and invalid resources, removals and wrong types: the client ACKs
    exactly when nothing was rejected, and holds the names it accepted and never removed."""
    state = XdsClientState(MeshStore(), base_pb2.Node(id="ztunnel~1.1.1.1~z.ns~ns.svc.c"))
    held: dict[str, str] = {}
    for i, (auth_type, items, removed, wrong) in enumerate(seq):
        type_url = AUTHORIZATION_TYPE_URL if auth_type else ADDRESS_TYPE_URL
        resp = _response(type_url, items, removed, f"n{i}", wrong)
        ack, rejects = state.handle_response(resp)
        assert ack.response_nonce == f"n{i}"
        assert ack.HasField("error_detail") == bool(rejects)
        rejected = {r.name for r in rejects}
        if type_url == ADDRESS_TYPE_URL:
            for name in removed:
                held.pop(name, None)
            for name, _ in items:
                if name not in rejected:
                    held[name] = "v1"
    assert state.known.get(ADDRESS_TYPE_URL, {}) == held


@pytest.fixture(scope="module")
def cache() -> SnapshotCache:
    c = SnapshotCache()
    c.apply(ADDRESS_TYPE_URL, {n: wpb.Address(service=wpb.Service(
        name=n, namespace="ns", hostname=f"{n}.ns")) for n in ("a", "b")})
    c.apply(AUTHORIZATION_TYPE_URL, {"p": apb.Authorization(name="p", namespace="ns")})
    return c


NODE = "ztunnel~10.0.0.5~z.istio-system~istio-system.svc.cluster.local"
requests = st.builds(
    lambda t, node, sub, unsub, nonce, nack, init: _request(t, node, sub, unsub, nonce, nack,
                                                            init),
    st.sampled_from(sorted(SUPPORTED_TYPES) + ["type.googleapis.com/other", ""]),
    st.sampled_from([None, NODE, "bad", ""]), st.lists(st.sampled_from(["a", "b", "x", "*"]),
                                                       max_size=3),
    st.lists(st.sampled_from(["a", "x", "*"]), max_size=2),
    st.sampled_from(["", "n1", "n2", "n3", "zz"]), st.booleans(),
    st.dictionaries(st.sampled_from(["a", "b", "gone"]), st.sampled_from(["v", "1"]), max_size=2))


def _request(type_url: str, node: str | None, sub: list[str], unsub: list[str], nonce: str,
             nack: bool, init: dict[str, str]) -> discovery_pb2.DeltaDiscoveryRequest:
    r = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=sub,
                                            resource_names_unsubscribe=unsub,
                                            response_nonce=nonce, initial_resource_versions=init)
    if node is not None:
        r.node.id = node
    if nack:
        r.error_detail.message = "a: bad; x: worse"
    return r


@fuzz_settings(300)
@given(st.lists(requests, min_size=1, max_size=8))
def test_delta_stream_any_request_sequence(cache: SnapshotCache,
                                           seq: list[discovery_pb2.DeltaDiscoveryRequest]) -> None:
    """Only the first request can end the stream (a bad or missing node id); afterwards any
    sequence of subscriptions, ACKs, NACKs and stale nonces gets responses that hold only
    resources the cache has, for types the client subscribed to."""
    counter = iter(range(1, 100))
    s = DeltaStream(cache, nonce=lambda: f"n{next(counter)}")
    for req in seq:
        try:
            out = s.handle_request(req)
        except XdsError:
            assert s.node is None
            return
        for resp in out:
            assert resp.type_url in SUPPORTED_TYPES
            have = cache.resources(resp.type_url)
            assert all(r.name in have for r in resp.resources)
            assert not set(resp.removed_resources) & {r.name for r in resp.resources}


@fuzz_settings(300)
@given(st.sampled_from(sorted(PROXY_TYPES)), st.ip_addresses(), label, label,
       st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True))
def test_node_id_round_trip(ptype: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                            pod: str, ns: str, domain: str) -> None:
    raw = f"{ptype}~{ip}~{pod}.{ns}~{domain}"
    n = NodeId.parse(raw)
    assert (n.proxy_type, n.pod_name, n.namespace) == (ptype, pod, ns) and str(n) == raw


@fuzz_settings(300)
@given(st.text(max_size=60))
def test_node_id_text_only_raises_value_error(raw: str) -> None:
    try:
        NodeId.parse(raw)
    except ValueError:
        pass
