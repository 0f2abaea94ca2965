"""The control plane's pipeline: incremental translation equals full translation; last good."""

# Generated object shapes are kept one per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.api import ADDRESS_TYPE_URL as ADDRESS_TYPE
from ambient.api import AUTHORIZATION_TYPE_URL as AUTHORIZATION_TYPE
from ambient.config.manifests import translate_manifests
from controlplane.objects import Update, object_key
from controlplane.pipeline import Pipeline

NAMESPACES = ["a", "a", "b", "istio-system"]
APPS = ["web", "db"]


def ns_obj(name, labels):
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod_obj(ns, name, labels, ip, ready=True, phase="Running", sa="default"):
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "n1", "serviceAccountName": sa,
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": phase, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def svc_obj(ns, name, selector, ip, labels=None, target="http"):
    spec = {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": target}]}
    if selector is not None:
        spec["selector"] = selector
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns,
                                            "labels": labels or {}}, "spec": spec}  # fmt: skip


def slice_obj(ns, name, service, endpoints):
    return {
        "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
        "endpoints": endpoints,
    }  # fmt: skip


def gw_obj(ns, name, waypoint_for=None, allowed="Same", status=True):
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}
    obj = {
        "kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE",
                                "allowedRoutes": {"namespaces": {"from": allowed}}}]},
        "status": {"addresses": [{"type": "Hostname",
                                  "value": f"{name}.{ns}.svc.cluster.local"}]},
    }  # fmt: skip
    if not status:
        del obj["status"]  # no gateway controller: the Service named like it gives the address
    return obj


def ap_obj(ns, name, selector, action="ALLOW"):
    spec = {"action": action, "rules": [{"from": [{"source": {"namespaces": ["a"]}}]}]}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": spec}  # fmt: skip


def pa_obj(ns, name, selector, mode, ports=None):
    spec = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    return {"kind": "PeerAuthentication", "metadata": {"name": name, "namespace": ns},
            "spec": spec}  # fmt: skip


labels_st = st.fixed_dictionaries(
    {"app": st.sampled_from(APPS)},
    optional={
        "istio.io/use-waypoint": st.sampled_from(["wp", "none"]),
        "istio.io/dataplane-mode": st.sampled_from(["ambient", "none"]),
        "gateway.networking.k8s.io/gateway-name": st.just("wp"),
    },
)
ns_st = st.sampled_from(NAMESPACES)
sel_st = st.one_of(st.none(), st.fixed_dictionaries({"app": st.sampled_from(APPS)}))

obj_st = st.one_of(
    st.builds(ns_obj, ns_st, labels_st),
    st.builds(
        pod_obj, ns_st, st.sampled_from(["p1", "p2"]), labels_st,
        st.sampled_from(["10.0.0.1", "10.0.0.2"]), st.booleans(),
        st.sampled_from(["Running", "Running", "Succeeded"]),
    ),
    st.builds(
        svc_obj, ns_st, st.sampled_from(["s1", "s2", "wp"]), sel_st,
        st.sampled_from(["10.96.0.1", "None"]),
        st.one_of(st.none(), st.just({"istio.io/use-waypoint": "wp"})),
        st.sampled_from(["http", 8080]),
    ),
    st.builds(
        slice_obj, ns_st, st.sampled_from(["e1", "e2"]), st.sampled_from(["s1", "s2"]),
        st.lists(st.one_of(
            st.builds(lambda p: {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": p}},
                      st.sampled_from(["p1", "p2"])),
            st.builds(lambda r: {"addresses": ["10.1.0.9"], "conditions": {"ready": r}},
                      st.booleans()),
        ), max_size=3),
    ),
    st.builds(gw_obj, ns_st, st.just("wp"), st.sampled_from([None, "workload", "all", "service"]),
              st.sampled_from(["Same", "All"]), st.booleans()),
    st.builds(ap_obj, ns_st, st.sampled_from(["ap1", "ap2"]), sel_st,
              st.sampled_from(["ALLOW", "DENY"])),
    st.builds(pa_obj, ns_st, st.sampled_from(["pa1", "pa2"]), sel_st,
              st.sampled_from(["STRICT", "PERMISSIVE", "UNSET"]),
              st.one_of(st.none(), st.just({8080: {"mode": "PERMISSIVE"}}))),
)  # fmt: skip

step_st = st.one_of(
    st.builds(lambda objs: ("upsert", objs), st.lists(obj_st, min_size=1, max_size=3)),
    st.builds(lambda i: ("delete", i), st.integers(0, 50)),
)


def full(objects):
    r = translate_manifests(list(objects))
    assert r.errors == []
    return dict(r.resources)


def current(p: Pipeline):
    return {**p.resources(ADDRESS_TYPE), **p.resources(AUTHORIZATION_TYPE)}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(obj_st, max_size=10), st.lists(step_st, min_size=1, max_size=10))
