"""L4 authorization: match semantics per field and Istio's evaluation order, table-driven."""

# Case tables are kept one case per line for readability.
# ruff: noqa: E501

from __future__ import annotations

import ipaddress

import pytest

from ambient.authz import ConnectionInfo, evaluate, policy_matches
from ambient.identity import SpiffeId
from ambient.model import Action, Match, Policy, ServiceAccountMatch, StringMatch

net = ipaddress.ip_network
BACKEND = SpiffeId("cluster.local", "shop", "backend")
OTHER_TD = SpiffeId("other.td", "shop", "backend")
FRONT = SpiffeId("cluster.local", "web", "frontend")


def conn(ident=BACKEND, src="10.1.0.5", dst="10.2.0.7", port=8080):
    return ConnectionInfo(ipaddress.ip_address(src), ident, ipaddress.ip_address(dst), port)


def ex(v):
    return StringMatch("exact", v)


PRESENCE = StringMatch("presence")

# (id, match, connection, expected)
MATCH_CASES = [
    # principals
    ("principal exact", Match(principals=(ex("cluster.local/ns/shop/sa/backend"),)), conn(), True),
    ("principal exact other", Match(principals=(ex("cluster.local/ns/shop/sa/x"),)), conn(), False),
    ("principal spiffe form", Match(principals=(ex("spiffe://cluster.local/ns/shop/sa/backend"),)), conn(), True),
    ("principal prefix", Match(principals=(StringMatch("prefix", "cluster.local/ns/shop/"),)), conn(), True),
    ("principal suffix", Match(principals=(StringMatch("suffix", "/sa/backend"),)), conn(), True),
    ("principal td differs", Match(principals=(ex("cluster.local/ns/shop/sa/backend"),)), conn(OTHER_TD), False),
    ("principal presence", Match(principals=(PRESENCE,)), conn(), True),
    ("principal presence plaintext", Match(principals=(PRESENCE,)), conn(None), False),
    ("principal any of", Match(principals=(ex("a"), ex("cluster.local/ns/shop/sa/backend"))), conn(), True),
    ("not principal hit", Match(not_principals=(ex("cluster.local/ns/shop/sa/backend"),)), conn(), False),
    ("not principal miss", Match(not_principals=(ex("cluster.local/ns/x/sa/y"),)), conn(), True),
    ("not principal presence mtls", Match(not_principals=(PRESENCE,)), conn(), False),
    ("not principal presence plaintext", Match(not_principals=(PRESENCE,)), conn(None), True),
    ("not principal exact plaintext", Match(not_principals=(ex("a/ns/b/sa/c"),)), conn(None), True),
    # namespaces
    ("namespace exact", Match(namespaces=(ex("shop"),)), conn(), True),
    ("namespace other", Match(namespaces=(ex("web"),)), conn(), False),
    ("namespace prefix", Match(namespaces=(StringMatch("prefix", "sh"),)), conn(), True),
    ("namespace suffix", Match(namespaces=(StringMatch("suffix", "op"),)), conn(), True),
    ("namespace presence", Match(namespaces=(PRESENCE,)), conn(), True),
    ("namespace plaintext", Match(namespaces=(PRESENCE,)), conn(None), False),
    ("namespace empty prefix plaintext", Match(namespaces=(StringMatch("prefix", ""),)), conn(None), False),
    ("not namespace hit", Match(not_namespaces=(ex("shop"),)), conn(), False),
    ("not namespace miss", Match(not_namespaces=(ex("web"),)), conn(), True),
    ("not namespace plaintext", Match(not_namespaces=(ex("shop"),)), conn(None), True),
    # service accounts
    ("sa match", Match(service_accounts=(ServiceAccountMatch("shop", "backend"),)), conn(), True),
    ("sa ignores td", Match(service_accounts=(ServiceAccountMatch("shop", "backend"),)), conn(OTHER_TD), True),
    ("sa wrong ns", Match(service_accounts=(ServiceAccountMatch("web", "backend"),)), conn(), False),
    ("sa plaintext", Match(service_accounts=(ServiceAccountMatch("shop", "backend"),)), conn(None), False),
    ("not sa hit", Match(not_service_accounts=(ServiceAccountMatch("shop", "backend"),)), conn(), False),
    ("not sa plaintext", Match(not_service_accounts=(ServiceAccountMatch("shop", "backend"),)), conn(None), True),
    # source ips
    ("src cidr", Match(source_ips=(net("10.1.0.0/16"),)), conn(), True),
    ("src cidr miss", Match(source_ips=(net("10.9.0.0/16"),)), conn(), False),
    ("src host", Match(source_ips=(net("10.1.0.5/32"),)), conn(), True),
    ("src v6 cidr vs v4", Match(source_ips=(net("::/0"),)), conn(), False),
    ("src v4-mapped", Match(source_ips=(net("10.1.0.0/16"),)), conn(src="::ffff:10.1.0.5"), True),
    ("not src hit", Match(not_source_ips=(net("10.0.0.0/8"),)), conn(), False),
    ("not src miss", Match(not_source_ips=(net("192.168.0.0/16"),)), conn(), True),
    # destination ips
    ("dst cidr", Match(destination_ips=(net("10.2.0.0/24"),)), conn(), True),
    ("dst miss", Match(destination_ips=(net("10.3.0.0/24"),)), conn(), False),
    ("not dst hit", Match(not_destination_ips=(net("10.2.0.7/32"),)), conn(), False),
    ("not dst miss", Match(not_destination_ips=(net("10.3.0.7/32"),)), conn(), True),
    # ports
    ("port", Match(destination_ports=(8080,)), conn(), True),
    ("port any of", Match(destination_ports=(80, 8080)), conn(), True),
    ("port miss", Match(destination_ports=(80,)), conn(), False),
    ("not port hit", Match(not_destination_ports=(8080,)), conn(), False),
    ("not port miss", Match(not_destination_ports=(9999,)), conn(), True),
    # combinations: every non-empty field must hold
    ("and all hold", Match(namespaces=(ex("shop"),), destination_ports=(8080,)), conn(), True),
    ("and one fails", Match(namespaces=(ex("shop"),), destination_ports=(80,)), conn(), False),
    ("positive and negative", Match(source_ips=(net("10.0.0.0/8"),), not_source_ips=(net("10.1.0.0/16"),)), conn(), False),
    ("empty match never matches", Match(), conn(), False),
]  # fmt: skip


