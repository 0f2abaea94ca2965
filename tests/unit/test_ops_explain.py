"""``policy explain``: the explanation agrees with the evaluator, and says why, field by field.

Cases run on config dumps recorded from the local cluster (``tests/data``, examples/demo.yaml:
STRICT in ``shop``, ``db-allow-backend`` allowing only the backend SA on 8080).
"""

# ruff: noqa: E501

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient.authz import ConnectionInfo, evaluate, explain
from ambient.identity import SpiffeId
from ambient.model import Action, Match, Policy, ServiceAccountMatch, StringMatch
from ambient.ops import explain as ex
from ambient.ops.dumpstate import state_from_dump

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def state():
    dump = json.loads((DATA / "ztunnel_config_dump_node_b.json").read_text())
    st_, errors = state_from_dump(dump)
    assert errors == []
    return st_


def test_dump_round_trips_into_state(state) -> None:
    names = {f"{w.namespace}/{w.name}" for w in state.workloads.values()}
    assert {"shop/frontend", "shop/backend-1", "shop/db", "legacy/client"} <= names
    db = next(w for w in state.workloads.values() if w.name == "db")
    assert dict(db.services["shop/db.shop.svc.cluster.local"]) == {5432: 8080}
    assert [p.key for p in state.policies_for(db)] == [
        "istio-system/istio_converted_static_strict", "shop/db-allow-backend"]


# (id, src, dst, plaintext, allowed, deciding policy, dst workload, dst port, note fragment)
CASES = [
    ("frontend to db service: no ALLOW matches", "shop/frontend", "10.96.0.20:5432", False, False, None, "db", 8080, "this one is mTLS"),
    ("backend to db by name: ALLOW matches", "shop/backend-2", "shop/db:5432", False, True, "shop/db-allow-backend", "db", 8080, "this one is mTLS"),
    ("backend to db on the wrong port", "shop/backend-2", "shop/db:9090", False, False, None, "db", 9090, ""),
    ("legacy client plaintext: STRICT denies", "legacy/client", "shop/backend-1:8080", False, False, "istio-system/istio_converted_static_strict", "backend-1", 8080, "so it is refused"),
    ("forced plaintext from a mesh pod", "shop/frontend", "shop/backend-1:8080", True, False, "istio-system/istio_converted_static_strict", "backend-1", 8080, "so it is refused"),
    ("source by IP", "10.244.1.3", "10.244.2.3:8080", False, True, "shop/db-allow-backend", "db", 8080, ""),
    ("unknown IP source is plaintext", "10.9.9.9", "10.244.2.2:8080", False, False, "istio-system/istio_converted_static_strict", "backend-1", 8080, ""),
    ("to an unenrolled pod: no policies", "shop/frontend", "legacy/web:8080", False, True, None, "web", 8080, ""),
    ("service hostname", "shop/backend-1", "db.shop.svc.cluster.local:5432", False, True, "shop/db-allow-backend", "db", 8080, ""),
]


