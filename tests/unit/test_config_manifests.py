"""Kubernetes manifests -> WDS protos, as istiod would translate them."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient.authz import ConnectionInfo, evaluate
from ambient.config.manifests import translate_manifests
from ambient.identity import SpiffeId
from ambient.model import Action, HealthStatus, Scope, TunnelProtocol, from_proto
from ambient.store import MeshStore


def ns(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name, namespace="shop", labels=None, ip="10.0.0.1", sa=None, ports=(), **extra):
    spec = {"nodeName": "node-a", "containers": [{"name": "app", "ports": list(ports)}]}
    if sa:
        spec["serviceAccountName"] = sa
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
        "status": {"podIP": ip} if ip else {},
    }
    for k, v in extra.items():
        obj[k] = {**obj.get(k, {}), **v}
    return obj


def service(name, namespace="shop", selector=None, ports=(), ip="10.96.0.1"):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ip, "selector": selector or {}, "ports": list(ports)},
    }


def authz(name, spec, namespace="shop", annotations=None):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": spec,
    }


def peer(name, spec, namespace="shop"):
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


def models(objs, **kw):
    r = translate_manifests(objs, **kw)
    return {k: from_proto(m) for k, m in r.resources}, r


# (id, namespace labels, pod labels, extra, expected tunnel)
ENROLL_CASES = [
    ("namespace ambient", {"istio.io/dataplane-mode": "ambient"}, {}, {}, TunnelProtocol.HBONE),
    ("pod ambient", {}, {"istio.io/dataplane-mode": "ambient"}, {}, TunnelProtocol.HBONE),
    ("pod opts out", {"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, {}, TunnelProtocol.NONE),
    ("not enrolled", {}, {}, {}, TunnelProtocol.NONE),
    ("host network", {"istio.io/dataplane-mode": "ambient"}, {}, {"spec": {"hostNetwork": True}}, TunnelProtocol.NONE),
]  # fmt: skip


@pytest.mark.parametrize(
    "nsl,pl,extra,want", [c[1:] for c in ENROLL_CASES], ids=[c[0] for c in ENROLL_CASES]
)
def test_enrollment(nsl, pl, extra, want):
    m, r = models([ns("shop", **nsl), pod("a", labels=pl, **extra)])
    assert r.errors == []
    assert m["Kubernetes//Pod/shop/a"].tunnel_protocol is want


# (id, labels, canonical name, revision)
CANONICAL_CASES = [
    ("explicit", {"service.istio.io/canonical-name": "c", "service.istio.io/canonical-revision": "r",
                  "app": "x", "version": "v"}, "c", "r"),
    ("k8s recommended", {"app.kubernetes.io/name": "k", "app.kubernetes.io/version": "1"}, "k", "1"),
    ("app/version", {"app": "a", "version": "v2"}, "a", "v2"),
    ("fallbacks", {}, "p", "latest"),
]  # fmt: skip


@pytest.mark.parametrize(
    "labels,name,rev", [c[1:] for c in CANONICAL_CASES], ids=[c[0] for c in CANONICAL_CASES]
)
def test_canonical_labels(labels, name, rev):
    m, _ = models([pod("p", labels=labels)])
    w = m["Kubernetes//Pod/shop/p"]
    assert (w.canonical_name, w.canonical_revision) == (name, rev)


def test_pod_fields():
    p = pod("a-7d9f-x1", labels={"app": "a"}, sa="api", ip=None,
            metadata={"ownerReferences": [{"kind": "ReplicaSet", "name": "a-7d9f"}]},
            status={"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                    "conditions": [{"type": "Ready", "status": "False"}]})  # fmt: skip
    m, r = models([p], cluster_id="c1", trust_domain="td.example")
    assert r.errors == []
    w = m["c1//Pod/shop/a-7d9f-x1"]
    assert [str(a) for a in w.addresses] == ["10.0.0.1", "fd00::1"]
    assert w.service_account == "api" and w.node == "node-a" and w.cluster_id == "c1"
    assert str(w.identity()) == "spiffe://td.example/ns/shop/sa/api"
    assert w.workload_name == "a" and w.workload_type == "DEPLOYMENT"
    assert w.status is HealthStatus.UNHEALTHY


def test_service_and_endpoint_ports():
    objs = [
        pod("a", labels={"app": "db"}, ports=[{"name": "pg", "containerPort": 15432}]),
        pod("b", labels={"app": "db"}, ip="10.0.0.2"),  # no named port
        pod("c", labels={"app": "web"}, ip="10.0.0.3"),
        service(
            "db",
            selector={"app": "db"},
            ports=[
                {"port": 5432, "targetPort": "pg"},
                {"port": 80, "targetPort": 8080},
                {"port": 81},
            ],
        ),  # fmt: skip
    ]
    m, r = models(objs, cluster_domain="example.internal")
    assert r.errors == []
    key = "shop/db.shop.svc.example.internal"
    s = m[key]
    assert dict(s.ports) == {5432: 0, 80: 8080, 81: 81}
    assert [str(v) for v in s.vips] == ["/10.96.0.1"]
    st_ = MeshStore()
    st_.apply([msg for _, msg in r.resources])
    snap = st_.snapshot
    assert [(e.workload.name, e.target_port) for e in snap.endpoints(key, 5432)] == [("a", 15432)]
    assert [(e.workload.name, e.target_port) for e in snap.endpoints(key, 80)] == [
        ("a", 8080),
        ("b", 8080),
    ]
    assert "c" not in [w.name for w in snap.endpoint_workloads(key)]


def test_authorization_policy_scopes_and_selection():
    objs = [
        pod("db", labels={"app": "db"}),
        authz("sel", {"selector": {"matchLabels": {"app": "db"}}}),
        authz("sel-other", {"selector": {"matchLabels": {"app": "web"}}}),
        authz("nsw", {"action": "DENY"}),
        authz("mesh", {}, namespace="istio-system"),
        authz("mesh-sel", {"selector": {"matchLabels": {"app": "db"}}}, namespace="istio-system"),
    ]
    m, r = models(objs)
    assert r.errors == []
    assert m["shop/sel"].scope is Scope.WORKLOAD_SELECTOR
    assert m["shop/nsw"].scope is Scope.NAMESPACE and m["shop/nsw"].action is Action.DENY
    assert m["istio-system/mesh"].scope is Scope.GLOBAL
    assert m["Kubernetes//Pod/shop/db"].authorization_policies == (
        "istio-system/mesh-sel",
        "shop/sel",
    )


def test_rule_conversion_and_wildcards():
    spec = {"rules": [{
        "from": [{"source": {"principals": ["*", "cluster.local/ns/a/*", "*/sa/b", "x"],
                             "notNamespaces": ["bad"], "ipBlocks": ["10.0.0.0/8", "1.2.3.4"],
                             "serviceAccounts": ["other/sa1", "sa2"]}}],
        "to": [{"operation": {"ports": ["80"], "notPorts": ["81"]}}],
        "when": [{"key": "destination.ip", "values": ["10.0.0.1"]},
                 {"key": "source.namespace", "notValues": ["x"]}],
    }]}  # fmt: skip
    m, r = models([authz("p", spec)])
    assert r.errors == [] and r.warnings == []
    (group,) = m["shop/p"].groups
    to, frm, when1, when2 = group
    assert to[0].destination_ports == (80,) and to[0].not_destination_ports == (81,)
    kinds = [(s.kind, s.value) for s in frm[0].principals]
    assert kinds == [
        ("presence", ""),
        ("prefix", "cluster.local/ns/a/"),
        ("suffix", "/sa/b"),
        ("exact", "x"),
    ]
    assert [str(n) for n in frm[0].source_ips] == ["10.0.0.0/8", "1.2.3.4/32"]
    assert [(s.namespace, s.service_account) for s in frm[0].service_accounts] == [
        ("other", "sa1"), ("shop", "sa2")]  # fmt: skip
    assert str(when1[0].destination_ips[0]) == "10.0.0.1/32"
    assert when2[0].not_namespaces[0].value == "x"


def test_empty_rules_semantics():
    m, _ = models([authz("nothing", {}), authz("all", {"rules": [{}]})])
    assert m["shop/nothing"].groups == ()  # ALLOW nothing: denies all
    assert m["shop/all"].groups == ((),)  # one empty rule: allows all


L7_CASES = [
    ("allow drops rule", "ALLOW", {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}, (), "methods"),
    ("deny keeps L4 part", "DENY", {"to": [{"operation": {"paths": ["/x"], "ports": ["80"]}}]}, (80,), "paths"),
    ("deny request principals", "DENY", {"from": [{"source": {"requestPrincipals": ["*"]}}]}, None, "requestPrincipals"),
    ("allow http when", "ALLOW", {"when": [{"key": "request.headers[x]", "values": ["y"]}]}, (), "request.headers[x]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "action,rule,ports,field", [c[1:] for c in L7_CASES], ids=[c[0] for c in L7_CASES]
)
def test_l7_fields_warn_and_convert_stricter(action, rule, ports, field):
    m, r = models([authz("p", {"action": action, "rules": [rule]})])
    assert any("shop/p" in w and field in w for w in r.warnings), r.warnings
    p = m["shop/p"]
    if action == "ALLOW":
        assert p.groups == ()
    elif ports is not None:
        assert p.groups[0][0][0].destination_ports == ports
    else:
        assert p.groups[0][0][0].is_empty()  # nothing left: the rule never matches


SKIP_CASES = [
    ("audit", {"action": "AUDIT"}, "AUDIT"),
    ("custom", {"action": "CUSTOM", "provider": {"name": "x"}}, "CUSTOM"),
    ("targetRefs", {"targetRefs": [{"kind": "Gateway", "name": "wp"}]}, "targetRef"),
]


@pytest.mark.parametrize("spec,word", [c[1:] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES])
def test_policies_not_for_ztunnel_are_skipped(spec, word):
    m, r = models([authz("p", spec)])
    assert "shop/p" not in m and any(word in w for w in r.warnings)


def test_dry_run_annotation():
    m, _ = models([authz("p", {}, annotations={"istio.io/dry-run": "true"})])
    assert m["shop/p"].dry_run


def _decide(m, uid, ident, port=8080):
    st_ = MeshStore()
    st_.apply(list(m.values()))
    w = st_.snapshot.workload_by_uid(uid)
    c = ConnectionInfo(
        __import__("ipaddress").ip_address("10.9.9.9"), ident, w.addresses[0], port, w
    )
    return evaluate(c, st_.snapshot.policies_for(w))


MTLS = SpiffeId("cluster.local", "web", "x")

# (id, peer authentications, connection identity, port, allowed)
PA_CASES = [
    ("namespace strict denies plaintext", [peer("default", {"mtls": {"mode": "STRICT"}})], None, 8080, False),
    ("namespace strict allows mtls", [peer("default", {"mtls": {"mode": "STRICT"}})], MTLS, 8080, True),
    ("mesh strict", [peer("default", {"mtls": {"mode": "STRICT"}}, namespace="istio-system")], None, 8080, False),
    ("namespace permissive overrides mesh", [peer("m", {"mtls": {"mode": "STRICT"}}, namespace="istio-system"),
                                             peer("n", {"mtls": {"mode": "PERMISSIVE"}})], None, 8080, True),
    ("workload permissive port", [peer("n", {"mtls": {"mode": "STRICT"}}),
                                  peer("w", {"selector": {"matchLabels": {"app": "db"}},
                                             "portLevelMtls": {8080: {"mode": "PERMISSIVE"}}})], None, 8080, True),
    ("workload permissive port, other port", [peer("n", {"mtls": {"mode": "STRICT"}}),
                                              peer("w", {"selector": {"matchLabels": {"app": "db"}},
                                                         "portLevelMtls": {8080: {"mode": "PERMISSIVE"}}})], None, 9090, False),
    ("workload strict port only", [peer("w", {"selector": {"matchLabels": {"app": "db"}},
                                              "portLevelMtls": {9090: {"mode": "STRICT"}}})], None, 9090, False),
    ("workload strict port only, other", [peer("w", {"selector": {"matchLabels": {"app": "db"}},
                                                     "portLevelMtls": {9090: {"mode": "STRICT"}}})], None, 8080, True),
    ("disable is ignored", [peer("d", {"mtls": {"mode": "DISABLE"}})], None, 8080, True),
]  # fmt: skip


@pytest.mark.parametrize(
    "pas,ident,port,allowed", [c[1:] for c in PA_CASES], ids=[c[0] for c in PA_CASES]
)
def test_peer_authentication(pas, ident, port, allowed):
    m, r = models([pod("db", labels={"app": "db"}), *pas])
    assert r.errors == []
    d = _decide(m, "Kubernetes//Pod/shop/db", ident, port)
    assert d.allowed is allowed, d


def test_static_strict_policy_shape():
    m, _ = models([peer("default", {"mtls": {"mode": "STRICT"}})], root_namespace="mesh-root")
    p = m["mesh-root/istio_converted_static_strict"]
    assert p.action is Action.DENY and p.groups[0][0][0].not_principals[0].kind == "presence"


ERROR_CASES = [
    ([pod("a", ip="not-an-ip")], "Pod shop/a: status.podIPs[0] 'not-an-ip' is not an IP address"),
    ([pod("a", ports=[{"containerPort": "x"}])], "Pod shop/a: spec.containers[0].ports[0].containerPort"),
    ([service("s", ports=[{"port": 0}])], "Service shop/s: spec.ports[0].port 0 is out of range"),
    ([service("s", ip="300.1.1.1")], "Service shop/s: spec.clusterIPs[0]"),
    ([authz("p", {"action": "MAYBE"})], "AuthorizationPolicy shop/p: spec.action 'MAYBE'"),
    ([authz("p", {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]})], "spec.rules[0].to[0].operation.ports 'http'"),
    ([authz("p", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]})], "ipBlocks '10.0.0.0/99'"),
    ([peer("p", {"mtls": {"mode": "SOMETIMES"}})], "PeerAuthentication shop/p: spec.mtls.mode"),
    ([{"kind": "Pod", "metadata": {}}], "metadata.name is missing"),
    ([{"metadata": {"name": "x"}}], "kind is missing"),
    (["just a string"], "object #0"),
]  # fmt: skip


@pytest.mark.parametrize("objs,msg", ERROR_CASES)
def test_errors_name_object_and_field(objs, msg):
    r = translate_manifests(objs + [pod("good", ip="10.0.0.50")])
    assert any(msg in e for e in r.errors), r.errors
    assert "Kubernetes//Pod/shop/good" in [k for k, _ in r.resources]


def test_other_kinds_ignored_with_note_and_yaml_text():
    text = textwrap.dedent("""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: d, namespace: shop}
        ---
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: ServiceAccount, metadata: {name: sa, namespace: shop}}
        - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: []}}
    """)
    r = translate_manifests(text)
    assert r.errors == []
    assert any("Deployment shop/d" in w for w in r.warnings)
    assert [k for k, _ in r.resources] == ["Kubernetes//Pod/default/p"]


def test_demo_example_translates():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    if not path.exists():
        pytest.skip("no demo")
    r = translate_manifests(path.read_text())
    assert r.errors == []


_keys = st.sampled_from(["kind", "metadata", "spec", "status", "name", "namespace", "labels",
                         "selector", "matchLabels", "rules", "from", "to", "when", "source",
                         "operation", "ports", "port", "targetPort", "podIP", "clusterIP",
                         "principals", "mtls", "mode", "portLevelMtls", "action", "containers",
                         "containerPort", "key", "values"])  # fmt: skip
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 70000), st.text(max_size=8),
                    st.sampled_from(["Pod", "Service", "AuthorizationPolicy", "PeerAuthentication",
                                     "Namespace", "STRICT", "DENY", "10.0.0.1", "*", "80"]))  # fmt: skip
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(_keys, c, max_size=5),
                      max_leaves=25)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_keys, _value, max_size=6), max_size=4))
def test_fuzz_objects_never_raise(objs):
    r = translate_manifests(objs)
    for _, msg in r.resources:
        from_proto(msg)
    translate_manifests(yaml.safe_dump_all(objs))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="{}[]:,-'\"\n #!&*|>a1/.", max_size=80))
def test_fuzz_text_never_raises(text):
    translate_manifests(text)
