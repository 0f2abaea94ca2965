"""L7 AuthorizationPolicy tables: every field, every action, order, dry-run, fail-closed."""

from __future__ import annotations

from typing import Any

import pytest
from waypoint_l7_helpers import authz, cfg_of, mkreq

from waypoint.l7 import DENY_BODY, DENY_STATUS, authorize

SVC_TARGET = [{"kind": "Service", "group": "", "name": "web"}]
GW_TARGET = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]


def pol(name: str, action: str | None, rules: list[dict[str, Any]] | None,
        targets: list[dict[str, Any]] | None = None, *, dry_run: bool = False,
        ns: str = "app") -> tuple[str, dict[str, Any]]:
    spec: dict[str, Any] = {"targetRefs": targets if targets is not None else SVC_TARGET}
    if action is not None:
        spec["action"] = action
    if rules is not None:
        spec["rules"] = rules
    return authz(ns, name, spec, {"istio.io/dry-run": "true"} if dry_run else None)


def test_deny_response_is_istios() -> None:
    assert (DENY_STATUS, DENY_BODY) == (403, b"RBAC: access denied")


def test_no_policy_allows() -> None:
    cfg, problems = cfg_of()
    d = authorize(cfg, mkreq("/"))
    assert d.allowed and d.policy is None and problems == []


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(key: str, values: list[str] | None = None,
         not_values: list[str] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"key": key}
    if values is not None:
        c["values"] = values
    if not_values is not None:
        c["notValues"] = not_values
    return {"when": [c]}


PLAIN = {"principal": None, "src_ns": None}
SLEEP = "cluster.local/ns/client/sa/sleep"