@pytest.mark.parametrize(("src", "dst", "plaintext", "allowed", "policy", "wl", "port", "note"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_explain_cases(state, src, dst, plaintext, allowed, policy, wl, port, note) -> None:
    cases = ex.resolve(state, src, dst, plaintext=plaintext)
    assert len(cases) == 1
    e = ex.explain_case(state, cases[0])
    d = e.explanation.decision
    assert (d.allowed, d.policy) == (allowed, policy)
    assert (e.case.dst_workload.name, e.case.dst_port) == (wl, port)
    # The explanation's decision is the evaluator's.
    conn = ConnectionInfo(ipaddress.ip_address(e.case.src_ip), e.case.identity,
                          ipaddress.ip_address(e.case.dst_ip), e.case.dst_port)
    assert evaluate(conn, state.policies_for(e.case.dst_workload)) == d
    if note:
        assert any(note in n for n in e.notes), e.notes
    text = ex.render([e])
    assert ("decision: ALLOW" if allowed else "decision: DENY") in text
    if policy:
        assert f"{policy}" in text and "<== decides" in text


def test_service_resolves_to_every_endpoint(state) -> None:
    cases = ex.resolve(state, "shop/frontend", "shop/backend:80")
    assert sorted(c.dst_workload.name for c in cases) == ["backend-1", "backend-2"]
    assert {c.dst_port for c in cases} == {8080} and {c.service_port for c in cases} == {80}


def test_field_by_field_trace(state) -> None:
    (case,) = ex.resolve(state, "shop/frontend", "shop/db:5432")
    e = ex.explain_case(state, case)
    allow = next(t for t in e.explanation.policies if t.policy.name == "db-allow-backend")
    assert not allow.matched
    (group,) = allow.groups
    assert [r.holds for r in group.rules] == [True, False]  # port holds, principal does not
    port_field = group.rules[0].matches[0].fields[0]
    assert (port_field.field, port_field.wanted, port_field.actual, port_field.holds) == (
        "destinationPorts", ("8080",), "8080", True)
    principal = group.rules[1].matches[0].fields[0]
    assert principal.field == "principals" and not principal.holds
    assert principal.actual == "cluster.local/ns/shop/sa/frontend"
    js = ex.to_json([e])
    assert js[0]["decision"]["allowed"] is False
    assert js[0]["policies"][1]["rules"][0][1][0]["fields"][0]["holds"] is False


@pytest.mark.parametrize(("src", "dst", "message"), [
    ("shop/nope", "shop/db:5432", "is not a workload"),
    ("shop/frontend", "shop/db", "want NS/NAME:PORT"),
    ("shop/frontend", "shop/nothing:80", "neither a workload nor a service"),
    ("shop/frontend", "shop/backend:81", "no endpoint on port 81"),
])
def test_resolution_errors(state, src, dst, message) -> None:
    with pytest.raises(ex.ExplainError, match=message):
        ex.resolve(state, src, dst)


def test_dry_run_is_reported_not_enforced() -> None:
    deny_all = Policy("audit", "shop", action=Action.DENY, groups=(((Match(),),),), dry_run=True)
    deny_port = Policy("deny-9", "shop", action=Action.DENY,
                       groups=(((Match(destination_ports=(9,)),),),), dry_run=True)
    conn = ConnectionInfo(ipaddress.ip_address("10.0.0.1"), None,
                          ipaddress.ip_address("10.0.0.2"), 9)
    e = explain(conn, [deny_all, deny_port])
    assert e.decision.allowed and e.decision.dry_run == (("shop/audit", True), ("shop/deny-9", False))
    assert e.policies[0].groups[0].rules[0].matches[0].empty


# -- property: explain's decision is evaluate's, for any policies -----------------------------

IDS = [SpiffeId("cluster.local", "shop", "backend"), SpiffeId("cluster.local", "web", "fe"), None]
_sm = st.sampled_from([StringMatch("exact", "cluster.local/ns/shop/sa/backend"),
                       StringMatch("prefix", "cluster.local/ns/web/"), StringMatch("presence"),
                       StringMatch("exact", "shop"), StringMatch("suffix", "eb")])
_match = st.builds(
    Match,
    principals=st.lists(_sm, max_size=2).map(tuple),
    not_principals=st.lists(_sm, max_size=1).map(tuple),
    namespaces=st.lists(_sm, max_size=1).map(tuple),
    not_namespaces=st.lists(_sm, max_size=1).map(tuple),
    destination_ports=st.lists(st.sampled_from([80, 8080]), max_size=2).map(tuple),
    not_destination_ports=st.lists(st.sampled_from([80, 8080]), max_size=1).map(tuple),
    source_ips=st.lists(st.sampled_from([ipaddress.ip_network("10.0.0.0/8"),
                                         ipaddress.ip_network("192.168.0.0/16")]), max_size=1).map(tuple),
    service_accounts=st.lists(st.just(ServiceAccountMatch("shop", "backend")), max_size=1).map(tuple),
)
_policy = st.builds(
    Policy, name=st.sampled_from(["a", "b", "c", "d"]), namespace=st.just("shop"),
    action=st.sampled_from([Action.ALLOW, Action.DENY]), dry_run=st.booleans(),
    groups=st.lists(st.lists(st.lists(_match, max_size=2).map(tuple), max_size=2).map(tuple),
                    max_size=2).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(policies=st.lists(_policy, max_size=4), ident=st.sampled_from(IDS),
       port=st.sampled_from([80, 8080]), src=st.sampled_from(["10.1.2.3", "172.16.0.1"]))
def test_explain_agrees_with_evaluate(policies, ident, port, src) -> None:
    conn = ConnectionInfo(ipaddress.ip_address(src), ident, ipaddress.ip_address("10.9.0.1"), port)
    e = explain(conn, policies)
    assert e.decision == evaluate(conn, policies)
    from ambient.authz import policy_matches
    for t in e.policies:
        assert t.matched == policy_matches(t.policy, conn)