def one(match, action=Action.ALLOW, **kw):
    return Policy("p", "ns", action=action, groups=(((match,),),), **kw)


@pytest.mark.parametrize(
    "match,c,want", [m[1:] for m in MATCH_CASES], ids=[m[0] for m in MATCH_CASES]
)
def test_match_fields(match, c, want):
    assert policy_matches(one(match), c) is want


STRUCT_CASES = [
    ("no groups never matches", (), False),
    ("group with no rules matches all", ((),), True),
    ("rule with no matches holds", (((),),), True),
    ("rule with only empty match fails", (((Match(),),),), False),
    ("empty match skipped, other holds", (((Match(), Match(destination_ports=(8080,))),),), True),
    ("rules are ANDed", (((Match(destination_ports=(8080,)),), (Match(namespaces=(ex("web"),)),)),), False),
    ("groups are ORed", (((Match(destination_ports=(1,)),),), ((Match(destination_ports=(8080,)),),)), True),
    ("matches are ORed", (((Match(destination_ports=(1,)), Match(destination_ports=(8080,))),),), True),
]  # fmt: skip


@pytest.mark.parametrize(
    "groups,want", [s[1:] for s in STRUCT_CASES], ids=[s[0] for s in STRUCT_CASES]
)
def test_structure(groups, want):
    assert policy_matches(Policy("p", "ns", groups=groups), conn()) is want


ALL = (((),),)  # matches everything
NOTHING = ()


def P(name, action, groups, dry_run=False):
    return Policy(name, "shop", action=action, groups=groups, dry_run=dry_run)


