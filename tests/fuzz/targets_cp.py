"""Fuzz harnesses for control-plane inputs: xDS (both ends), manifests and local config,
certificates and CSRs, SPIFFE ids and node ids.

Each harness takes fuzzer bytes, calls one entry point the way its caller does, and lets any
exception other than the documented error type escape (a finding).  Where an encoder or a
stronger invariant exists it is checked too: model round trip, "whatever the CA accepts
verifies", "incremental translation equals batch translation".
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from functools import cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.message import DecodeError

from ambient.api.envoy.config.core.v3 import base_pb2
from ambient.api.envoy.service.discovery.v3 import discovery_pb2
from ambient.ca import CaError, CertificateAuthority, workload_certificate_from_chain
from ambient.certs import CertificateError, verify_chain
from ambient.config import manifests
from ambient.config.k8s_parse import key_of, normalise
from ambient.config.local import parse_local_config
from ambient.identity import IdentityError, SpiffeId
from ambient.model import from_proto, to_proto
from ambient.store import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, MeshStore
from controlplane.ca_service import Denied, validate_csr
from controlplane.cache import SnapshotCache
from controlplane.local_source import ParseError, parse_manifests
from controlplane.xds import DeltaStream, NodeId, XdsError, peer_identity
from fuzz.bytesource import ByteSource, json_like, mutate
from ztunnel.xds_client import _DECODERS, XdsClientState

# ---------------------------------------------------------------------------- manifests

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-web-1, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web,
       containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http}, {port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.5], conditions: {ready: true}, targetRef: {kind: Pod, name: web-1}}]
ports: [{name: http, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{type: IPAddress, value: 10.96.0.99}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}
"""

K8S_KEYS = (
    "apiVersion", "kind", "metadata", "name", "namespace", "uid", "labels", "annotations",
    "spec", "status", "podIP", "podIPs", "ip", "nodeName", "serviceAccountName", "containers",
    "ports", "containerPort", "port", "targetPort", "protocol", "appProtocol", "selector",
    "matchLabels", "clusterIP", "clusterIPs", "type", "endpoints", "addresses", "conditions",
    "ready", "targetRef", "addressType", "action", "rules", "from", "to", "when", "source",
    "principals", "notPrincipals", "namespaces", "ipBlocks", "notIpBlocks", "operation",
    "methods", "paths", "hosts", "key", "values", "mtls", "mode", "portLevelMtls", "targetRefs",
    "gatewayClassName", "listeners", "parentRefs", "hostnames", "backendRefs", "matches",
    "value", "hostNetwork", "phase", "deletionTimestamp", "istio.io/dataplane-mode",
    "istio.io/use-waypoint", "istio.io/waypoint-for", "kubernetes.io/service-name",
    "istio.io/use-waypoint-namespace", "externalName", "loadBalancerIP", "ipFamilies",
)
KINDS = ("Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount", "AuthorizationPolicy",
         "PeerAuthentication", "Gateway", "HTTPRoute", "ConfigMap", "List")


def _k8s_object(src: ByteSource) -> Any:
    if src.u8() % 8 == 0:
        return json_like(src, K8S_KEYS)
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": src.choice(KINDS),
                           "metadata": {"name": src.choice(("a", "web", "wp", "", "x.y")),
                                        "namespace": src.choice(("shop", "default", "", "a"))}}
    for _ in range(src.int(0, 3)):
        obj["metadata"][src.choice(K8S_KEYS)] = json_like(src, K8S_KEYS, 2)
    for part in ("spec", "status"):
        if src.flag():
            obj[part] = json_like(src, K8S_KEYS)
    return obj


@cache
def _demo_objects() -> tuple[Any, ...]:
    import yaml

    return tuple(yaml.safe_load_all(MANIFESTS))


