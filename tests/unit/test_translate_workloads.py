"""Translation of Pods, Services and EndpointSlices into Workloads and Services (tables)."""

# ruff: noqa: E501

from __future__ import annotations

import pytest

from ambient.config.manifests import translate_manifests
from ambient.model import HealthStatus, TunnelProtocol, from_proto


def pod(name="p", ns="shop", labels=None, status=None, spec=None, meta=None):
    return {"kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}, **(meta or {})},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}]}], **(spec or {})},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}],
                       "conditions": [{"type": "Ready", "status": "True"}], **(status or {})}}  # fmt: skip


def svc(name="s", ns="shop", selector=None, ports=None, **spec):
    s = {"clusterIP": "10.96.0.1", "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"}], **spec}
    if selector is not None:
        s["selector"] = selector
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": s}


def eps(name, service, endpoints, ns="shop", ports=None):
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
            "ports": ports if ports is not None else [{"name": "http", "port": 9090, "protocol": "TCP"}],
            "endpoints": endpoints}  # fmt: skip


def run(objs):
    r = translate_manifests(objs)
    assert r.errors == [], r.errors
    return {k: from_proto(m) for k, m in r.resources}


UID = "Kubernetes//Pod/shop/p"

# (id, status override, metadata override, healthy)
READY_CASES = [
    ("ready true", {}, {}, True),
    ("ready false", {"conditions": [{"type": "Ready", "status": "False"}]}, {}, False),
    ("no conditions", {"conditions": []}, {}, False),
    ("other conditions only", {"conditions": [{"type": "PodScheduled", "status": "True"}]}, {}, False),
    ("deleting", {}, {"deletionTimestamp": "2024-01-01T00:00:00Z"}, False),
    ("pending with ip", {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}, {}, False),
]  # fmt: skip


@pytest.mark.parametrize("status,meta,healthy", [c[1:] for c in READY_CASES], ids=[c[0] for c in READY_CASES])
def test_pod_readiness(status, meta, healthy):
    w = run([pod(status=status, meta=meta)])[UID]
    assert w.status is (HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY)


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminal_pods_are_not_published(phase):
    assert UID not in run([pod(status={"phase": phase})])


# (id, labels, owner refs, canonical name, revision, workload name)
CANONICAL_CASES = [
    ("istio labels win", {"service.istio.io/canonical-name": "c", "service.istio.io/canonical-revision": "r", "app": "a", "version": "v"}, [], "c", "r", "a"),
    ("k8s recommended", {"app.kubernetes.io/name": "k", "app.kubernetes.io/version": "1", "app": "a"}, [], "k", "1", "a"),
    ("app and version", {"app": "a", "version": "v2"}, [], "a", "v2", "a"),
    ("workload name from deployment", {}, [{"kind": "ReplicaSet", "name": "web-5d8f"}], "web", "latest", "web"),
    ("pod name last", {}, [], "p", "latest", "p"),
]  # fmt: skip


@pytest.mark.parametrize("labels,owners,name,rev,wname", [c[1:] for c in CANONICAL_CASES], ids=[c[0] for c in CANONICAL_CASES])
def test_canonical_names(labels, owners, name, rev, wname):
    w = run([pod(labels=labels, meta={"ownerReferences": owners})])[UID]
    assert (w.canonical_name, w.canonical_revision, w.workload_name) == (name, rev, wname)


