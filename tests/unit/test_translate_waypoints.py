"""Waypoint binding: Gateway of class istio-waypoint, istio.io/use-waypoint labels (tables)."""

# ruff: noqa: E501

from __future__ import annotations

import ipaddress

import pytest

from ambient.config.manifests import translate_manifests
from ambient.model import NamespacedHostname, NetworkAddress, from_proto

UWP = "istio.io/use-waypoint"


def ns(name="shop", **labels):
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def gw(name="wp", namespace="shop", waypoint_for=None, status=True, allowed=None, cls="istio-waypoint"):
    lst = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
    if allowed:
        lst["allowedRoutes"] = {"namespaces": allowed}
    obj = {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
           "metadata": {"name": name, "namespace": namespace,
                        "labels": {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}},
           "spec": {"gatewayClassName": cls, "listeners": [lst]}}  # fmt: skip
    if status:
        obj["status"] = {"addresses": [{"type": "Hostname", "value": f"{name}.{namespace}.svc.cluster.local"}]}
    return obj


def pod(labels=None, namespace="shop"):
    return {"kind": "Pod", "metadata": {"name": "p", "namespace": namespace, "labels": {"app": "a", **(labels or {})}},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip


def svc(labels=None, namespace="shop", name="s"):
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "a"}, "ports": [{"port": 80}]}}  # fmt: skip


def run(objs):
    r = translate_manifests(objs)
    assert r.errors == [], r.errors
    m = {k: from_proto(v) for k, v in r.resources}
    return m.get("Kubernetes//Pod/shop/p"), m.get("shop/s.shop.svc.cluster.local"), r.warnings


def host(name="wp", namespace="shop"):
    return NamespacedHostname(namespace, f"{name}.{namespace}.svc.cluster.local")


# (id, namespace labels, service labels, pod labels, gateways, service waypoint, workload waypoint)
CASES = [
    ("namespace label, default service traffic", {UWP: "wp"}, {}, {}, [gw()], host(), None),
    ("namespace label, workload traffic", {UWP: "wp"}, {}, {}, [gw(waypoint_for="workload")], None, host()),
    ("namespace label, all traffic", {UWP: "wp"}, {}, {}, [gw(waypoint_for="all")], host(), host()),
    ("namespace label, none traffic", {UWP: "wp"}, {}, {}, [gw(waypoint_for="none")], None, None),
    ("service label beats namespace", {UWP: "wp"}, {UWP: "svc-wp"}, {}, [gw(waypoint_for="all"), gw("svc-wp")], host("svc-wp"), host()),
    ("pod label beats namespace", {UWP: "wp"}, {}, {UWP: "pod-wp"}, [gw(waypoint_for="all"), gw("pod-wp", waypoint_for="workload")], host(), host("pod-wp")),
    ("service opts out with none", {UWP: "wp"}, {UWP: "none"}, {}, [gw(waypoint_for="all")], None, host()),
    ("pod opts out with none", {UWP: "wp"}, {}, {UWP: "none"}, [gw(waypoint_for="all")], host(), None),
    ("service label does not bind pods", {}, {UWP: "wp"}, {}, [gw(waypoint_for="all")], host(), None),
    ("missing waypoint: nothing", {UWP: "nope"}, {}, {}, [], None, None),
    ("not ready (no status, no service)", {UWP: "wp"}, {}, {}, [gw(status=False)], None, None),
    ("other gateway class is not a waypoint", {UWP: "wp"}, {}, {}, [gw(cls="istio")], None, None),
    ("cross namespace denied by default", {UWP: "wp", "istio.io/use-waypoint-namespace": "infra"}, {}, {}, [gw(namespace="infra")], None, None),
    ("cross namespace allowed from All", {UWP: "wp", "istio.io/use-waypoint-namespace": "infra"}, {}, {}, [gw(namespace="infra", allowed={"from": "All"})], host(namespace="infra"), None),
    ("cross namespace by selector", {UWP: "wp", "istio.io/use-waypoint-namespace": "infra", "team": "x"}, {}, {}, [gw(namespace="infra", allowed={"from": "Selector", "selector": {"matchLabels": {"team": "x"}}})], host(namespace="infra"), None),
]  # fmt: skip