def manifests_translate(data: bytes) -> None:
    """``translate_manifests`` (YAML text or object dicts) and ``Translator.apply``: never raise,
    every resource passes ``from_proto``, incremental == batch when nothing fails to build."""
    src = ByteSource(data)
    mode = src.u8() % 3
    if mode == 0:
        res = manifests.translate_manifests(src.rest().decode("utf-8", "replace"))
        for _, msg in res.resources:
            from_proto(msg)
        return
    objs: list[Any] = []
    if mode == 2:
        objs = [dict(o) for o in _demo_objects()]
    for _ in range(src.int(0, 6)):
        objs.append(_k8s_object(src))
    if mode == 2 and objs and src.flag():
        i = src.int(0, len(objs) - 1)
        try:
            objs[i] = json.loads(mutate(src, json.dumps(objs[i]).encode()))
        except ValueError:  # the mutation broke the JSON: use a fresh object instead
            objs[i] = _k8s_object(src)
    batch = manifests.translate_manifests(objs)
    for _, msg in batch.resources:
        from_proto(msg)
    keyed: dict[str, Any] = {}
    for o in objs:
        try:
            keyed.setdefault(key_of(normalise(o)), o)
        except Exception:  # noqa: BLE001 - the translator reports these; not this property
            return
    if len(keyed) != len(objs):
        return
    inc = manifests.Translator()
    for key, o in keyed.items():
        inc.apply({key: o})
    # A producer that fails to build keeps its last output incrementally and has none in a
    # batch: the two agree only when nothing failed to build.
    if not inc._build_errors and not any("cannot translate" in e for e in batch.errors):  # noqa: SLF001
        assert inc.resources == dict(batch.resources), "incremental and batch translation differ"
    for key in list(keyed)[: src.int(0, len(keyed))]:
        inc.apply({}, [key])


def manifests_seeds() -> list[bytes]:
    return [b"\x00" + MANIFESTS.encode(), b"\x02\x00", b"\x01\x03\x01\x01\x02\x05",
            b"\x00- &a [*a]\n", b"\x00a: &a [*a, *a]\nb: &b [*a, *a]\nc: [*b, *b]\n"]


def local_config(data: bytes) -> None:
    """ztunnel's local config (``parse_local_config``): never raises; output is valid."""
    src = ByteSource(data)
    if src.u8() % 2:
        text = src.rest().decode("utf-8", "replace")
    else:
        keys = ("workloads", "services", "policies", "uid", "name", "namespace", "addresses",
                "protocol", "status", "serviceAccount", "trustDomain", "services", "ports",
                "waypoint", "destination", "hbonePort", "hostname", "vips", "scope", "action",
                "rules", "groups", "matches", "sourceIps", "destinationPorts", "principals",
                "exact", "prefix", "suffix", "presence", "capacity", "loadBalancer",
                "routingPreferences", "mode", "healthPolicy", "networkMode", "workloadType",
                "applicationTunnel", "node", "network", "clusterId", "locality", "region")
        text = json.dumps({k: [json_like(src, keys)] for k in ("workloads", "services",
                                                                "policies") if src.flag()})
    res = parse_local_config(text)
    for _, msg in res.resources:
        from_proto(msg)


LOCAL_CONFIG = """\
workloads:
- uid: cluster1//v1/Pod/default/web
  name: web
  namespace: default
  addresses: [10.0.0.5]
  protocol: HBONE
  serviceAccount: web
  services: {default/web.default.svc.cluster.local: {80: 8080}}
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: [/10.96.0.5]
  ports: {80: 8080}
policies:
- name: allow
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[{sourceIps: [10.0.0.0/8], destinationPorts: [8080]}]]
"""


def local_source(data: bytes) -> None:
    """The control plane's manifests directory reader (``parse_manifests``): ParseError only."""
    text = data.decode("utf-8", "replace")
    try:
        out = parse_manifests(text, "fuzz.yaml")
    except ParseError:
        return
    for key, obj in out.items():
        assert isinstance(obj, dict) and key.startswith(f"{obj['kind']}/")


# ---------------------------------------------------------------------------- xDS


@cache
def _demo_resources() -> tuple[tuple[str, Any], ...]:
    return tuple(manifests.translate_manifests(MANIFESTS).resources)


def _response(type_url: str, items: list[tuple[str, Any]], nonce: str) -> bytes:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce)
    for name, msg in items:
        r = resp.resources.add(name=name, version="v1")
        r.resource.type_url = type_url
        r.resource.value = msg.SerializeToString()
    return resp.SerializeToString()


