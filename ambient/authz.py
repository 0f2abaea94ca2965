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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ambient.identity import SpiffeId
from ambient.model import Action, IPAddress, Match, Policy, StringMatch, Workload

__all__ = [
    "ConnectionInfo",
    "Decision",
    "evaluate",
    "match_matches",
    "policy_matches",
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


def _field(positive: tuple, negative: tuple, pred) -> bool:
    if positive and not any(pred(v) for v in positive):
        return False
    if negative and any(pred(v) for v in negative):
        return False
    return True


def match_matches(m: Match, conn: ConnectionInfo) -> bool:
    """Whether one ``Match`` holds for ``conn`` (an empty match returns True; callers skip it)."""
    ident = conn.src_identity
    return (
        _field(m.destination_ips, m.not_destination_ips, lambda n: conn.dst_ip in n)
        and _field(m.source_ips, m.not_source_ips, lambda n: conn.src_ip in n)
        and _field(m.destination_ports, m.not_destination_ports, lambda p: p == conn.dst_port)
        and _field(
            m.service_accounts,
            m.not_service_accounts,
            lambda s: (
                ident is not None
                and s.namespace == ident.namespace
                and s.service_account == ident.service_account
            ),
        )
        and _field(
            m.principals,
            m.not_principals,
            lambda sm: ident is not None and _principal_matches(sm, ident),
        )
        and _field(
            m.namespaces,
            m.not_namespaces,
            lambda sm: ident is not None and sm.matches(ident.namespace),
        )
    )


def policy_matches(policy: Policy, conn: ConnectionInfo) -> bool:
    """Whether ``policy``'s rules select ``conn`` (regardless of its action or dry-run)."""
    for group in policy.groups:
        if all(
            not rule or any(not m.is_empty() and match_matches(m, conn) for m in rule)
            for rule in group
        ):
            return True
    return False


def evaluate(conn: ConnectionInfo, policies: Iterable[Policy]) -> Decision:
    """Decide ``conn`` against the policies in scope for its destination (Istio's order)."""
    seen: set[str] = set()
    deny: list[Policy] = []
    allow: list[Policy] = []
    dry: list[tuple[str, bool]] = []
    for p in policies:
        if p.key in seen:
            continue
        seen.add(p.key)
        if p.dry_run:
            hit = policy_matches(p, conn)
            dry.append((p.key, hit if p.action is Action.ALLOW else not hit))
        elif p.action is Action.DENY:
            deny.append(p)
        else:
            allow.append(p)
    dry_run = tuple(dry)
    for p in deny:
        if policy_matches(p, conn):
            return Decision(False, p.key, f"denied by policy {p.key}", dry_run)
    if not allow:
        return Decision(True, None, "allowed: no ALLOW policies", dry_run)
    for p in allow:
        if policy_matches(p, conn):
            return Decision(True, p.key, f"allowed by policy {p.key}", dry_run)
    return Decision(False, None, "denied: allow policies exist, but none allowed", dry_run)