FIELD_CASES = [
    # principals
    (src(principals=[SLEEP]), {}, True),
    (src(principals=["spiffe://" + SLEEP]), {}, True),
    (src(principals=[SLEEP]), {"principal": "spiffe://" + SLEEP}, True),
    (src(principals=["cluster.local/ns/client/*"]), {}, True),
    (src(principals=["*/sa/sleep"]), {}, True),
    (src(principals=["*/sa/other"]), {}, False),
    (src(principals=["*"]), {}, True),
    (src(principals=["*"]), PLAIN, False),
    (src(notPrincipals=[SLEEP]), {}, False),
    (src(notPrincipals=[SLEEP]), PLAIN, True),
    (src(notPrincipals=["*"]), PLAIN, True),
    # service accounts become principals
    (src(serviceAccounts=["client/sleep"]), {}, True),
    (src(serviceAccounts=["sleep"]), {}, False),  # means app/sleep (policy namespace)
    (src(notServiceAccounts=["client/sleep"]), {}, False),
    # namespaces
    (src(namespaces=["client"]), {}, True),
    (src(namespaces=["cli*"]), {}, True),
    (src(namespaces=["other"]), {}, False),
    (src(namespaces=["*"]), PLAIN, False),
    (src(notNamespaces=["client"]), {}, False),
    (src(notNamespaces=["client"]), PLAIN, True),
    # IP blocks
    (src(ipBlocks=["10.0.0.0/24"]), {}, True),
    (src(ipBlocks=["10.0.0.5"]), {}, True),
    (src(ipBlocks=["10.0.1.0/24"]), {}, False),
    (src(ipBlocks=["10.0.0.0/24"]), {"src_ip": "::ffff:10.0.0.7"}, True),
    (src(ipBlocks=["fd00::/8"]), {"src_ip": "fd00::1"}, True),
    (src(ipBlocks=["fd00::/8"]), {}, False),
    (src(notIpBlocks=["10.0.0.0/24"]), {}, False),
    (src(notIpBlocks=["10.9.0.0/16"]), {}, True),
    (src(remoteIpBlocks=["10.0.0.0/8"]), {}, True),
    (src(notRemoteIpBlocks=["10.0.0.0/8"]), {}, False),
    # every source field must hold
    (src(namespaces=["client"], ipBlocks=["10.9.0.0/16"]), {}, False),
    # any source may hold
    ({"from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["client"]}}]},
     {}, True),
    # methods
    (op(methods=["GET", "HEAD"]), {}, True),
    (op(methods=["POST"]), {}, False),
    (op(methods=["get"]), {}, False),  # case-sensitive, as in Istio
    (op(notMethods=["GET"]), {}, False),
    (op(notMethods=["DELETE"]), {}, True),
    # paths
    (op(paths=["/api/users"]), {"path": "/api/users"}, True),
    (op(paths=["/api/users"]), {"path": "/api/users/1"}, False),
    (op(paths=["/api/*"]), {"path": "/api/users/1"}, True),
    (op(paths=["*.png"]), {"path": "/img/a.png"}, True),
    (op(paths=["*"]), {"path": "/"}, True),
    (op(paths=["/api/users"]), {"path": "/api/users", "query": "x=1"}, True),  # no query
    (op(notPaths=["/admin*"]), {"path": "/admin/x"}, False),
    (op(notPaths=["/admin*"]), {"path": "/public"}, True),
    # hosts: case-insensitive, with or without the port
    (op(hosts=["web.app.svc.cluster.local"]), {}, True),
    (op(hosts=["WEB.app.svc.cluster.local"]), {}, True),
    (op(hosts=["web.app.svc.cluster.local:80"]), {}, True),
    (op(hosts=["*.app.svc.cluster.local"]), {}, True),
    (op(hosts=["web"]), {}, False),
    (op(hosts=["web"]), {"authority": "web"}, True),
    (op(notHosts=["web.*"]), {}, False),
    # ports (the service port the client addressed)
    (op(ports=["80"]), {}, True),
    (op(ports=[80]), {}, True),
    (op(ports=["8080"]), {}, False),
    (op(notPorts=["80"]), {}, False),
    (op(notPorts=["8080"]), {}, True),
    # every operation field must hold; any operation may hold
    (op(methods=["GET"], paths=["/x"]), {"path": "/y"}, False),
    ({"to": [{"operation": {"paths": ["/x"]}}, {"operation": {"paths": ["/y"]}}]},
     {"path": "/y"}, True),
    # when
    (when("request.headers[x-user]", ["alice"]), {"headers": (("x-user", "alice"),)}, True),
    (when("request.headers[X-User]", ["ali*"]), {"headers": (("x-user", "alice"),)}, True),
    (when("request.headers[x-user]", ["alice"]), {"headers": (("x-user", "bob"),)}, False),
    (when("request.headers[x-user]", ["alice"]), {}, False),
    (when("request.headers[x-user]", ["*"]), {"headers": (("x-user", ""),)}, False),
    (when("request.headers[x-user]", None, ["bob"]), {"headers": (("x-user", "bob"),)}, False),
    (when("request.headers[x-user]", None, ["bob"]), {}, True),
    (when("source.ip", ["10.0.0.0/24"]), {}, True),
    (when("source.ip", None, ["10.0.0.0/24"]), {}, False),
    (when("remote.ip", ["10.0.0.5"]), {}, True),
    (when("source.namespace", ["client"]), {}, True),
    (when("source.namespace", ["client"]), PLAIN, False),
    (when("source.principal", [SLEEP]), {}, True),
    (when("source.principal", ["*/sa/other"]), {}, False),
    (when("destination.port", ["80"]), {}, True),
    (when("destination.port", ["81"]), {}, False),
    (when("destination.ip", ["10.96.0.0/16"]), {}, True),
    # from, to and when must all hold
    ({**src(namespaces=["client"]), **op(methods=["GET"]),
      **when("request.headers[x-a]", ["1"])}, {"headers": (("x-a", "1"),)}, True),
    ({**src(namespaces=["client"]), **op(methods=["GET"]),
      **when("request.headers[x-a]", ["1"])}, {}, False),
    # an empty rule matches everything
    ({}, PLAIN, True),
]


@pytest.mark.parametrize("rule,req_kw,matches", FIELD_CASES)
def test_allow_rule_fields(rule: dict[str, Any], req_kw: dict[str, Any], matches: bool) -> None:
    cfg, problems = cfg_of(pol("p", "ALLOW", [rule]))
    assert problems == []
    d = authorize(cfg, mkreq(**req_kw))
    assert d.allowed is matches
    assert d.policy == ("app/p" if matches else None)


@pytest.mark.parametrize("rule,req_kw,matches", FIELD_CASES)
def test_deny_rule_fields(rule: dict[str, Any], req_kw: dict[str, Any], matches: bool) -> None:
    cfg, _ = cfg_of(pol("p", "DENY", [rule]))
    d = authorize(cfg, mkreq(**req_kw))
    assert d.allowed is not matches


def test_actions_and_order() -> None:
    allow_get = pol("allow-get", "ALLOW", [op(methods=["GET"])])
    deny_admin = pol("deny-admin", "DENY", [op(paths=["/admin*"])], GW_TARGET)
    audit_all = pol("audit", "AUDIT", [{}])
    cfg, problems = cfg_of(allow_get, deny_admin, audit_all)
    assert problems == []
    d = authorize(cfg, mkreq("/admin/x"))  # DENY first, though ALLOW matches
    assert (d.allowed, d.policy, d.audit) == (False, "app/deny-admin", ("app/audit",))
    d = authorize(cfg, mkreq("/x"))
    assert (d.allowed, d.policy) == (True, "app/allow-get")
    d = authorize(cfg, mkreq("/x", method="POST"))  # an ALLOW exists, none matches
    assert not d.allowed and d.policy is None and "app/allow-get" in d.reason
    # only AUDIT: marks, never decides
    cfg, _ = cfg_of(audit_all)
    d = authorize(cfg, mkreq("/x"))
    assert d.allowed and d.audit == ("app/audit",)


def test_policies_without_rules() -> None:
    cfg, _ = cfg_of(pol("nothing", None, None))  # spec with only targetRefs: allow nothing
    assert not authorize(cfg, mkreq("/")).allowed
    cfg, _ = cfg_of(pol("deny-none", "DENY", None))  # a DENY without rules matches nothing
    assert authorize(cfg, mkreq("/")).allowed
    cfg, _ = cfg_of(pol("all", "ALLOW", [{}]))
    assert authorize(cfg, mkreq("/", **PLAIN)).allowed


def test_dry_run_is_reported_not_enforced() -> None:
    cfg, problems = cfg_of(
        pol("dry-deny", "DENY", [op(paths=["/x"])], dry_run=True),
        pol("dry-allow", "ALLOW", [op(paths=["/y"])], dry_run=True),
    )
    assert problems == []
    d = authorize(cfg, mkreq("/x"))
    assert d.allowed  # dry-run ALLOW policies do not make "ALLOW exists"
    assert set(d.dry_run) == {("app/dry-deny", "DENY", True), ("app/dry-allow", "ALLOW", False)}


def test_targets_gateway_and_service() -> None:
    cfg, problems = cfg_of(
        pol("gw", "DENY", [op(paths=["/gw"])], GW_TARGET),
        pol("svc", "DENY", [op(paths=["/svc"])], SVC_TARGET),
        pol("other-wp", "DENY", [{}], [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                        "name": "other"}]),
        pol("other-ns", "DENY", [{}], GW_TARGET, ns="client"),  # Gateway client/wp: not us
        authz("app", "selector", {"selector": {"matchLabels": {"a": "b"}}, "action": "DENY",
                                  "rules": [{}]}),  # for ztunnel
    )
    assert problems == []
    assert not authorize(cfg, mkreq("/gw", svc="api")).allowed
    assert authorize(cfg, mkreq("/svc", svc="api")).allowed
    assert not authorize(cfg, mkreq("/svc")).allowed
    assert authorize(cfg, mkreq("/other")).allowed


