"""``ambientctl policy explain SRC DST:PORT``: which L4 policies apply to a connection, what
each rule and field did, and the decision, computed by the evaluator ztunnel runs.

Pure over a ``MeshState`` (from a config dump, see ``dumpstate``):

1. ``resolve`` turns SRC (``ns/pod`` or an IP) and DST (``ns/pod``, ``ns/service``, a
   service hostname, a pod IP or a service VIP, with a port) into one or more ``Case``s: a
   service resolves to each of its endpoints, with the service port mapped to the
   endpoint's target port (policies see the target port, as at the destination ztunnel).
   The source's identity is its SPIFFE ID when it is in the mesh (HBONE), else none
   (plaintext), unless forced with ``plaintext``.
2. ``explain_case`` runs ``ambient.authz.explain`` over ``state.policies_for(destination)``
   and adds why each policy is in scope, dry-run notes, PeerAuthentication STRICT effects
   and waypoint notes.
3. ``render`` prints it for people; ``to_json`` for machines.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ambient.authz import ConnectionInfo, Explanation, MatchTrace, PolicyTrace, explain
from ambient.identity import SpiffeId
from ambient.model import Action, Policy, Scope, Service, TunnelProtocol, Workload
from ambient.store import MeshState

__all__ = ["Case", "ExplainError", "Explained", "explain_case", "render", "resolve", "to_json"]

PA_PREFIX = "converted_peer_authentication_"
STATIC_STRICT = "istio_converted_static_strict"


class ExplainError(ValueError):
    """SRC or DST cannot be resolved in the config; the message says what exists."""


@dataclass(frozen=True)
class Case:
    src_ip: str
    src_workload: Workload | None
    identity: SpiffeId | None
    dst_workload: Workload
    dst_ip: str
    dst_port: int  # the port the destination ztunnel sees (target port)
    service: Service | None = None
    service_port: int | None = None


@dataclass(frozen=True)
class Explained:
    case: Case
    explanation: Explanation
    scope_reasons: dict[str, str]
    notes: tuple[str, ...] = field(default=())


def _find_workload(state: MeshState, ref: str) -> Workload | None:
    try:
        ip = ipaddress.ip_address(ref)
    except ValueError:
        ns, _, name = ref.partition("/")
        for w in state.workloads.values():
            if w.namespace == ns and w.name == name:
                return w
        return None
    for w in state.workloads.values():
        if ip in w.addresses:
            return w
    return None


def _find_service(state: MeshState, ref: str) -> Service | None:
    try:
        ip = ipaddress.ip_address(ref)
    except ValueError:
        ns, sep, name = ref.partition("/")
        for s in state.services.values():
            if (sep and s.namespace == ns and s.name == name) or s.hostname == ref:
                return s
        return None
    for s in state.services.values():
        if any(v.ip == ip for v in s.vips):
            return s
    return None


def _split_dst(dst: str) -> tuple[str, int]:
    host, sep, port = dst.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExplainError(f"destination {dst!r}: want NS/NAME:PORT or IP:PORT")
    return host.strip("[]"), int(port)


def _known(state: MeshState) -> str:
    names = sorted(f"{w.namespace}/{w.name}" for w in state.workloads.values())
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def resolve(state: MeshState, src: str, dst: str, *, plaintext: bool = False) -> list[Case]:
    """The connection(s) ``src`` -> ``dst`` means; raises ``ExplainError``."""
    host, port = _split_dst(dst)
    src_wl = _find_workload(state, src)
    if src_wl is None:
        try:
            src_ip = str(ipaddress.ip_address(src))
        except ValueError:
            raise ExplainError(f"source {src!r} is not a workload in this config (known: "
                               f"{_known(state)}); give NS/POD or an IP") from None
    else:
        if not src_wl.addresses:
            raise ExplainError(f"source {src} has no address in the config")
        src_ip = str(src_wl.addresses[0])
    mesh_src = src_wl is not None and src_wl.tunnel_protocol is TunnelProtocol.HBONE
    identity = src_wl.identity() if mesh_src and not plaintext and src_wl else None

    def case(w: Workload, p: int, svc: Service | None = None, sp: int | None = None) -> Case:
        ip = str(w.addresses[0]) if w.addresses else "?"
        return Case(src_ip, src_wl, identity, w, ip, p, svc, sp)

    svc = _find_service(state, host)
    dst_wl = _find_workload(state, host)
    # NS/NAME may name both a service and a pod: the service wins when it has the port.
    if svc is not None:
        eps = state.endpoints(svc, port)
        if not eps and dst_wl is not None:
            return [case(dst_wl, port)]
        if not eps:
            ports = ", ".join(str(p) for p in sorted(svc.ports)) or "none"
            raise ExplainError(f"service {svc.namespace}/{svc.name} has no endpoint on port "
                               f"{port} (its ports: {ports})")
        return [case(ep.workload, ep.target_port, svc, port) for ep in eps]
    if dst_wl is not None:
        return [case(dst_wl, port)]
    raise ExplainError(f"destination {host!r} is neither a workload nor a service in this "
                       f"config (workloads: {_known(state)})")


def _scope_reason(p: Policy, w: Workload, root: str | None) -> str:
    if p.key in w.authorization_policies:
        return "selects this workload (listed in its authorizationPolicies)"
    if p.scope is Scope.GLOBAL:
        return f"mesh-wide (GLOBAL scope, root namespace {root or p.namespace})"
    return f"namespace-wide (namespace {p.namespace})"


def _pa_note(p: Policy, t: PolicyTrace, plaintext: bool) -> str | None:
    if not (p.name.startswith(PA_PREFIX) or p.name == STATIC_STRICT):
        return None
    what = f"PeerAuthentication STRICT ({p.key}) denies connections without a peer identity"
    if plaintext and t.matched:
        return f"{what}: this one is plaintext, so it is refused; send it from a pod in the mesh"
    if plaintext:
        return f"{what}, but a port-level PERMISSIVE exception applies to this port"
    return f"{what}: this one is mTLS, so STRICT does not deny it"


def explain_case(state: MeshState, case: Case) -> Explained:
    w = case.dst_workload
    policies = state.policies_for(w)
    conn = ConnectionInfo(ipaddress.ip_address(case.src_ip), case.identity,
                          ipaddress.ip_address(case.dst_ip), case.dst_port, w)
    exp = explain(conn, policies)
    notes: list[str] = []
    for t in exp.policies:
        pa = _pa_note(t.policy, t, case.identity is None)
        if pa:
            notes.append(pa)
    for key, would_allow in exp.decision.dry_run:
        notes.append(f"dry-run policy {key} would {'allow' if would_allow else 'deny'} this "
                     "connection (logged by ztunnel, not enforced)")
    if case.identity is None and case.src_workload is not None:
        notes.append(f"the source {case.src_workload.namespace}/{case.src_workload.name} is "
                     "not in the mesh: its traffic arrives in plaintext (no principal, no "
                     "namespace)")
    gw = case.service.waypoint if case.service and case.service.waypoint else w.waypoint
    if gw is not None:
        notes.append(f"the destination has a waypoint ({gw.destination}): traffic is sent "
                     "there first, so at the destination ztunnel the peer is the waypoint's "
                     "identity, not the source's; L7 policy runs in the waypoint")
    reasons = {t.policy.key: _scope_reason(t.policy, w, state.root_namespace)
               for t in exp.policies}
    return Explained(case, exp, reasons, tuple(notes))


# ---------------------------------------------------------------------------------------------
# rendering


def _match_lines(m: MatchTrace, indent: str) -> list[str]:
    if m.empty:
        return [f"{indent}(empty match: skipped, never holds)"]
    out = []
    for f in m.fields:
        mark = "ok " if f.holds else "NO "
        out.append(f"{indent}{mark}{f.field} {list(f.wanted)} vs {f.actual}")
    return out


def _policy_lines(t: PolicyTrace, reason: str, deciding: str | None) -> list[str]:
    p = t.policy
    flag = " (dry-run)" if p.dry_run else ""
    verdict = "MATCHES" if t.matched else "does not match"
    tag = "  <== decides" if p.key == deciding else ""
    lines = [f"  {p.action.value:<5} {p.key}{flag}: {verdict}{tag}", f"        in scope: {reason}"]
    if not p.groups:
        lines.append("        no rules: never matches")
    for gi, g in enumerate(t.groups):
        lines.append(f"        rule {gi + 1}: {'holds' if g.holds else 'fails'}"
                     + ("" if len(g.rules) < 2 else " (all clauses must hold)"))
        for ri, r in enumerate(g.rules):
            if len(g.rules) > 1:
                lines.append(f"          clause {ri + 1}: {'holds' if r.holds else 'fails'}")
            for mi, m in enumerate(r.matches):
                if len(r.matches) > 1:
                    lines.append(f"            alternative {mi + 1}: "
                                 f"{'holds' if m.holds else 'fails'}")
                lines += _match_lines(m, "            ")
    return lines


def _describe_src(c: Case) -> str:
    who = f"{c.src_workload.namespace}/{c.src_workload.name} " if c.src_workload else ""
    ident = f"identity {c.identity}" if c.identity else "no identity (plaintext)"
    return f"{who}{c.src_ip}, {ident}"


def render(items: Iterable[Explained]) -> str:
    out: list[str] = []
    for e in items:
        c, d = e.case, e.explanation.decision
        via = (f" via service {c.service.namespace}/{c.service.name}:{c.service_port}"
               if c.service else "")
        out.append(f"connection: {_describe_src(c)}\n        -> {c.dst_workload.namespace}/"
                   f"{c.dst_workload.name} {c.dst_ip}:{c.dst_port}{via}")
        n = len(e.explanation.policies)
        out.append(f"policies in scope at the destination: {n}" + ("" if n else
                   " (none: everything is allowed)"))
        deny = [t for t in e.explanation.policies
                if t.policy.action is Action.DENY and not t.policy.dry_run]
        allow = [t for t in e.explanation.policies
                 if t.policy.action is Action.ALLOW and not t.policy.dry_run]
        dry = [t for t in e.explanation.policies if t.policy.dry_run]
        for t in deny + allow + dry:  # ztunnel's order: DENY first, then ALLOW
            out += _policy_lines(t, e.scope_reasons[t.policy.key], d.policy)
        out.append(f"decision: {'ALLOW' if d.allowed else 'DENY'} ({d.reason})")
        out += [f"note: {n}" for n in e.notes]
        out.append("")
    return "\n".join(out)


def to_json(items: Iterable[Explained]) -> list[dict[str, Any]]:
    res = []
    for e in items:
        c, d = e.case, e.explanation.decision
        res.append({
            "source": {"ip": c.src_ip, "identity": str(c.identity) if c.identity else None,
                       "workload": f"{c.src_workload.namespace}/{c.src_workload.name}"
                       if c.src_workload else None},
            "destination": {"workload": f"{c.dst_workload.namespace}/{c.dst_workload.name}",
                            "ip": c.dst_ip, "port": c.dst_port,
                            "service": f"{c.service.namespace}/{c.service.name}"
                            if c.service else None, "servicePort": c.service_port},
            "decision": {"allowed": d.allowed, "policy": d.policy, "reason": d.reason,
                         "dryRun": [{"policy": k, "wouldAllow": v} for k, v in d.dry_run]},
            "policies": [{
                "policy": t.policy.key, "action": t.policy.action.value,
                "dryRun": t.policy.dry_run, "matched": t.matched,
                "inScope": e.scope_reasons[t.policy.key],
                "rules": [[[{"empty": m.empty, "holds": m.holds,
                             "fields": [{"field": f.field, "wanted": list(f.wanted),
                                         "actual": f.actual, "holds": f.holds}
                                        for f in m.fields]}
                            for m in r.matches] for r in g.rules] for g in t.groups],
            } for t in e.explanation.policies],
            "notes": list(e.notes),
        })
    return res