# (id, policies, connection, allowed, deciding policy, reason fragment, dry_run)
ORDER_CASES = [
    ("no policies", [], conn(), True, None, "allowed: no ALLOW policies", ()),
    ("deny wins over allow", [P("a", Action.ALLOW, ALL), P("d", Action.DENY, ALL)], conn(), False,
     "shop/d", "denied by policy shop/d", ()),
    ("non-matching deny, no allow", [P("d", Action.DENY, NOTHING)], conn(), True, None,
     "no ALLOW policies", ()),
    ("allow matches", [P("a", Action.ALLOW, ALL)], conn(), True, "shop/a", "allowed by policy shop/a", ()),
    ("allow-nothing", [P("a", Action.ALLOW, NOTHING)], conn(), False, None,
     "allow policies exist, but none allowed", ()),
    ("second allow matches", [P("a", Action.ALLOW, NOTHING), P("b", Action.ALLOW, ALL)], conn(), True,
     "shop/b", "allowed by policy shop/b", ()),
    ("dry-run deny is not enforced", [P("d", Action.DENY, ALL, True)], conn(), True, None,
     "no ALLOW policies", (("shop/d", False),)),
    ("dry-run allow-nothing is not enforced", [P("a", Action.ALLOW, NOTHING, True)], conn(), True,
     None, "no ALLOW policies", (("shop/a", False),)),
    ("dry-run allow that matches", [P("a", Action.ALLOW, ALL, True), P("x", Action.ALLOW, NOTHING)],
     conn(), False, None, "none allowed", (("shop/a", True),)),
    ("dry-run reported even when denied", [P("dd", Action.DENY, NOTHING, True), P("d", Action.DENY, ALL)],
     conn(), False, "shop/d", "denied", (("shop/dd", True),)),
]  # fmt: skip


@pytest.mark.parametrize(
    "policies,c,allowed,policy,reason,dry",
    [o[1:] for o in ORDER_CASES],
    ids=[o[0] for o in ORDER_CASES],
)
def test_evaluation_order(policies, c, allowed, policy, reason, dry):
    d = evaluate(c, policies)
    assert d.allowed is allowed
    assert d.policy == policy
    assert reason in d.reason
    assert d.dry_run == dry


STRICT = P("converted", Action.DENY, (((Match(not_principals=(PRESENCE,)),),),))
# port-level PERMISSIVE on 8080 with a STRICT workload: deny unless port is 8080 or mTLS
PORT_PERMISSIVE = P(
    "converted_peer_authentication_x",
    Action.DENY,
    (((Match(not_destination_ports=(8080,)),), (Match(not_principals=(PRESENCE,)),)),),
)

STRICT_CASES = [
    ("strict denies plaintext", [STRICT], conn(None), False),
    ("strict allows mtls", [STRICT], conn(), True),
    ("port permissive allows plaintext on 8080", [PORT_PERMISSIVE], conn(None, port=8080), True),
    ("port permissive denies plaintext on 9090", [PORT_PERMISSIVE], conn(None, port=9090), False),
    ("port permissive allows mtls on 9090", [PORT_PERMISSIVE], conn(port=9090), True),
    ("strict plus allow by principal", [STRICT, P("a", Action.ALLOW, (((Match(principals=(ex("cluster.local/ns/shop/sa/backend"),)),),),))], conn(), True),
    ("strict plus allow other principal", [STRICT, P("a", Action.ALLOW, (((Match(principals=(ex("cluster.local/ns/web/sa/frontend"),)),),),))], conn(), False),
]  # fmt: skip


@pytest.mark.parametrize(
    "policies,c,allowed", [s[1:] for s in STRICT_CASES], ids=[s[0] for s in STRICT_CASES]
)
def test_strict_conversion_semantics(policies, c, allowed):
    assert evaluate(c, policies).allowed is allowed


def test_duplicate_policies_are_evaluated_once():
    d = evaluate(conn(), [P("d", Action.DENY, ALL, True)] * 3)
    assert d.dry_run == (("shop/d", False),)