def test_incremental_equals_full(initial, steps):
    p = Pipeline()
    p.apply(Update(upserts={object_key(o): o for o in initial}, resync=True))
    sent = current(p)
    assert sent == full(p.store.objects.values())
    for kind, arg in steps:
        if kind == "upsert":
            ch = p.apply(Update(upserts={object_key(o): copy.deepcopy(o) for o in arg}))
        else:
            keys = sorted(p.store.objects)
            if not keys:
                continue
            ch = p.apply(Update(deletes={keys[arg % len(keys)]}))
        # what a subscriber holds after applying the changes == the full translation
        for t in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
            for name in ch.removals[t]:
                sent.pop(name, None)
            sent.update(ch.upserts[t])
        want = full(p.store.objects.values())
        assert sent == want
        assert current(p) == want


def _many_pods(n_ns=3, per_ns=20):
    objs = [ns_obj(f"ns{i}", {"istio.io/dataplane-mode": "ambient"}) for i in range(n_ns)]
    for i in range(n_ns):
        objs.append(svc_obj(f"ns{i}", "web", {"app": "web"}, f"10.96.0.{i + 1}"))
        objs.append(svc_obj(f"ns{i}", "db", {"app": "db"}, f"10.96.1.{i + 1}"))
        for j in range(per_ns):
            app = "web" if j % 2 else "db"
            objs.append(pod_obj(f"ns{i}", f"p{j}", {"app": app}, f"10.{i}.0.{j + 1}"))
    return objs


def test_one_pod_change_pushes_one_workload():
    p = Pipeline()
    objs = _many_pods()
    first = p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    assert len(first.upserts[ADDRESS_TYPE]) == 3 * 20 + 3 * 2
    changed = pod_obj("ns1", "p3", {"app": "web", "version": "v2"}, "10.1.0.4")
    ch = p.apply(Update(upserts={object_key(changed): changed}))
    assert list(ch.upserts[ADDRESS_TYPE]) == ["Kubernetes//Pod/ns1/p3"]
    assert ch.count() == 1
    # unchanged objects re-sent by the source push nothing
    assert not p.apply(Update(upserts={object_key(changed): changed}))


def test_service_selector_change_touches_its_pods_only():
    p = Pipeline()
    objs = _many_pods()
    p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    s = svc_obj("ns0", "web", {"app": "db"}, "10.96.0.1")
    ch = p.apply(Update(upserts={object_key(s): s}))
    # the service itself is unchanged on the wire (selectors are not sent); all ns0 pods move
    names = set(ch.upserts[ADDRESS_TYPE])
    assert names == {f"Kubernetes//Pod/ns0/p{j}" for j in range(20)}
    w = ch.upserts[ADDRESS_TYPE]["Kubernetes//Pod/ns0/p0"].workload
    assert set(w.services) == {"ns0/db.ns0.svc.cluster.local", "ns0/web.ns0.svc.cluster.local"}


def test_resync_removes_missing_objects():
    p = Pipeline()
    objs = _many_pods(1, 2)
    p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    keep = [o for o in objs if o["kind"] != "Service"]
    ch = p.apply(Update(upserts={object_key(o): o for o in keep}, resync=True))
    assert ch.removals[ADDRESS_TYPE] == {"ns0/web.ns0.svc.cluster.local",
                                         "ns0/db.ns0.svc.cluster.local"}  # fmt: skip
    assert set(ch.upserts[ADDRESS_TYPE]) == {"Kubernetes//Pod/ns0/p0", "Kubernetes//Pod/ns0/p1"}


