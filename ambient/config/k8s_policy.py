"""AuthorizationPolicy and PeerAuthentication -> ``istio.security.Authorization``, like istiod.

Pure functions over Kubernetes object dicts. Istio's rules for ztunnel:
- ``targetRef(s)`` policies are for waypoints and are skipped; AUDIT/CUSTOM are skipped.
- scope: WORKLOAD_SELECTOR with a selector, else NAMESPACE, or GLOBAL in the root namespace.
- each rule is a Group: a Rules for ``to`` (one Match per operation), one for ``from`` (one
  Match per source), one per ``when`` condition.
- HTTP-only fields: in ALLOW the whole rule is dropped, in DENY only the HTTP part is; both
  produce a warning naming the policy and the fields.  A DENY rule made only of HTTP fields
  is left with empty matches, which ztunnel never matches: istiod does the same and says the
  policy has no effect, and so does our warning.
- PeerAuthentication: the effective mesh/namespace/workload mode decides whether a workload
  references ``<root>/istio_converted_static_strict``; selector policies with port-level mTLS
  become ``converted_peer_authentication_<name>``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ambient.api.istio.security import authorization_pb2 as apb
from ambient.config._common import FieldError, as_list, as_map, as_str, short

STATIC_STRICT_NAME = "istio_converted_static_strict"
PA_PREFIX = "converted_peer_authentication_"

_L4_WHEN = {
    "source.ip": "source_ips",
    "source.namespace": "namespaces",
    "source.principal": "principals",
    "destination.ip": "destination_ips",
    "destination.port": "destination_ports",
}
_HTTP_OPS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_HTTP_SOURCES = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
_SOURCE_KEYS = {
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
    *_HTTP_SOURCES,
}
_OP_KEYS = {"ports", "notPorts", *_HTTP_OPS}


@dataclass
class PolicyOut:
    key: str
    proto: Any
    selector: dict[str, str] | None  # matchLabels of a WORKLOAD_SELECTOR policy


def match_labels(spec: dict[Any, Any], where: str) -> dict[str, str] | None:
    sel = spec.get("selector")
    if sel is None:
        return None
    labels = as_map(as_map(sel, f"{where}.selector").get("matchLabels"), f"{where}.matchLabels")
    out = {as_str(k, f"{where}.matchLabels key"): str(v) for k, v in labels.items()}
    return out or None


def _strings(values: Any, where: str) -> list[str]:
    return [as_str(v, f"{where}[{i}]") for i, v in enumerate(as_list(values, where))]


def _add_string_matches(values: list[str], target: Any) -> None:
    for v in values:
        sm = target.add()
        if v == "*":
            sm.presence.SetInParent()
        elif v.startswith("*"):
            sm.suffix = v[1:]
        elif v.endswith("*"):
            sm.prefix = v[:-1]
        else:
            sm.exact = v


def _add_ips(values: list[str], target: Any, where: str) -> None:
    for v in values:
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise FieldError(f"{where} {short(v)} is not an IP or CIDR") from None
        target.add(address=net.network_address.packed, length=net.prefixlen)


def _add_ports(values: list[str], target: Any, where: str) -> None:
    for v in values:
        if not v.isdigit() or not 0 < int(v) <= 65535:
            raise FieldError(f"{where} {short(v)} is not a port number")
        target.append(int(v))


def _add_service_accounts(values: list[str], target: Any, ns: str) -> None:
    for v in values:
        sa_ns, sep, sa = v.partition("/")
        if not sep:
            sa_ns, sa = ns, v
        target.add(namespace=sa_ns, serviceAccount=sa)


def _rule(rule: Any, where: str, ns: str) -> tuple[list[Any], list[str]]:
    """One AuthorizationPolicy rule -> (list of Rules protos, HTTP fields found)."""
    rule = as_map(rule, where)
    http: list[str] = []
    rules = []
    to_matches = []
    for i, to in enumerate(as_list(rule.get("to"), f"{where}.to")):
        w = f"{where}.to[{i}].operation"
        op = as_map(as_map(to, f"{where}.to[{i}]").get("operation"), w)
        bad = [k for k in op if k not in _OP_KEYS]
        if bad:
            raise FieldError(f"{w}: unknown field {short(bad[0])}")
        http += [k for k in _HTTP_OPS if op.get(k)]
        m = apb.Match()
        _add_ports(_strings(op.get("ports"), f"{w}.ports"), m.destination_ports, f"{w}.ports")
        _add_ports(
            _strings(op.get("notPorts"), f"{w}.notPorts"), m.not_destination_ports, f"{w}.notPorts"
        )
        to_matches.append(m)
    from_matches = []
    for i, fr in enumerate(as_list(rule.get("from"), f"{where}.from")):
        w = f"{where}.from[{i}].source"
        src = as_map(as_map(fr, f"{where}.from[{i}]").get("source"), w)
        bad = [k for k in src if k not in _SOURCE_KEYS]
        if bad:
            raise FieldError(f"{w}: unknown field {short(bad[0])}")
        http += [k for k in _HTTP_SOURCES if src.get(k)]
        m = apb.Match()
        _add_ips(_strings(src.get("ipBlocks"), f"{w}.ipBlocks"), m.source_ips, f"{w}.ipBlocks")
        _add_ips(
            _strings(src.get("notIpBlocks"), f"{w}.notIpBlocks"),
            m.not_source_ips,
            f"{w}.notIpBlocks",
        )
        for yk, pk in (
            ("namespaces", "namespaces"),
            ("notNamespaces", "not_namespaces"),
            ("principals", "principals"),
            ("notPrincipals", "not_principals"),
        ):
            _add_string_matches(_strings(src.get(yk), f"{w}.{yk}"), getattr(m, pk))
        _add_service_accounts(
            _strings(src.get("serviceAccounts"), f"{w}.serviceAccounts"), m.service_accounts, ns
        )
        _add_service_accounts(
            _strings(src.get("notServiceAccounts"), f"{w}.notServiceAccounts"),
            m.not_service_accounts,
            ns,
        )
        from_matches.append(m)
    if to_matches:
        rules.append(apb.Rules(matches=to_matches))
    if from_matches:
        rules.append(apb.Rules(matches=from_matches))
    for i, cond in enumerate(as_list(rule.get("when"), f"{where}.when")):
        w = f"{where}.when[{i}]"
        cond = as_map(cond, w)
        key = as_str(cond.get("key"), f"{w}.key")
        m = apb.Match()
        field_name = _L4_WHEN.get(key)
        if field_name is None:
            http.append(key)
        else:
            for invert, yk in ((False, "values"), (True, "notValues")):
                vals = _strings(cond.get(yk), f"{w}.{yk}")
                target = getattr(m, ("not_" if invert else "") + field_name)
                if field_name.endswith("ips"):
                    _add_ips(vals, target, f"{w}.{yk}")
                elif field_name.endswith("ports"):
                    _add_ports(vals, target, f"{w}.{yk}")
                else:
                    _add_string_matches(vals, target)
        rules.append(apb.Rules(matches=[m]))
    return rules, http


def authorization_policy(
    obj: dict[Any, Any], root_namespace: str
) -> tuple[PolicyOut | None, list[str]]:
    """An AuthorizationPolicy -> (PolicyOut or None if not for ztunnel, warnings)."""
    meta = obj["metadata"]
    name, ns = meta["name"], meta["namespace"]
    where = f"AuthorizationPolicy {ns}/{name}"
    spec = as_map(obj.get("spec"), "spec")
    if spec.get("targetRef") or spec.get("targetRefs"):
        return None, [f"{where}: has targetRef(s), so it is for a waypoint, not ztunnel; skipped"]
    action = spec.get("action", "ALLOW")
    if action in ("AUDIT", "CUSTOM"):
        return None, [f"{where}: ztunnel does not support the {action} action; skipped"]
    if action not in ("ALLOW", "DENY"):
        raise FieldError(f"spec.action {short(action)} is not ALLOW|DENY|AUDIT|CUSTOM")
    selector = match_labels(spec, "spec")
    if selector is not None:
        scope = "WORKLOAD_SELECTOR"
    else:
        scope = "GLOBAL" if ns == root_namespace else "NAMESPACE"
    a = apb.Authorization(name=name, namespace=ns)
    a.scope = apb.Scope.Value(scope)
    a.action = apb.Action.Value(action)
    annotations = as_map(meta.get("annotations"), "metadata.annotations")
    a.dry_run = str(annotations.get("istio.io/dry-run", "")).lower() == "true"
    http: list[str] = []
    for i, rule in enumerate(as_list(spec.get("rules"), "spec.rules")):
        rules, found = _rule(rule, f"spec.rules[{i}]", ns)
        http += found
        if action == "ALLOW" and found:
            continue  # L7 rules never match in ALLOW: drop the whole rule (stricter)
        a.groups.add().rules.extend(rules)
    warnings = []
    if http:
        fields = ", ".join(sorted(set(http)))
        if action == "ALLOW":
            how = "rules with HTTP attributes are omitted from this ALLOW policy (stricter)"
        elif not _has_effective_group(a):
            # Istio sends the empty matches anyway; ztunnel skips them, so nothing is denied.
            how = (
                "without them this DENY policy has no rule ztunnel can enforce and has NO "
                "effect; attach it to a waypoint with targetRefs"
            )
        else:
            how = "this DENY policy is enforced without its HTTP parts (stricter)"
        warnings.append(
            f"{where}: ztunnel does not support HTTP attributes ({fields}); {how}; "
            "use a waypoint to enforce HTTP rules"
        )
    return PolicyOut(f"{ns}/{name}", a, selector), warnings


def _has_effective_group(a: Any) -> bool:
    """Whether some group can match: ztunnel skips empty matches (they never match)."""
    for g in a.groups:
        if all(any(m.ByteSize() for m in r.matches) for r in g.rules):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# PeerAuthentication


def _strict_deny_match() -> Any:
    m = apb.Match()
    m.not_principals.add().presence.SetInParent()
    return m


def static_strict_policy(root_namespace: str) -> PolicyOut:
    a = apb.Authorization(name=STATIC_STRICT_NAME, namespace=root_namespace)
    a.scope = apb.WORKLOAD_SELECTOR
    a.action = apb.DENY
    a.groups.add().rules.add().matches.append(_strict_deny_match())
    return PolicyOut(f"{root_namespace}/{STATIC_STRICT_NAME}", a, None)


def pa_mode(mtls: Any, where: str) -> str:
    mode = as_map(mtls, where).get("mode", "UNSET") or "UNSET"
    if mode not in ("UNSET", "STRICT", "PERMISSIVE", "DISABLE"):
        raise FieldError(f"{where}.mode {short(mode)} is not UNSET|STRICT|PERMISSIVE|DISABLE")
    return mode


def port_modes(spec: dict[Any, Any]) -> dict[int, str]:
    out = {}
    for port, mtls in as_map(spec.get("portLevelMtls"), "spec.portLevelMtls").items():
        p = int(port) if isinstance(port, int) or str(port).isdigit() else -1
        if not 0 < p <= 65535:
            raise FieldError(f"spec.portLevelMtls key {short(port)} is not a port number")
        out[p] = pa_mode(mtls, f"spec.portLevelMtls[{p}]")
    return out


@dataclass
class PeerAuthn:
    """A validated PeerAuthentication: what the PA logic needs."""

    name: str
    namespace: str
    selector: dict[str, str] | None
    mode: str
    ports: dict[int, str]
    order: tuple[str, str]  # (creationTimestamp, name): oldest wins, then the first name


def parse_peer_authentication(obj: dict[Any, Any], index: int = 0) -> PeerAuthn:
    meta = obj["metadata"]
    spec = as_map(obj.get("spec"), "spec")
    return PeerAuthn(
        name=meta["name"],
        namespace=meta["namespace"],
        selector=match_labels(spec, "spec"),
        mode=pa_mode(spec.get("mtls"), "spec.mtls"),
        ports=port_modes(spec),
        order=(str(meta.get("creationTimestamp") or ""), meta["name"]),
    )


def _oldest(pas: list[PeerAuthn]) -> PeerAuthn | None:
    return min(pas, key=lambda p: p.order) if pas else None


def effective_pa_keys(
    root: str, mesh: PeerAuthn | None, ns: PeerAuthn | None, wl: PeerAuthn | None
) -> list[str]:
    """Which converted PA policies a workload references (istiod's inheritance rules)."""
    strict = mesh is not None and mesh.mode == "STRICT"
    if ns is not None and ns.mode != "UNSET":
        strict = ns.mode == "STRICT"
    port_key = ""
    if wl is not None:
        if wl.mode == "STRICT":
            strict = True
        if wl.mode in ("PERMISSIVE", "DISABLE"):
            strict = False
        own = f"{wl.namespace}/{PA_PREFIX}{wl.name}"
        modes = set(wl.ports.values())
        if wl.ports:
            if wl.mode == "STRICT":
                if modes & {"PERMISSIVE", "DISABLE"}:
                    port_key, strict = own, False
            elif wl.mode in ("PERMISSIVE", "DISABLE"):
                if "STRICT" in modes:
                    port_key = own
            elif strict:
                if "PERMISSIVE" in modes:
                    port_key, strict = own, False
            elif "STRICT" in modes:
                port_key = own
    keys = [f"{root}/{STATIC_STRICT_NAME}"] if strict else []
    return sorted(keys + ([port_key] if port_key else []))


def convert_peer_authentication(
    root: str, pa: PeerAuthn, ns_pa: PeerAuthn | None, mesh_pa: PeerAuthn | None
) -> PolicyOut | None:
    """A workload PA with port-level mTLS -> its DENY policy (None when not needed)."""
    if pa.namespace == root or pa.selector is None or not pa.ports:
        return None
    ns_mode = ns_pa.mode if ns_pa else None
    mesh_mode = mesh_pa.mode if mesh_pa else None
    rules: list[Any] = []
    groups: list[Any] = []
    if pa.mode == "STRICT":
        rules.append(apb.Rules(matches=[_strict_deny_match()]))
    non_strict = False
    for port, mode in sorted(pa.ports.items()):
        if mode == "STRICT":
            parent_strict = pa.mode == "STRICT" or (
                pa.mode == "UNSET"
                and (ns_mode == "STRICT" or (ns_mode in (None, "UNSET") and mesh_mode == "STRICT"))
            )
            if parent_strict:
                continue
            m = _strict_deny_match()
            m.destination_ports.append(port)
            groups.append(apb.Group(rules=[apb.Rules(matches=[m])]))
        elif mode in ("PERMISSIVE", "DISABLE"):
            if pa.mode in ("PERMISSIVE", "DISABLE"):
                continue
            if pa.mode == "UNSET" and (
                (ns_mode is not None and ns_mode != "STRICT")
                or (ns_mode is None and mesh_mode is not None and mesh_mode != "STRICT")
                or (ns_mode is None and mesh_mode is None)
            ):
                continue
            non_strict = True
            rules.append(apb.Rules(matches=[apb.Match(not_destination_ports=[port])]))
    if pa.mode == "STRICT" and not non_strict:
        return None
    if not rules and not groups:
        return None
    merge = (mesh_mode == "STRICT" and ns_mode in (None, "UNSET", "STRICT")) or ns_mode == "STRICT"
    if merge and non_strict:
        rules.append(apb.Rules(matches=[_strict_deny_match()]))
    if rules:
        groups.append(apb.Group(rules=rules))
    name = f"{PA_PREFIX}{pa.name}"
    a = apb.Authorization(name=name, namespace=pa.namespace, groups=groups)
    a.scope = apb.WORKLOAD_SELECTOR
    a.action = apb.DENY
    return PolicyOut(f"{pa.namespace}/{name}", a, pa.selector)


def pick_peer_authentications(
    pas: list[PeerAuthn], root: str, namespace: str, labels: dict[str, str]
) -> tuple[PeerAuthn | None, PeerAuthn | None, PeerAuthn | None]:
    """(mesh, namespace, workload) PeerAuthentication in effect for a pod; oldest wins."""
    mesh = _oldest([p for p in pas if p.namespace == root and p.selector is None])
    ns = _oldest([p for p in pas if p.namespace == namespace != root and p.selector is None])
    wl = _oldest(
        [
            p
            for p in pas
            if p.namespace == namespace != root
            and p.selector is not None
            and all(labels.get(k) == v for k, v in p.selector.items())
        ]
    )
    return mesh, ns, wl