# (id, namespace labels, pod labels, spec, tunnel, network mode)
ENROLL_CASES = [
    ("namespace ambient", {"istio.io/dataplane-mode": "ambient"}, {}, {}, TunnelProtocol.HBONE, "STANDARD"),
    ("pod opts out", {"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, {}, TunnelProtocol.NONE, "STANDARD"),
    ("pod ambient only", {}, {"istio.io/dataplane-mode": "ambient"}, {}, TunnelProtocol.HBONE, "STANDARD"),
    ("host network never", {"istio.io/dataplane-mode": "ambient"}, {}, {"hostNetwork": True}, TunnelProtocol.NONE, "HOST_NETWORK"),
    ("host network pod label", {}, {"istio.io/dataplane-mode": "ambient"}, {"hostNetwork": True}, TunnelProtocol.NONE, "HOST_NETWORK"),
]  # fmt: skip


@pytest.mark.parametrize("nsl,pl,spec,tunnel,mode", [c[1:] for c in ENROLL_CASES], ids=[c[0] for c in ENROLL_CASES])
def test_enrollment_and_host_network(nsl, pl, spec, tunnel, mode):
    ns = {"kind": "Namespace", "metadata": {"name": "shop", "labels": nsl}}
    w = run([ns, pod(labels=pl, spec=spec)])[UID]
    assert (w.tunnel_protocol, w.network_mode) == (tunnel, mode)


def test_pod_fields():
    w = run([pod(spec={"serviceAccountName": "api"}, status={"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]})])[UID]
    assert [str(a) for a in w.addresses] == ["10.0.0.1", "fd00::1"]
    assert (w.service_account, w.node) == ("api", "node-a")


def test_headless_service_has_no_vip():
    m = run([svc(clusterIP="None", selector={"app": "a"}), pod(labels={"app": "a"})])
    s = m["shop/s.shop.svc.cluster.local"]
    assert s.vips == () and s.canonical
    assert dict(m[UID].services["shop/s.shop.svc.cluster.local"]) == {80: 8080}


def test_service_fields():
    m = run([svc(clusterIPs=["10.96.0.1", "fd00::10"], ipFamilies=["IPv4", "IPv6"],
                 internalTrafficPolicy="Local", publishNotReadyAddresses=True)])  # fmt: skip
    s = m["shop/s.shop.svc.cluster.local"]
    assert [str(v.ip) for v in s.vips] == ["10.96.0.1", "fd00::10"]
    assert s.ip_families == "DUAL"
    assert s.load_balancing.routing_preference == ("NODE",) and s.load_balancing.mode == "STRICT"
    assert s.load_balancing.health_policy == "ALLOW_ALL"
    assert dict(s.ports) == {80: 0}  # named target port: resolved per endpoint


# (id, service ports, pod container ports, expected port map or None when not a member)
NAMED_PORT_CASES = [
    ("named target found", [{"name": "http", "port": 80, "targetPort": "http"}], [{"name": "http", "containerPort": 8080}], {80: 8080}),
    ("named target missing on pod", [{"name": "http", "port": 80, "targetPort": "web"}], [{"name": "http", "containerPort": 8080}], {}),
    ("numeric target", [{"port": 80, "targetPort": 9000}], [], {80: 9000}),
    ("no target: the port", [{"port": 81}], [], {81: 81}),
]  # fmt: skip


@pytest.mark.parametrize("ports,cports,want", [c[1:] for c in NAMED_PORT_CASES], ids=[c[0] for c in NAMED_PORT_CASES])
def test_named_target_ports_per_pod(ports, cports, want):
    p = pod(labels={"app": "a"}, spec={"containers": [{"name": "c", "ports": cports}]})
    m = run([svc(selector={"app": "a"}, ports=ports), p])
    assert dict(m[UID].services["shop/s.shop.svc.cluster.local"]) == want


def test_selectorless_service_endpointslice_pod_target_ref():
    m = run([svc(ports=[{"name": "http", "port": 80, "targetPort": 8080}]),
             pod(),
             eps("s-1", "s", [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "p"}}])])  # fmt: skip
    assert dict(m[UID].services["shop/s.shop.svc.cluster.local"]) == {80: 8080}
    assert not [k for k in m if "EndpointSlice" in k]  # the pod's own workload carries it


def test_endpointslice_without_pod_becomes_workloads_with_named_ports():
    m = run([svc(ports=[{"name": "http", "port": 80, "targetPort": "web"}, {"name": "udp", "port": 53}]),
             eps("s-1", "s", [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                              {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
                              {"addresses": ["10.1.0.3"]}],
                 ports=[{"name": "http", "port": 9090, "protocol": "TCP"},
                        {"name": "udp", "port": 53, "protocol": "UDP"}])])  # fmt: skip
    base = "Kubernetes/discovery.k8s.io/EndpointSlice/shop/s-1/"
    ws = {ip: m[base + ip] for ip in ("10.1.0.1", "10.1.0.2", "10.1.0.3")}
    assert {ip: w.status for ip, w in ws.items()} == {
        "10.1.0.1": HealthStatus.HEALTHY, "10.1.0.2": HealthStatus.UNHEALTHY, "10.1.0.3": HealthStatus.HEALTHY}  # fmt: skip
    w = ws["10.1.0.1"]
    assert dict(w.services["shop/s.shop.svc.cluster.local"]) == {80: 9090}  # named port via the slice
    assert w.network_mode == "HOST_NETWORK"


def test_endpointslice_for_missing_service_publishes_nothing():
    m = run([eps("x-1", "x", [{"addresses": ["10.1.0.1"]}])])
    assert m == {}


def test_selector_service_ignores_slices_for_membership():
    # istiod takes selector services' members from the selector (the slices say the same)
    m = run([svc(selector={"app": "a"}), pod(labels={"app": "a"}),
             eps("s-1", "s", [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "p"}}])])  # fmt: skip
    assert dict(m[UID].services["shop/s.shop.svc.cluster.local"]) == {80: 8080}