@pytest.mark.parametrize(
    "rule,problem",
    [
        (src(requestPrincipals=["issuer/subject"]), "requestPrincipals needs JWT"),
        (src(notRequestPrincipals=["*"]), "notRequestPrincipals needs JWT"),
        (when("request.auth.claims[groups]", ["admin"]), "request.auth.claims"),
        (when("connection.sni", ["x"]), "connection.sni"),
    ],
)
def test_unsupported_fields_are_stricter(rule: dict[str, Any], problem: str) -> None:
    cfg, problems = cfg_of(pol("a", "ALLOW", [rule]))
    assert len(problems) == 1 and problem in problems[0]
    assert problems[0].startswith("AuthorizationPolicy app/a: ")
    assert not authorize(cfg, mkreq("/")).allowed  # ALLOW: never matches
    cfg, problems = cfg_of(pol("d", "DENY", [rule]))
    assert len(problems) == 1
    assert not authorize(cfg, mkreq("/")).allowed  # DENY: always matches


@pytest.mark.parametrize(
    "bad_rule",
    [
        src(ipBlocks=["not-an-ip"]),
        op(ports=["http"]),
        op(verbs=["GET"]),
        when("source.ip", ["nope"]),
        when("request.method", ["GET"]),
        when("request.headers[x-a]"),
        {"from": [{"source": {}, "extra": 1}]},
        {"unless": []},
        "not a mapping",
    ],
)
def test_broken_rules_fail_closed(bad_rule: Any) -> None:
    ok_rule = op(paths=["/ok"])
    cfg, problems = cfg_of(pol("a", "ALLOW", [bad_rule, ok_rule]))
    assert len(problems) == 1 and "AuthorizationPolicy app/a: spec.rules[0]" in problems[0]
    assert "matches nothing" in problems[0]
    assert authorize(cfg, mkreq("/ok")).allowed  # the good rule still applies
    assert not authorize(cfg, mkreq("/other")).allowed
    cfg, problems = cfg_of(pol("d", "DENY", [bad_rule]))
    assert len(problems) == 1 and "matches every request" in problems[0]
    assert not authorize(cfg, mkreq("/ok")).allowed


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({"targetRefs": SVC_TARGET, "action": "MAYBE"}, "spec.action"),
        ({"targetRefs": [{"kind": "ServiceEntry", "name": "x"}]}, "ServiceEntry"),
        ({"targetRefs": SVC_TARGET, "selector": {"matchLabels": {}}}, "both selector"),
        ({"targetRefs": SVC_TARGET, "rulez": []}, "unknown field"),
    ],
)
def test_unusable_policies_are_skipped_with_a_problem(spec: dict[str, Any],
                                                      fragment: str) -> None:
    deny = pol("deny-x", "DENY", [op(paths=["/x"])])
    cfg, problems = cfg_of(authz("app", "bad", spec), deny)
    assert len(problems) == 1 and problems[0].startswith("AuthorizationPolicy app/bad: ")
    assert fragment in problems[0]
    assert not authorize(cfg, mkreq("/x")).allowed
    assert authorize(cfg, mkreq("/y")).allowed


def test_custom_is_not_supported_and_ignored() -> None:
    cfg, problems = cfg_of(authz("app", "ext", {"targetRefs": SVC_TARGET, "action": "CUSTOM",
                                                "provider": {"name": "opa"}, "rules": [{}]}))
    assert len(problems) == 1 and "CUSTOM" in problems[0]
    assert authorize(cfg, mkreq("/")).allowed
