"""The L4 authorization evaluator: a pure function from (connection, policies) to a Decision.

It follows ztunnel's order exactly:

1. dry-run policies are evaluated and reported in ``Decision.dry_run`` but never enforced;
2. any matching DENY policy denies;
3. no ALLOW policies at all allows;
4. any matching ALLOW policy allows;
5. otherwise deny ("allow policies exist, but none allowed").

Match semantics (ztunnel ``rbac.rs``): a policy with no groups never matches; groups are ORed;
a group's rules are ANDed (an empty rule holds); a rule's matches are ORed, and an empty match
is skipped (it never makes the rule hold). Within a match every non-empty field must hold: a
positive field holds if any entry matches, a ``not_`` field holds if no entry matches.

Source identity: principals compare against ``<td>/ns/<ns>/sa/<sa>`` (Istio's principal form,
no ``spiffe://``); a policy value written with ``spiffe://`` is also accepted. A plaintext
connection (no identity) matches no principal, namespace or service-account entry - not even
presence - so it fails every positive identity field and satisfies every negative one. That
is how PeerAuthentication STRICT (DENY with ``not_principals: [presence]``) denies plaintext.

``explain`` is ``evaluate`` with its reasons (for ``ambientctl policy explain``): it runs the
same per-field predicates (``_FIELD_SPECS``) and the same decision order (``_decide``), and
records every group, rule, match and field on the way, so an explanation can never disagree
with the data path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ambient.identity import SpiffeId
from ambient.model import Action, IPAddress, Match, Policy, StringMatch, Workload

__all__ = [
    "ConnectionInfo",
    "Decision",
    "Explanation",
    "FieldTrace",
    "GroupTrace",
    "MatchTrace",
    "PolicyTrace",
    "RuleTrace",
    "evaluate",
    "explain",
    "match_matches",
    "policy_matches",
    "trace_match",
    "trace_policy",
]

_SPIFFE = "spiffe://"


@dataclass(frozen=True)
class ConnectionInfo:
    """What L4 authorization knows about a connection at the destination."""

    src_ip: IPAddress
    src_identity: SpiffeId | None  # None for plaintext
    dst_ip: IPAddress
    dst_port: int
    dst_workload: Workload | None = None

    def __post_init__(self) -> None:
        # Normalise IPv4-mapped IPv6 addresses (dual-stack sockets) so v4 CIDRs match them.
        for name in ("src_ip", "dst_ip"):
            ip = ipaddress.ip_address(getattr(self, name))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            object.__setattr__(self, name, ip)


@dataclass(frozen=True)
class Decision:
    """The outcome for one connection; ``reason`` is meant for logs."""

    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy, if one decided
    reason: str
    dry_run: tuple[tuple[str, bool], ...] = ()  # (policy key, would it allow)


def _principal_matches(sm: StringMatch, ident: SpiffeId) -> bool:
    full = str(ident)
    if sm.kind in ("exact", "prefix") and sm.value.startswith(_SPIFFE):
        return sm.matches(full)
    return sm.matches(full[len(_SPIFFE) :])


# One predicate per Match field pair: (value, connection) -> does this entry match. Shared by
# the data path (``match_matches``) and the explanation (``explain``), so they cannot diverge.
def _dst_ip(n: Any, c: ConnectionInfo) -> bool:
    return c.dst_ip in n


def _src_ip(n: Any, c: ConnectionInfo) -> bool:
    return c.src_ip in n


def _dst_port(p: Any, c: ConnectionInfo) -> bool:
    return bool(p == c.dst_port)


def _service_account(s: Any, c: ConnectionInfo) -> bool:
    ident = c.src_identity
    return (
        ident is not None
        and s.namespace == ident.namespace
        and s.service_account == ident.service_account
    )


def _principal(sm: Any, c: ConnectionInfo) -> bool:
    return c.src_identity is not None and _principal_matches(sm, c.src_identity)


def _namespace(sm: Any, c: ConnectionInfo) -> bool:
    return c.src_identity is not None and sm.matches(c.src_identity.namespace)


_Pred = Callable[[Any, ConnectionInfo], bool]
# (positive field, negative field, predicate), in the order ztunnel checks them.
_FIELD_SPECS: tuple[tuple[str, str, _Pred], ...] = (
    ("destination_ips", "not_destination_ips", _dst_ip),
    ("source_ips", "not_source_ips", _src_ip),
    ("destination_ports", "not_destination_ports", _dst_port),
    ("service_accounts", "not_service_accounts", _service_account),
    ("principals", "not_principals", _principal),
    ("namespaces", "not_namespaces", _namespace),
)


def match_matches(m: Match, conn: ConnectionInfo) -> bool:
    """Whether one ``Match`` holds for ``conn`` (an empty match returns True; callers skip it).

    Every non-empty field must hold: a positive field if any entry matches, a ``not_`` field
    if none does.
    """
    for pos_name, neg_name, pred in _FIELD_SPECS:
        pos = getattr(m, pos_name)
        if pos and not any(pred(v, conn) for v in pos):
            return False
        neg = getattr(m, neg_name)
        if neg and any(pred(v, conn) for v in neg):
            return False
    return True


def _rule_holds(rule: tuple[Match, ...], conn: ConnectionInfo,
                matcher: Callable[[Match, ConnectionInfo], bool]) -> bool:
    # An empty rule holds; otherwise one non-empty match must hold.
    return not rule or any(not m.is_empty() and matcher(m, conn) for m in rule)


def policy_matches(policy: Policy, conn: ConnectionInfo) -> bool:
    """Whether ``policy``'s rules select ``conn`` (regardless of its action or dry-run)."""
    return any(
        all(_rule_holds(rule, conn, match_matches) for rule in group) for group in policy.groups
    )