def test_broken_new_version_keeps_last_good():
    p = Pipeline()
    objs = _many_pods(1, 2) + [ap_obj("ns0", "ap1", {"app": "web"})]
    p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    before = current(p)
    bad_pod = pod_obj("ns0", "p1", {"app": "db"}, "not-an-ip")
    bad_policy = ap_obj("ns0", "ap1", {"app": "db"}, action="MAYBE")
    ch = p.apply(Update(upserts={object_key(bad_pod): bad_pod,
                                 object_key(bad_policy): bad_policy}))  # fmt: skip
    assert not ch and current(p) == before
    probs = p.problems()
    assert "not-an-ip" in probs["Pod/ns0/p1"].errors[0]
    assert "last good version stays in force" in probs["Pod/ns0/p1"].errors[0]
    assert "MAYBE" in probs["AuthorizationPolicy/ns0/ap1"].errors[0]
    # a later good version replaces it and clears the problem
    good = pod_obj("ns0", "p1", {"app": "db"}, "10.0.0.77")
    ch = p.apply(Update(upserts={object_key(good): good}))
    assert list(ch.upserts[ADDRESS_TYPE]) == ["Kubernetes//Pod/ns0/p1"]
    assert "Pod/ns0/p1" not in p.problems()
    # deleting the broken object's key removes its last good translation
    ch = p.apply(Update(deletes={"AuthorizationPolicy/ns0/ap1"}))
    assert ch.removals[AUTHORIZATION_TYPE] == {"ns0/ap1"}
    assert "AuthorizationPolicy/ns0/ap1" not in p.problems()


def test_broken_new_object_affects_nothing_else():
    p = Pipeline()
    objs = _many_pods(1, 2)
    p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    before = current(p)
    bad = svc_obj("ns0", "new", {"app": "web"}, "999.1.1.1")
    ch = p.apply(Update(upserts={object_key(bad): bad}))
    assert not ch and current(p) == before
    assert "Service ns0/new: spec.clusterIPs[0]" in p.problems()["Service/ns0/new"].errors[0]


def test_type_urls_and_names():
    p = Pipeline()
    objs = _many_pods(1, 1) + [ap_obj("ns0", "ap1", None), pa_obj("ns0", "d", None, "STRICT")]
    ch = p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    assert set(ch.upserts[AUTHORIZATION_TYPE]) == {
        "ns0/ap1", "istio-system/istio_converted_static_strict"}  # fmt: skip
    assert set(ch.upserts[ADDRESS_TYPE]) == {
        "Kubernetes//Pod/ns0/p0", "ns0/web.ns0.svc.cluster.local", "ns0/db.ns0.svc.cluster.local"}  # fmt: skip


def test_waypoint_readiness_through_its_service_reaches_users():
    # No gateway controller: the waypoint is ready once the Service named like it exists.
    p = Pipeline()
    pod = pod_obj("a", "p1", {"app": "web", "istio.io/use-waypoint": "wp"}, "10.0.0.1")
    objs = [gw_obj("a", "wp", "all", status=False), pod]
    p.apply(Update(upserts={object_key(o): o for o in objs}, resync=True))
    w = current(p)["Kubernetes//Pod/a/p1"].workload
    assert not w.HasField("waypoint")
    assert "not a ready waypoint" in p.problems()["Pod/a/p1"].warnings[0]
    svc = svc_obj("a", "wp", None, "10.96.9.9")
    ch = p.apply(Update(upserts={object_key(svc): svc}))
    w = ch.upserts[ADDRESS_TYPE]["Kubernetes//Pod/a/p1"].workload
    assert w.waypoint.hostname.hostname == "wp.a.svc.cluster.local"
    assert "Pod/a/p1" not in p.problems()
    ch = p.apply(Update(deletes={object_key(svc)}))
    assert not ch.upserts[ADDRESS_TYPE]["Kubernetes//Pod/a/p1"].workload.HasField("waypoint")
