"""L7 AuthorizationPolicy for the waypoint: parse policies with ``targetRefs``, decide requests.

Role: the pure evaluator behind ``l7.authorize``.  Policies reach a waypoint through
``targetRefs`` naming its Gateway (all traffic through it) or a Service it serves (traffic
addressed to that service).  Selector policies are for ztunnel and never reach this module.

Evaluation (Istio's order): CUSTOM is not supported (dropped at parse time with a problem);
any matching DENY denies; then, if any ALLOW policy applies, the request must match one; else
it is allowed.  AUDIT policies only mark (``L7Decision.audit``).  Dry-run policies
(``istio.io/dry-run: "true"``) are evaluated and reported in ``L7Decision.dry_run`` but
never enforced.  A policy with no rules matches nothing (so an ALLOW one denies everything);
an empty rule matches everything.  A rule holds when every present part holds: ``from`` (any
source), ``to`` (any operation), each ``when`` condition.  Within a source or operation every
set field must hold: a positive field if any value matches, a ``not`` field if none does.

Fail closed: a field this waypoint cannot evaluate (``requestPrincipals``, ``request.auth.*``,
``connection.sni``, ...) or a rule that does not parse makes that part *not match* in ALLOW
and AUDIT policies and *match* in DENY policies, so it can only make a policy stricter; each
produces a problem for the operator.

String matching (principals, namespaces, paths, hosts, header values): ``*`` (any non-empty
value), ``prefix*``, ``*suffix``, or exact.  Hosts compare case-insensitively, with and
without the port.  A client without an identity matches no principal or namespace value, so
it fails positive fields and satisfies ``not`` fields.  ``remoteIpBlocks`` uses the source IP
(the waypoint trusts no ``X-Forwarded-For`` hops, as Istio's default).

Invariants: pure; ``authorize_with`` never raises; parsing raises only ``FieldError``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ambient.config._common import FieldError, as_cidr, as_list, as_map, as_str, check_keys, short
from ambient.model import IPNetwork
from waypoint.l7request import Request, strip_port

__all__ = [
    "DENY_BODY",
    "DENY_STATUS",
    "L7Decision",
    "L7Policy",
    "authorize_with",
    "parse_policy",
]

DENY_STATUS = 403
DENY_BODY = b"RBAC: access denied"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
_SPIFFE = "spiffe://"


@dataclass(frozen=True)
class L7Decision:
    """The outcome for one request; ``reason`` is meant for logs."""

    allowed: bool
    reason: str
    policy: str | None = None  # "ns/name" of the deciding policy, if one decided
    audit: tuple[str, ...] = ()  # AUDIT policies that matched
    dry_run: tuple[tuple[str, str, bool], ...] = ()  # (policy, action, matched)


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class StringMatch:
    value: str
    fold: bool = False  # case-insensitive (hosts)

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        v, a = (self.value.lower(), actual.lower()) if self.fold else (self.value, actual)
        if v == "*":
            return a != ""
        if v.startswith("*"):
            return a.endswith(v[1:])
        if v.endswith("*"):
            return a.startswith(v[:-1])
        return a == v


def _any(values: tuple[StringMatch, ...], actual: str | None) -> bool:
    return any(m.matches(actual) for m in values)


def _in_blocks(blocks: tuple[IPNetwork, ...], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in blocks)


def _principal(p: str | None) -> str | None:
    if p is None:
        return None
    return p[len(_SPIFFE):] if p.startswith(_SPIFFE) else p


@dataclass(frozen=True)
class SourceMatch:
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    remote_ip_blocks: tuple[IPNetwork, ...] = ()
    not_remote_ip_blocks: tuple[IPNetwork, ...] = ()
    unsupported: tuple[str, ...] = ()  # field names this waypoint cannot evaluate

    def matches(self, req: Request, unsupported_value: bool) -> bool:
        if self.unsupported and not unsupported_value:
            return False
        p = _principal(req.src.principal)
        ns = req.src.namespace
        ip = req.src.ip
        return (
            (not self.principals or _any(self.principals, p))
            and not _any(self.not_principals, p)
            and (not self.namespaces or _any(self.namespaces, ns))
            and not _any(self.not_namespaces, ns)
            and (not self.ip_blocks or _in_blocks(self.ip_blocks, ip))
            and not _in_blocks(self.not_ip_blocks, ip)
            and (not self.remote_ip_blocks or _in_blocks(self.remote_ip_blocks, ip))
            and not _in_blocks(self.not_remote_ip_blocks, ip)
        )


@dataclass(frozen=True)
class OperationMatch:
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[StringMatch, ...] = ()
    not_paths: tuple[StringMatch, ...] = ()
    hosts: tuple[StringMatch, ...] = ()
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()

    def matches(self, req: Request) -> bool:
        def host_hit(ms: tuple[StringMatch, ...]) -> bool:
            return _any(ms, req.authority) or _any(ms, strip_port(req.authority))

        return (
            (not self.methods or req.method in self.methods)
            and req.method not in self.not_methods
            and (not self.paths or _any(self.paths, req.path))
            and not _any(self.not_paths, req.path)
            and (not self.hosts or host_hit(self.hosts))
            and not host_hit(self.not_hosts)
            and (not self.ports or req.dst.port in self.ports)
            and req.dst.port not in self.not_ports
        )


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    unsupported: bool = False

    def _actual(self, req: Request) -> str | None:
        k = self.key
        if k.startswith("request.headers["):
            return req.header(k[len("request.headers["):-1])
        return {
            "source.ip": req.src.ip,
            "remote.ip": req.src.ip,
            "source.namespace": req.src.namespace,
            "source.principal": _principal(req.src.principal),
            "destination.port": str(req.dst.port),
            "destination.ip": req.dst.address or None,
        }.get(k)

    def _hit(self, v: str, actual: str | None) -> bool:
        if self.key in ("source.ip", "remote.ip", "destination.ip"):
            try:
                net = ipaddress.ip_network(v, strict=False)
            except ValueError:
                return False
            return actual is not None and _in_blocks((net,), actual)
        if self.key == "destination.port":
            return actual == v
        return StringMatch(v).matches(actual)

    def matches(self, req: Request, unsupported_value: bool) -> bool:
        if self.unsupported:
            return unsupported_value
        actual = self._actual(req)
        if self.values and not any(self._hit(v, actual) for v in self.values):
            return False
        return not any(self._hit(v, actual) for v in self.not_values)


@dataclass(frozen=True)
class Rule:
    sources: tuple[SourceMatch, ...] = ()
    operations: tuple[OperationMatch, ...] = ()
    conditions: tuple[Condition, ...] = ()
    broken: str | None = None  # the rule did not parse: treated as unsupported

    def matches(self, req: Request, unsupported_value: bool) -> bool:
        if self.broken is not None:
            return unsupported_value
        return (
            (not self.sources or any(s.matches(req, unsupported_value) for s in self.sources))
            and (not self.operations or any(o.matches(req) for o in self.operations))
            and all(c.matches(req, unsupported_value) for c in self.conditions)
        )


@dataclass(frozen=True)
class L7Policy:
    key: str  # "ns/name"
    action: str  # "ALLOW" | "DENY" | "AUDIT"
    rules: tuple[Rule, ...]
    dry_run: bool = False

    def matches(self, req: Request) -> bool:
        unsupported_value = self.action == "DENY"
        return any(r.matches(req, unsupported_value) for r in self.rules)


# ----------------------------------------------------------------------------- evaluation


def authorize_with(policies: Iterable[L7Policy], req: Request) -> L7Decision:
    """Decide ``req`` against the policies that apply to it (Istio's order)."""
    deny: list[L7Policy] = []
    allow: list[L7Policy] = []
    audit: list[str] = []
    dry: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for p in policies:
        if p.key in seen:
            continue
        seen.add(p.key)
        if p.dry_run:
            dry.append((p.key, p.action, p.matches(req)))
        elif p.action == "DENY":
            deny.append(p)
        elif p.action == "ALLOW":
            allow.append(p)
        elif p.action == "AUDIT" and p.matches(req):
            audit.append(p.key)
    au, dr = tuple(audit), tuple(dry)
    for p in deny:
        if p.matches(req):
            return L7Decision(False, f"denied by DENY policy {p.key}", p.key, au, dr)
    if not allow:
        return L7Decision(True, "no ALLOW policy applies", None, au, dr)
    for p in allow:
        if p.matches(req):
            return L7Decision(True, f"allowed by ALLOW policy {p.key}", p.key, au, dr)
    return L7Decision(
        False, "ALLOW policies apply but none matched: " + ", ".join(p.key for p in allow),
        None, au, dr,
    )


# -------------------------------------------------------------------------------- parsing

_SOURCE_FIELDS = {
    "principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks",
    "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts",
    "requestPrincipals", "notRequestPrincipals",
}
_UNSUPPORTED_SOURCE = ("requestPrincipals", "notRequestPrincipals")
_OP_FIELDS = {"methods", "notMethods", "paths", "notPaths", "hosts", "notHosts", "ports",
              "notPorts"}
_WHEN_SUPPORTED = {"source.ip", "remote.ip", "source.namespace", "source.principal",
                   "destination.port", "destination.ip"}
_WHEN_UNSUPPORTED_PREFIXES = ("request.auth.", "connection.sni", "experimental.",
                              "request.regex.headers[")


def _strings(raw: Any, where: str) -> list[str]:
    return [as_str(v, f"{where}[{i}]") for i, v in enumerate(as_list(raw, where))]


def _matches(raw: Any, where: str, *, fold: bool = False) -> tuple[StringMatch, ...]:
    return tuple(StringMatch(v, fold) for v in _strings(raw, where))


def _blocks(raw: Any, where: str) -> tuple[IPNetwork, ...]:
    return tuple(as_cidr(v, f"{where}[{i}]") for i, v in enumerate(as_list(raw, where)))


def _ports(raw: Any, where: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(as_list(raw, where)):
        s = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(s, str) or not s.isdigit() or not 0 < int(s) <= 65535:
            raise FieldError(f"{where}[{i}] {short(v)} is not a port number")
        out.append(int(s))
    return tuple(out)


def _source(raw: Any, where: str, td: str, ns: str) -> SourceMatch:
    raw = as_map(raw, where)
    check_keys(raw, _SOURCE_FIELDS, where)

    def sa(key: str) -> tuple[StringMatch, ...]:
        out = []
        for v in _strings(raw.get(key), f"{where}.{key}"):
            sa_ns, sep, name = v.partition("/")
            if not sep:
                sa_ns, name = ns, v
            out.append(StringMatch(f"{td}/ns/{sa_ns}/sa/{name}"))
        return tuple(out)

    principals = tuple(
        StringMatch(_principal(m.value) or "") for m in _matches(raw.get("principals"),
                                                                 f"{where}.principals")
    ) + sa("serviceAccounts")
    not_principals = tuple(
        StringMatch(_principal(m.value) or "") for m in _matches(raw.get("notPrincipals"),
                                                                 f"{where}.notPrincipals")
    ) + sa("notServiceAccounts")
    return SourceMatch(
        principals=principals,
        not_principals=not_principals,
        namespaces=_matches(raw.get("namespaces"), f"{where}.namespaces"),
        not_namespaces=_matches(raw.get("notNamespaces"), f"{where}.notNamespaces"),
        ip_blocks=_blocks(raw.get("ipBlocks"), f"{where}.ipBlocks"),
        not_ip_blocks=_blocks(raw.get("notIpBlocks"), f"{where}.notIpBlocks"),
        remote_ip_blocks=_blocks(raw.get("remoteIpBlocks"), f"{where}.remoteIpBlocks"),
        not_remote_ip_blocks=_blocks(raw.get("notRemoteIpBlocks"), f"{where}.notRemoteIpBlocks"),
        unsupported=tuple(k for k in _UNSUPPORTED_SOURCE if raw.get(k)),
    )


def _operation(raw: Any, where: str) -> OperationMatch:
    raw = as_map(raw, where)
    check_keys(raw, _OP_FIELDS, where)
    return OperationMatch(
        methods=tuple(_strings(raw.get("methods"), f"{where}.methods")),
        not_methods=tuple(_strings(raw.get("notMethods"), f"{where}.notMethods")),
        paths=_matches(raw.get("paths"), f"{where}.paths"),
        not_paths=_matches(raw.get("notPaths"), f"{where}.notPaths"),
        hosts=_matches(raw.get("hosts"), f"{where}.hosts", fold=True),
        not_hosts=_matches(raw.get("notHosts"), f"{where}.notHosts", fold=True),
        ports=_ports(raw.get("ports"), f"{where}.ports"),
        not_ports=_ports(raw.get("notPorts"), f"{where}.notPorts"),
    )


def _condition(raw: Any, where: str, problems: list[str]) -> Condition:
    raw = as_map(raw, where)
    check_keys(raw, {"key", "values", "notValues"}, where)
    key = as_str(raw.get("key"), f"{where}.key")
    values = tuple(_strings(raw.get("values"), f"{where}.values"))
    not_values = tuple(_strings(raw.get("notValues"), f"{where}.notValues"))
    if not values and not not_values:
        raise FieldError(f"{where}: condition {short(key)} has neither values nor notValues")
    if key.startswith(_WHEN_UNSUPPORTED_PREFIXES):
        problems.append(f"{where}: condition key {short(key)} is not supported by this "
                        "waypoint (no JWT/SNI); it never matches in ALLOW/AUDIT and always "
                        "matches in DENY")
        return Condition(key, values, not_values, unsupported=True)
    if key.startswith("request.headers["):
        if not key.endswith("]") or len(key) <= len("request.headers[]"):
            raise FieldError(f"{where}.key {short(key)} should look like request.headers[name]")
    elif key not in _WHEN_SUPPORTED:
        raise FieldError(f"{where}.key {short(key)} is not a known condition key")
    if key in ("source.ip", "remote.ip", "destination.ip"):
        for v in values + not_values:
            as_cidr(v, f"{where} value")
    if key == "destination.port":
        _ports(list(values + not_values), f"{where} values")
    return Condition(key, values, not_values)


def _rule(raw: Any, where: str, td: str, ns: str, problems: list[str]) -> Rule:
    raw = as_map(raw, where)
    check_keys(raw, {"from", "to", "when"}, where)
    sources = []
    for i, f in enumerate(as_list(raw.get("from"), f"{where}.from")):
        w = f"{where}.from[{i}]"
        f = as_map(f, w)
        check_keys(f, {"source"}, w)
        s = _source(f.get("source"), f"{w}.source", td, ns)
        if s.unsupported:
            problems.append(f"{w}.source: {', '.join(s.unsupported)} needs JWT, which this "
                            "waypoint does not support; the source never matches in "
                            "ALLOW/AUDIT and always matches in DENY")
        sources.append(s)
    ops = []
    for i, t in enumerate(as_list(raw.get("to"), f"{where}.to")):
        w = f"{where}.to[{i}]"
        t = as_map(t, w)
        check_keys(t, {"operation"}, w)
        ops.append(_operation(t.get("operation"), f"{w}.operation"))
    conds = tuple(_condition(c, f"{where}.when[{i}]", problems)
                  for i, c in enumerate(as_list(raw.get("when"), f"{where}.when")))
    return Rule(tuple(sources), tuple(ops), conds)


@dataclass(frozen=True)
class PolicyTarget:
    kind: str  # "Gateway" | "Service"
    name: str


_TARGET_GROUPS = {"Gateway": "gateway.networking.k8s.io", "Service": ""}


def parse_targets(spec: dict[Any, Any]) -> tuple[PolicyTarget, ...]:
    raw = list(as_list(spec.get("targetRefs"), "spec.targetRefs"))
    if spec.get("targetRef") is not None:
        raw.append(spec["targetRef"])
    out = []
    for i, t in enumerate(raw):
        w = f"spec.targetRefs[{i}]"
        t = as_map(t, w)
        check_keys(t, {"group", "kind", "name", "namespace"}, w)
        kind = t.get("kind")
        if kind not in _TARGET_GROUPS:
            raise FieldError(f"{w}.kind {short(kind)} is not supported by this waypoint "
                             "(use Gateway or Service)")
        if t.get("group", _TARGET_GROUPS[kind]) not in (_TARGET_GROUPS[kind], "core"):
            raise FieldError(f"{w}.group {short(t.get('group'))} does not go with kind {kind}")
        out.append(PolicyTarget(kind, as_str(t.get("name"), f"{w}.name")))
    return tuple(out)


def parse_policy(obj: dict[str, Any], trust_domain: str,
                 problems: list[str]) -> tuple[L7Policy, tuple[PolicyTarget, ...]] | None:
    """A targetRefs ``AuthorizationPolicy`` -> (policy, targets); ``None`` for CUSTOM.

    A rule that fails to parse is kept as a *broken* rule (fail closed) and reported in
    ``problems``; ``FieldError`` only when the policy as a whole is unusable (bad action or
    targets)."""
    meta = as_map(obj.get("metadata"), "metadata")
    ns = str(meta.get("namespace") or "default")
    spec = as_map(obj.get("spec"), "spec")
    check_keys(spec, {"targetRefs", "targetRef", "selector", "action", "rules", "provider"},
               "spec")
    if spec.get("selector") is not None:
        raise FieldError("spec has both selector and targetRefs; Istio rejects such a policy")
    action = spec.get("action", "ALLOW")
    if action == "CUSTOM":
        problems.append("action CUSTOM (external authorization) is not supported by this "
                        "waypoint; the policy is ignored")
        return None
    if action not in ("ALLOW", "DENY", "AUDIT"):
        raise FieldError(f"spec.action {short(action)} is not ALLOW|DENY|AUDIT|CUSTOM")
    targets = parse_targets(spec)
    anns = as_map(meta.get("annotations"), "metadata.annotations")
    dry = str(anns.get(DRY_RUN_ANNOTATION, "")).lower() == "true"
    rules = []
    for i, r in enumerate(as_list(spec.get("rules"), "spec.rules")):
        w = f"spec.rules[{i}]"
        try:
            rules.append(_rule(r, w, trust_domain, ns, problems))
        except Exception as e:  # FieldError, or junk a field check did not foresee
            if not isinstance(e, FieldError):
                e = FieldError(f"{w} cannot be read ({type(e).__name__}: {e})")
            effect = "matches every request" if action == "DENY" else "matches nothing"
            problems.append(f"{e}; this rule now {effect} (fail closed)")
            rules.append(Rule(broken=str(e)))
    return L7Policy(key=f"{ns}/{meta.get('name')}", action=action, rules=tuple(rules),
                    dry_run=dry), targets