def evaluate(conn: ConnectionInfo, policies: Iterable[Policy]) -> Decision:
    """Decide ``conn`` against the policies in scope for its destination (Istio's order)."""
    return _decide(policies, lambda p: policy_matches(p, conn))


def _decide(policies: Iterable[Policy], matches: Callable[[Policy], bool]) -> Decision:
    """Istio's decision order over ``policies``; ``matches(p)`` says whether p selects the
    connection. The one implementation behind both ``evaluate`` and ``explain``."""
    seen: set[str] = set()
    deny: list[Policy] = []
    allow: list[Policy] = []
    dry: list[tuple[str, bool]] = []
    for p in policies:
        if p.key in seen:
            continue
        seen.add(p.key)
        if p.dry_run:
            hit = matches(p)
            dry.append((p.key, hit if p.action is Action.ALLOW else not hit))
        elif p.action is Action.DENY:
            deny.append(p)
        else:
            allow.append(p)
    dry_run = tuple(dry)
    for p in deny:
        if matches(p):
            return Decision(False, p.key, f"denied by policy {p.key}", dry_run)
    if not allow:
        return Decision(True, None, "allowed: no ALLOW policies", dry_run)
    for p in allow:
        if matches(p):
            return Decision(True, p.key, f"allowed by policy {p.key}", dry_run)
    return Decision(False, None, "denied: allow policies exist, but none allowed", dry_run)


# ---------------------------------------------------------------------------------------------
# Explanations (``ambientctl policy explain``): the same predicates and the same decision order,
# recording every field, match, rule and group on the way.


@dataclass(frozen=True)
class FieldTrace:
    """One non-empty Match field: what it wants, what the connection has, whether it holds."""

    field: str  # camelCase, as in the config dump: "principals", "notDestinationPorts", ...
    wanted: tuple[str, ...]
    actual: str
    holds: bool


@dataclass(frozen=True)
class MatchTrace:
    empty: bool  # an empty match is skipped: it never makes its rule hold
    holds: bool
    fields: tuple[FieldTrace, ...]


@dataclass(frozen=True)
class RuleTrace:
    holds: bool  # an empty rule holds; otherwise one of its matches must
    matches: tuple[MatchTrace, ...]


@dataclass(frozen=True)
class GroupTrace:
    holds: bool  # every rule holds
    rules: tuple[RuleTrace, ...]


@dataclass(frozen=True)
class PolicyTrace:
    policy: Policy
    matched: bool  # the policy's rules select the connection (any group holds)
    groups: tuple[GroupTrace, ...]


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    policies: tuple[PolicyTrace, ...]  # every policy in scope, in evaluation order


def _render(v: Any) -> str:
    if isinstance(v, StringMatch):
        return "*" if v.kind == "presence" else {
            "exact": v.value, "prefix": f"{v.value}*", "suffix": f"*{v.value}"}[v.kind]
    if hasattr(v, "service_account"):
        return f"{v.namespace}/{v.service_account}"
    return str(v)


def _actual(pos_name: str, conn: ConnectionInfo) -> str:
    ident = conn.src_identity
    if pos_name == "destination_ips":
        return str(conn.dst_ip)
    if pos_name == "source_ips":
        return str(conn.src_ip)
    if pos_name == "destination_ports":
        return str(conn.dst_port)
    if ident is None:
        return "(no identity: plaintext)"
    if pos_name == "service_accounts":
        return f"{ident.namespace}/{ident.service_account}"
    if pos_name == "namespaces":
        return ident.namespace
    return str(ident)[len(_SPIFFE):]


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.capitalize() for p in rest)


def trace_match(m: Match, conn: ConnectionInfo) -> MatchTrace:
    """Every non-empty field of ``m`` checked against ``conn`` (positive then negative)."""
    fields: list[FieldTrace] = []
    for pos_name, neg_name, pred in _FIELD_SPECS:
        for name, negative in ((pos_name, False), (neg_name, True)):
            vals = getattr(m, name)
            if not vals:
                continue
            hit = any(pred(v, conn) for v in vals)
            fields.append(FieldTrace(_camel(name), tuple(_render(v) for v in vals),
                                     _actual(pos_name, conn), hit != negative))
    empty = m.is_empty()
    return MatchTrace(empty, not empty and all(f.holds for f in fields), tuple(fields))


def trace_policy(policy: Policy, conn: ConnectionInfo) -> PolicyTrace:
    groups = []
    for group in policy.groups:
        rules = []
        for rule in group:
            matches = tuple(trace_match(m, conn) for m in rule)
            rules.append(RuleTrace(not rule or any(t.holds for t in matches), matches))
        groups.append(GroupTrace(all(r.holds for r in rules), tuple(rules)))
    return PolicyTrace(policy, any(g.holds for g in groups), tuple(groups))


def explain(conn: ConnectionInfo, policies: Iterable[Policy]) -> Explanation:
    """``evaluate`` with its reasons: the decision (from the same decision code) plus a trace
    of every policy in scope down to each field."""
    unique: dict[str, Policy] = {}
    for p in policies:
        unique.setdefault(p.key, p)
    traces = {k: trace_policy(p, conn) for k, p in unique.items()}
    decision = _decide(unique.values(), lambda p: traces[p.key].matched)
    return Explanation(decision, tuple(traces.values()))