@pytest.mark.parametrize("nsl,sl,pl,gws,want_svc,want_wl", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_waypoint_binding(nsl, sl, pl, gws, want_svc, want_wl):
    w, s, _ = run([ns(**nsl), svc(sl), pod(pl), *gws])
    assert (s.waypoint.destination if s.waypoint else None) == want_svc
    assert (w.waypoint.destination if w.waypoint else None) == want_wl
    for wp in (s.waypoint, w.waypoint):
        assert wp is None or wp.hbone_mtls_port == 15008


def test_explicit_label_on_wrong_traffic_type_warns():
    w, s, warnings = run([ns(), pod({UWP: "wp"}), svc(), gw()])
    assert w.waypoint is None
    assert any("Pod shop/p" in x and "for service traffic, not workload" in x for x in warnings), warnings


def test_missing_waypoint_warns_naming_it():
    _, _, warnings = run([ns(), svc({UWP: "ghost"})])
    assert any("Service shop/s" in x and "shop/ghost" in x and "not a ready waypoint" in x for x in warnings)


def test_address_from_service_when_no_status():
    _, s, _ = run([ns(**{UWP: "wp"}), svc(), gw(status=False), svc(name="wp")])
    assert s.waypoint.destination == host()


def test_address_from_status_ip():
    g = gw()
    g["status"] = {"addresses": [{"type": "IPAddress", "value": "10.96.5.5"}]}
    _, s, _ = run([ns(**{UWP: "wp"}), svc(), g])
    assert s.waypoint.destination == NetworkAddress("", ipaddress.ip_address("10.96.5.5"))


def test_waypoint_own_pods_and_managed_service_get_no_waypoint():
    own_pod = pod({"gateway.networking.k8s.io/gateway-name": "wp"})
    own_svc = svc({"gateway.istio.io/managed": "istio.io-mesh-controller"})
    w, s, _ = run([ns(**{UWP: "wp"}), own_pod, own_svc, gw(waypoint_for="all")])
    assert w.waypoint is None and s.waypoint is None


def test_local_mesh_waypoint_objects_bind_the_service_and_never_themselves():
    """What the local mesh writes for a waypoint Gateway (Pod, Service, ServiceAccount; no
    Gateway status) binds a labelled Service; with the whole namespace using the waypoint,
    the waypoint's own pod and Service still get none (no loop), and its pod is not captured."""
    from ambient.cluster.mesh import allocate_service_vip, waypoint_manifests

    g = gw("waypoint", status=False)
    wp_pod, wp_svc, wp_sa = waypoint_manifests(g, "node-b", allocate_service_vip([svc()]))
    wp_pod["status"] = {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}
    assert wp_svc["spec"]["clusterIP"] == "10.96.100.1"
    objs = [ns(**{"istio.io/dataplane-mode": "ambient", UWP: "waypoint"}), g, wp_pod, wp_svc,
            wp_sa, svc({UWP: "waypoint"}), pod()]
    r = translate_manifests(objs)
    assert r.errors == [], r.errors
    m = {k: from_proto(v) for k, v in r.resources}
    want = host("waypoint")
    assert m["shop/s.shop.svc.cluster.local"].waypoint.destination == want
    own_pod = m["Kubernetes//Pod/shop/waypoint"]
    assert own_pod.waypoint is None and own_pod.tunnel_protocol == "NONE"
    assert own_pod.service_account == "waypoint"
    own_svc = m["shop/waypoint.shop.svc.cluster.local"]
    assert own_svc.waypoint is None and dict(own_svc.ports) == {15008: 15008}
    assert own_pod.services["shop/waypoint.shop.svc.cluster.local"] == {15008: 15008}