def _baseline() -> list[bytes]:
    res = _demo_resources()
    addrs = [(k, m) for k, m in res if m.DESCRIPTOR.full_name == "istio.workload.Address"]
    pols = [(k, m) for k, m in res if m.DESCRIPTOR.full_name != "istio.workload.Address"]
    return [_response(ADDRESS_TYPE_URL, addrs, "n1"), _response(AUTHORIZATION_TYPE_URL, pols, "n2")]


def xds_client(data: bytes) -> None:
    """ztunnel's ``XdsClientState.handle_response`` on a fuzzed DeltaDiscoveryResponse."""
    node = base_pb2.Node(id="ztunnel~10.0.0.1~z.ns~ns.svc.cluster.local")
    state = XdsClientState(MeshStore(), node)
    head = data[:1]
    if head and head[0] & 1:
        for raw in _baseline():
            state.handle_response(discovery_pb2.DeltaDiscoveryResponse.FromString(raw))
    try:  # gRPC decodes the message first; a DecodeError there fails the stream, not us
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(data[1:])
    except DecodeError:
        return
    ack, rejects = state.handle_response(resp)
    assert ack.type_url == resp.type_url and ack.response_nonce == resp.nonce
    assert ack.HasField("error_detail") == bool(rejects)
    for type_url, known in state.known.items():
        assert set(known) == set(state.keys.get(type_url, {}))
    decoder = _DECODERS.get(resp.type_url)
    for r in resp.resources if decoder is not None else ():  # model round trip
        try:
            obj = from_proto(decoder.FromString(r.resource.value))
        except (DecodeError, ValueError, TypeError):
            continue
        assert from_proto(to_proto(obj)) == obj
        json.dumps(obj.to_json())


def xds_client_seeds() -> list[bytes]:
    return [bytes([i]) + raw for i, raw in enumerate(_baseline())]


@cache
def _cache() -> SnapshotCache:
    c = SnapshotCache()
    res = _demo_resources()
    c.apply(ADDRESS_TYPE_URL, {k: m for k, m in res if m.DESCRIPTOR.full_name.endswith("Address")})
    c.apply(AUTHORIZATION_TYPE_URL,
            {k: m for k, m in res if not m.DESCRIPTOR.full_name.endswith("Address")})
    return c


def xds_server(data: bytes) -> None:
    """``DeltaStream.handle_request`` over a fuzzed request sequence: XdsError only."""
    src = ByteSource(data)
    cache_ = _cache()
    counter = iter(range(10**6))
    stream = DeltaStream(cache_, nonce=lambda: f"n{next(counter)}")
    for _ in range(8):
        if not src.left:
            break
        raw = src.take(src.u16() % 2048)
        try:
            req = discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
        except DecodeError:
            return
        try:
            responses = stream.handle_request(req)
        except XdsError:
            assert stream.node is None
            return
        for resp in responses:
            have = cache_.resources(resp.type_url)
            assert all(r.name in have for r in resp.resources)
        stream.on_change(ADDRESS_TYPE_URL, [src.choice(("shop/10.1.0.5", "*", "x"))])


def xds_server_seeds() -> list[bytes]:
    node = base_pb2.Node(
        id="ztunnel~10.0.0.5~ztunnel-a.istio-system~istio-system.svc.cluster.local")
    reqs = [
        discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, node=node),
        discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHORIZATION_TYPE_URL,
                                            initial_resource_versions={"shop/allow-web": "v0"}),
        discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce="n0",
                                            resource_names_subscribe=["x", "*"],
                                            resource_names_unsubscribe=["*"]),
        discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce="n1"),
    ]
    reqs[3].error_detail.message = "shop/x: bad; y: z"
    out = b""
    for r in reqs:
        raw = r.SerializeToString()
        out += len(raw).to_bytes(2, "big") + raw
    return [out]


def node_id(data: bytes) -> None:
    """``NodeId.parse`` (the first xDS request's node id): ValueError only; round trip."""
    text = data.decode("utf-8", "replace")
    try:
        n = NodeId.parse(text)
    except ValueError:
        return
    assert NodeId.parse(str(n)) == n and str(n) == text


