"""AuthorizationPolicy fields ztunnel cannot enforce, targetRefs, and other kinds (tables)."""

# ruff: noqa: E501

from __future__ import annotations

import ipaddress

import pytest

from ambient.authz import ConnectionInfo, evaluate
from ambient.config.manifests import translate_manifests
from ambient.identity import SpiffeId
from ambient.model import from_proto
from ambient.store import MeshStore


def authz(spec, name="p"):
    return {"kind": "AuthorizationPolicy", "apiVersion": "security.istio.io/v1",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}  # fmt: skip


POD = {"kind": "Pod", "metadata": {"name": "db", "namespace": "shop", "labels": {"app": "db"}},
       "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
ADMIN = SpiffeId("cluster.local", "shop", "admin")
OTHER = SpiffeId("cluster.local", "shop", "other")


def decide(objs, ident, port):
    r = translate_manifests([POD, *objs])
    st = MeshStore()
    st.apply([m for _, m in r.resources])
    w = st.snapshot.workload_by_uid("Kubernetes//Pod/shop/db")
    c = ConnectionInfo(ipaddress.ip_address("10.9.9.9"), ident, w.addresses[0], port, w)
    return evaluate(c, st.snapshot.policies_for(w)).allowed, r.warnings


FROM_ADMIN = {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/admin"]}}]}

# (id, action, rules, identity, port, allowed with the L7 parts ignored, field in warning)
# The waypoint-only semantics would allow (ALLOW) / deny (DENY) only some requests; at L4 the
# result must never be looser than that, except a DENY with nothing left (istiod: no effect).
L7_CASES = [
    ("allow: rule with methods dropped", "ALLOW", [{"to": [{"operation": {"methods": ["GET"]}}]}], ADMIN, 80, False, "methods"),
    ("allow: other L4 rule still allows", "ALLOW", [{"to": [{"operation": {"paths": ["/x"]}}]}, FROM_ADMIN], ADMIN, 80, True, "paths"),
    ("allow: L4 rule, other source", "ALLOW", [{"to": [{"operation": {"paths": ["/x"]}}]}, FROM_ADMIN], OTHER, 80, False, "paths"),
    ("allow: hosts in a mixed rule drops it", "ALLOW", [{**FROM_ADMIN, "to": [{"operation": {"hosts": ["x"]}}]}], ADMIN, 80, False, "hosts"),
    ("allow: request principals", "ALLOW", [{"from": [{"source": {"requestPrincipals": ["*"]}}]}], ADMIN, 80, False, "requestPrincipals"),
    ("allow: http when key", "ALLOW", [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}], ADMIN, 80, False, "request.auth.claims[iss]"),
    ("deny: L4 part kept, port matches", "DENY", [{"to": [{"operation": {"methods": ["POST"], "ports": ["80"]}}]}], ADMIN, 80, False, "methods"),
    ("deny: L4 part kept, other port", "DENY", [{"to": [{"operation": {"methods": ["POST"], "ports": ["80"]}}]}], ADMIN, 81, True, "methods"),
    ("deny: source kept, paths dropped", "DENY", [{**FROM_ADMIN, "to": [{"operation": {"paths": ["/admin"]}}]}], ADMIN, 80, True, "paths"),
    ("deny: only L7 has no effect", "DENY", [{"to": [{"operation": {"paths": ["/admin"]}}]}], ADMIN, 80, True, "paths"),
]  # fmt: skip


@pytest.mark.parametrize("action,rules,ident,port,allowed,field", [c[1:] for c in L7_CASES], ids=[c[0] for c in L7_CASES])
def test_l7_fields(action, rules, ident, port, allowed, field):
    got, warnings = decide([authz({"action": action, "rules": rules})], ident, port)
    assert got is allowed
    assert any("AuthorizationPolicy shop/p" in w and field in w for w in warnings), warnings


def test_deny_with_nothing_left_says_no_effect():
    _, warnings = decide([authz({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]})], ADMIN, 80)
    assert any("NO effect" in w for w in warnings)
    _, warnings = decide([authz({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/a"], "ports": ["80"]}}]}]})], ADMIN, 80)
    assert any("enforced without its HTTP parts" in w for w in warnings)


def test_target_refs_policies_are_not_sent_to_ztunnel():
    r = translate_manifests([authz({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}],
                                    "action": "DENY", "rules": [{}]}),
                             authz({"targetRef": {"kind": "Service", "name": "db"}}, name="q")])  # fmt: skip
    assert [k for k, _ in r.resources] == []
    assert any("shop/p" in w and "waypoint" in w for w in r.warnings)


def test_l4_only_policy_has_no_warning():
    r = translate_manifests([authz({"rules": [FROM_ADMIN]})])
    assert r.warnings == [] and [k for k, _ in r.resources] == ["shop/p"]


def test_httproute_serviceaccount_and_other_gateways_are_accepted_silently():
    objs = [
        {"kind": "HTTPRoute", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {"name": "r", "namespace": "shop"},
         "spec": {"parentRefs": [{"name": "wp"}]}},
        {"kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "shop"}},
        {"kind": "Gateway", "metadata": {"name": "in", "namespace": "shop"}, "spec": {"gatewayClassName": "istio"}},
    ]  # fmt: skip
    r = translate_manifests(objs)
    assert r.warnings == [] and r.errors == [] and r.resources == []


def test_unknown_kind_warns():
    r = translate_manifests([{"kind": "Deployment", "metadata": {"name": "d", "namespace": "shop"}}])
    assert r.warnings == ["Deployment shop/d: kind Deployment is ignored"]


def test_every_resource_is_valid():
    objs = [POD, authz({"rules": [FROM_ADMIN]})]
    for _, m in translate_manifests(objs).resources:
        from_proto(m)
