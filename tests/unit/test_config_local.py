"""ztunnel local config YAML: entries, both rule spellings, per-entry errors, fuzzing."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient.config.local import parse_local_config
from ambient.model import Action, Scope, TunnelProtocol, from_proto
from ambient.store import MeshStore

EXAMPLE = textwrap.dedent("""
    workloads:
    - uid: cluster1//v1/Pod/default/local
      name: local
      namespace: default
      serviceAccount: default
      workloadIps: ["127.0.0.1"]
      protocol: HBONE
      node: local
      network: ""
      services:
        "default/example.com": {80: 8080}
    policies:
    - name: deny-9999
      namespace: default
      scope: Namespace
      action: Allow
      dryRun: false
      rules: [[[ {notDestinationPorts: [9999]} ]]]
    services:
    - name: local
      namespace: default
      hostname: example.com
      vips: ["/127.10.0.1"]
      ports: {80: 8080}
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/local]
      canonical: true
""")


def test_ztunnel_example_loads_into_store():
    r = parse_local_config(EXAMPLE)
    assert r.errors == []
    assert [k for k, _ in r.resources] == [
        "cluster1//v1/Pod/default/local", "default/example.com", "default/deny-9999",
    ]  # fmt: skip
    st = MeshStore()
    assert st.apply([m for _, m in r.resources]) == []
    s = st.snapshot
    w = s.workload_by_address("", "127.0.0.1")
    assert w.tunnel_protocol is TunnelProtocol.HBONE
    assert s.endpoints("default/example.com", 80)[0].target_port == 8080
    p = s.policies["default/deny-9999"]
    assert p.scope is Scope.NAMESPACE and p.action is Action.ALLOW
    assert p.groups[0][0][0].not_destination_ports == (9999,)


POLICY_SPELLINGS = [
    "rules: [[[ {destinationPorts: [80]} ]]]",
    "groups: [[[ {destinationPorts: [80]} ]]]",
    "groups: [{rules: [{matches: [{destinationPorts: [80]}]}]}]",
]


@pytest.mark.parametrize("rules", POLICY_SPELLINGS)
def test_policy_spellings_agree(rules):
    text = "policies:\n- {name: p, namespace: n, scope: Global, action: Deny}\n"
    text = text.replace("}\n", f", {rules}}}\n")
    r = parse_local_config(text)
    assert r.errors == []
    p = from_proto(r.resources[0][1])
    assert p.groups[0][0][0].destination_ports == (80,)


def test_every_match_field():
    text = textwrap.dedent("""
        policies:
        - name: p
          namespace: n
          scope: WorkloadSelector
          action: Allow
          dryRun: true
          rules:
          - - - namespaces: [{Exact: a}]
                notNamespaces: [{prefix: b}]
                principals: [{Suffix: /sa/x}]
                notPrincipals: [{Presence: []}]
                sourceIps: ["10.0.0.0/8"]
                notSourceIps: ["fd00::1"]
                destinationIps: ["192.168.0.1"]
                notDestinationIps: ["0.0.0.0/0"]
                destinationPorts: [80]
                notDestinationPorts: ["443"]
                serviceAccounts: [{namespace: n, serviceAccount: s}]
                notServiceAccounts: [{namespace: n, serviceAccount: t}]
    """)
    r = parse_local_config(text)
    assert r.errors == []
    p = from_proto(r.resources[0][1])
    m = p.groups[0][0][0]
    assert p.dry_run and m.namespaces[0].kind == "exact" and m.not_principals[0].kind == "presence"
    assert str(m.not_source_ips[0]) == "fd00::1/128" and m.not_destination_ports == (443,)
    assert m.service_accounts[0].service_account == "s"


ERROR_CASES = [
    ("workloads:\n- {name: a, namespace: d, workloadIps: [x]}", "workloads[0] (name a): workloadIps[0] 'x' is not an IP address"),
    ("workloads:\n- {name: a, namespace: d}\n- {uid: foo, namespace: d, workloadIps: ['1.2.3.4', bad]}",
     "workloads[1] (uid foo): workloadIps[1] 'bad' is not an IP address"),
    ("workloads:\n- {uid: u, namespace: d, bogus: 1}", "workloads[0] (uid u): unknown field 'bogus'"),
    ("workloads:\n- {uid: u}", "namespace is required"),
    ("workloads:\n- {uid: u, namespace: d, protocol: QUIC}", "protocol 'QUIC' is not one of"),
    ("workloads:\n- {uid: u, namespace: d, services: {nohost: {80: 8080}}}", "not 'namespace/hostname'"),
    ("workloads:\n- {uid: u, namespace: d, services: {a/b: {80: 99999}}}", "out of range"),
    ("services:\n- {name: s, namespace: d, hostname: h, vips: ['10.0.0.1']}", "is not 'network/IP'"),
    ("services:\n- {name: s, namespace: d, hostname: h, ports: {x: 1}}", "ports key 'x' is not a port"),
    ("services:\n- {name: s, namespace: d}", "hostname is empty"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Maybe}", "action 'Maybe'"),
    ("policies:\n- {name: p, namespace: n, action: Allow}", "scope and action are required"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{foo: 1}]]]}", "unknown field 'foo'"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{principals: [{Regex: x}]}]]]}", "unknown string match"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{sourceIps: [10.0.0.300/8]}]]]}", "not an IP or CIDR"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [], groups: []}", "not both"),
    ("extra: 1", "unknown field 'extra'"),
    ("- a\n- b", "top level must be a mapping"),
    ("workloads: {a: 1}", "workloads: {'a': 1} is not a list"),
    ("workloads: [1]", "workloads[0]: 1 is not a mapping"),
    ("a: [", "YAML"),
]  # fmt: skip


@pytest.mark.parametrize("text,msg", ERROR_CASES)
def test_errors_name_entry_and_field(text, msg):
    r = parse_local_config(text)
    assert any(msg in e for e in r.errors), r.errors


def test_bad_entry_does_not_hide_good_ones():
    r = parse_local_config(
        "workloads:\n- {uid: a, namespace: d, workloadIps: [x]}\n- {uid: b, namespace: d}\n"
    )
    assert len(r.errors) == 1 and [k for k, _ in r.resources] == ["b"]


def test_empty_config():
    r = parse_local_config("")
    assert r.resources == [] and r.errors == []


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                     st.sampled_from(["10.0.0.1", "/10.0.0.1", "a/b", "HBONE", "Deny", "Global",
                                      "10.0.0.0/8", "fd00::1"]))  # fmt: skip
_keys = st.sampled_from(["uid", "name", "namespace", "workloadIps", "services", "protocol",
                         "vips", "ports", "hostname", "scope", "action", "rules", "groups",
                         "matches", "dryRun", "sourceIps", "principals", "Exact", "Presence",
                         "destinationPorts", "waypoint", "destination", "capacity", "locality",
                         "applicationTunnel", "serviceAccounts", "x"])  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(_keys | st.integers(0, 70000), c, max_size=5)
    ),
    max_leaves=30,
)
_docs = st.fixed_dictionaries(
    {}, optional={s: st.lists(st.dictionaries(_keys, _values, max_size=8), max_size=3)
                  for s in ("workloads", "services", "policies")}
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_docs)
def test_fuzz_structured_never_raises(doc):
    r = parse_local_config(yaml.safe_dump(doc))
    for _, msg in r.resources:
        from_proto(msg)  # everything returned is valid


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}[]:,-'\"\n #!&*|>a1/.", max_size=80))
def test_fuzz_text_never_raises(text):
    parse_local_config(text)