def node_id_seeds() -> list[bytes]:
    return [b"ztunnel~10.0.0.5~ztunnel-a.istio-system~istio-system.svc.cluster.local",
            b"waypoint~fd00::1~wp-1.shop~shop.svc.cluster.local", b"sidecar~1~a.b~"]


# ---------------------------------------------------------------------------- identities

def spiffe_id(data: bytes) -> None:
    """``SpiffeId.parse`` (URI SANs, CSRs, xDS): IdentityError only; round trip."""
    text = data.decode("utf-8", "replace")
    try:
        ident = SpiffeId.parse(text)
    except IdentityError:
        pass
    else:
        assert str(ident) == text and SpiffeId.parse(str(ident)) == ident
    peer_identity({"x509_subject_alternative_name": [data], "peer_spiffe_id": [data[:40]]})


def spiffe_seeds() -> list[bytes]:
    return [b"spiffe://cluster.local/ns/default/sa/web", b"spiffe://td/ns/a-b/sa/c.d",
            b"SPIFFE://x/ns/a/sa/b", b"spiffe://a:1/ns/x/sa/y?q#f%20"]


# ---------------------------------------------------------------------------- certificates

TD = "cluster.local"
IDENT = SpiffeId(TD, "default", "web")


@cache
def _ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


def _as_pem(data: bytes, mode: int, label: bytes) -> bytes:
    if mode % 2 == 0:
        return data
    body = base64.encodebytes(data)
    return b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"


def csr(data: bytes) -> None:
    """``validate_csr`` (CA service) and ``CertificateAuthority.sign_csr``: Denied / CaError
    only; whatever is accepted is signed into a chain that verifies."""
    pem = _as_pem(data[1:], data[0] if data else 0, b"CERTIFICATE REQUEST")
    try:
        ident = validate_csr(pem, TD)
    except Denied:
        ident = None
    try:
        chain = _ca().sign_csr(pem, ident or IDENT, timedelta(hours=1))
    except CaError:
        assert ident is None, "validate_csr accepted a CSR the CA refuses"
        return
    wc = workload_certificate_from_chain(ident or IDENT, b"", chain)
    verify_chain(wc)


def _csr_der(key: Any, sans: list[x509.GeneralName]) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def csr_seeds() -> list[bytes]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    uri = x509.UniformResourceIdentifier(str(IDENT))
    good = _csr_der(ec_key, [uri])
    pem = x509.load_der_x509_csr(good).public_bytes(serialization.Encoding.PEM)
    return [
        b"\x01" + good, b"\x00" + pem,
        b"\x01" + _csr_der(ec_key, [uri, x509.DNSName("web")]),
        b"\x01" + _csr_der(ec.generate_private_key(ec.SECP384R1()), [uri]),
        b"\x01" + _csr_der(rsa.generate_private_key(65537, 2048), [uri]),
        b"\x01" + _csr_der(ec_key, []),
    ]


def cert_chain(data: bytes) -> None:
    """``workload_certificate_from_chain`` (a CA's answer) and ``verify_chain``."""
    src = ByteSource(data)
    mode = src.u8()
    elements = [_as_pem(src.take(src.u16() % 4096), mode >> i, b"CERTIFICATE")
                for i in range(src.int(0, 4))]
    elements.append(_as_pem(src.rest(), mode >> 5, b"CERTIFICATE"))
    try:
        wc = workload_certificate_from_chain(IDENT, b"", [e.decode("latin-1") for e in elements])
    except CaError:
        return
    wc.leaf()
    try:
        verify_chain(wc)
    except CertificateError:
        pass


def cert_chain_seeds() -> list[bytes]:
    ca = _ca()
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_csr(x509.load_der_x509_csr(_csr_der(
        key, [x509.UniformResourceIdentifier(str(IDENT))])).public_bytes(
        serialization.Encoding.PEM), IDENT)
    ders = [x509.load_pem_x509_certificate(c.encode()).public_bytes(serialization.Encoding.DER)
            for c in chain]
    leaf, root = ders[0], ders[-1]
    return [b"\xff\x01" + len(leaf).to_bytes(2, "big") + leaf + root,
            b"\x00\x01" + len(chain[0]).to_bytes(2, "big") + chain[0].encode() + chain[-1].encode()]
