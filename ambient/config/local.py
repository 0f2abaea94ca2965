"""ztunnel's local config YAML (``LOCAL_XDS_PATH``) -> the xDS protos istiod would push.

The format is ztunnel's ``LocalConfig``: ``workloads`` (Workload fields in camelCase plus
``workloadIps``, ``protocol: HBONE|TCP`` and a ``services`` map ``"ns/host": {port: target}``),
``services`` (``vips: ["network/IP"]``, ``ports: {port: target}``) and ``policies``. Policy
rules may be written in ztunnel's vendored spelling ``rules: [[[match]]]`` or istio's
canonical ``groups:``, either as the same nested lists or as
``groups: [{rules: [{matches: [...]}]}]``.

Invariants: never raises on any input; each bad entry yields one error naming it and the
field, and the other entries are still returned. Every returned proto has passed
``model.from_proto``, so the store accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ambient.api.istio.security import authorization_pb2 as apb
from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.config._common import (
    FieldError,
    as_bool,
    as_cidr,
    as_ip,
    as_list,
    as_map,
    as_port,
    as_str,
    check_keys,
    enum_value,
    load_yaml,
    short,
)
from ambient.model import DEFAULT_CLUSTER_ID, ModelError, from_proto

__all__ = ["ParseResult", "match_from_dict", "parse_local_config", "parse_local_data"]


@dataclass
class ParseResult:
    resources: list[tuple[str, Any]] = field(default_factory=list)  # (key, Address|Authorization)
    errors: list[str] = field(default_factory=list)


_PROTOCOL = {"hbone": "HBONE", "tcp": "NONE", "none": "NONE"}
_STATUS = {"healthy": "HEALTHY", "unhealthy": "UNHEALTHY"}
_NETWORK_MODE = {"standard": "STANDARD", "hostnetwork": "HOST_NETWORK"}
_WORKLOAD_TYPE = {"deployment": "DEPLOYMENT", "cronjob": "CRONJOB", "pod": "POD", "job": "JOB"}
_APP_TUNNEL = {"none": "NONE", "proxy": "PROXY"}
_SCOPE = {"global": "GLOBAL", "namespace": "NAMESPACE", "workloadselector": "WORKLOAD_SELECTOR"}
_ACTION = {"allow": "ALLOW", "deny": "DENY"}
_IP_FAMILIES = {
    "automatic": "AUTOMATIC",
    "ipv4only": "IPV4_ONLY",
    "ipv6only": "IPV6_ONLY",
    "dual": "DUAL",
}

_WORKLOAD_STR = {
    "uid": "uid",
    "name": "name",
    "namespace": "namespace",
    "trustDomain": "trust_domain",
    "serviceAccount": "service_account",
    "network": "network",
    "workloadName": "workload_name",
    "canonicalName": "canonical_name",
    "canonicalRevision": "canonical_revision",
    "hostname": "hostname",
    "node": "node",
    "clusterId": "cluster_id",
}
_WORKLOAD_KEYS = frozenset(_WORKLOAD_STR) | {
    "workloadIps",
    "protocol",
    "services",
    "waypoint",
    "networkGateway",
    "workloadType",
    "nativeTunnel",
    "applicationTunnel",
    "authorizationPolicies",
    "status",
    "locality",
    "capacity",
    "networkMode",
}
_SERVICE_KEYS = frozenset(
    {
        "name",
        "namespace",
        "hostname",
        "vips",
        "ports",
        "subjectAltNames",
        "waypoint",
        "loadBalancer",
        "ipFamilies",
        "canonical",
        "endpoints",
        "visibility",
    }
)
_POLICY_KEYS = frozenset({"name", "namespace", "scope", "action", "dryRun", "rules", "groups"})
_MATCH_KEYS = {
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "principals": "principals",
    "notPrincipals": "not_principals",
    "sourceIps": "source_ips",
    "notSourceIps": "not_source_ips",
    "destinationIps": "destination_ips",
    "notDestinationIps": "not_destination_ips",
    "destinationPorts": "destination_ports",
    "notDestinationPorts": "not_destination_ports",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
}


def _enum(msg_cls: Any, fname: str, name: str) -> Any:  # the proto enum's number
    return msg_cls.DESCRIPTOR.fields_by_name[fname].enum_type.values_by_name[name].number


def _gateway(value: Any, name: str, out: Any) -> None:
    """ztunnel's GatewayAddress: destination "network/IP" or "ns/hostname"."""
    gw = as_map(value, name)
    check_keys(gw, {"destination", "hboneMtlsPort"}, name)
    dest = gw.get("destination")
    if isinstance(dest, dict):
        check_keys(dest, {"network", "address", "namespace", "hostname"}, f"{name}.destination")
        if "address" in dest:
            ip = as_ip(dest["address"], f"{name}.destination.address")
            out.address.network = as_str(dest.get("network", ""), f"{name}.destination.network")
            out.address.address = ip.packed
        else:
            out.hostname.namespace = as_str(dest.get("namespace", ""), f"{name}.destination")
            out.hostname.hostname = as_str(dest.get("hostname", ""), f"{name}.destination")
    else:
        s = as_str(dest, f"{name}.destination")
        left, sep, right = s.rpartition("/")
        if not sep:
            raise FieldError(f"{name}.destination {short(s)} is not 'network/IP' or 'ns/host'")
        try:
            ip = as_ip(right, "")
        except FieldError:
            out.hostname.namespace, out.hostname.hostname = left, right
        else:
            out.address.network, out.address.address = left, ip.packed
    out.hbone_mtls_port = as_port(gw.get("hboneMtlsPort", 15008), f"{name}.hboneMtlsPort")


def _port_list(value: Any, name: str, out: Any) -> None:
    for sp, tp in as_map(value, name).items():
        p = out.add()
        p.service_port = as_port(sp, f"{name} key")
        p.target_port = as_port(tp, f"{name}[{sp}]", allow_zero=True)


def _workload(d: dict[Any, Any]) -> tuple[str, Any]:
    check_keys(d, _WORKLOAD_KEYS)
    w = wpb.Workload()
    for yk, pk in _WORKLOAD_STR.items():
        if d.get(yk) is not None:
            setattr(w, pk, as_str(d[yk], yk))
    if not w.namespace:
        raise FieldError("namespace is required")
    if not w.uid:
        if not w.name:
            raise FieldError("uid (or name) is required")
        w.uid = f"{w.cluster_id or DEFAULT_CLUSTER_ID}//Pod/{w.namespace}/{w.name}"
    for i, ip in enumerate(as_list(d.get("workloadIps"), "workloadIps")):
        w.addresses.append(as_ip(ip, f"workloadIps[{i}]").packed)
    w.tunnel_protocol = _enum(
        wpb.Workload, "tunnel_protocol", enum_value(d.get("protocol", "TCP"), "protocol", _PROTOCOL)
    )
    if "status" in d:
        w.status = _enum(wpb.Workload, "status", enum_value(d["status"], "status", _STATUS))
    if "networkMode" in d:
        mode = enum_value(d["networkMode"], "networkMode", _NETWORK_MODE)
        w.network_mode = _enum(wpb.Workload, "network_mode", mode)
    if "workloadType" in d:
        wt = enum_value(d["workloadType"], "workloadType", _WORKLOAD_TYPE)
        w.workload_type = _enum(wpb.Workload, "workload_type", wt)
    if "nativeTunnel" in d:
        w.native_tunnel = as_bool(d["nativeTunnel"], "nativeTunnel")
    for yk in ("waypoint", "networkGateway"):
        if d.get(yk) is not None:
            _gateway(d[yk], yk, w.waypoint if yk == "waypoint" else w.network_gateway)
    if d.get("applicationTunnel") is not None:
        at = as_map(d["applicationTunnel"], "applicationTunnel")
        check_keys(at, {"protocol", "port"}, "applicationTunnel")
        proto = enum_value(at.get("protocol", "NONE"), "applicationTunnel.protocol", _APP_TUNNEL)
        w.application_tunnel.protocol = _enum(wpb.ApplicationTunnel, "protocol", proto)
        if at.get("port") is not None:
            w.application_tunnel.port = as_port(at["port"], "applicationTunnel.port")
    for i, k in enumerate(as_list(d.get("authorizationPolicies"), "authorizationPolicies")):
        w.authorization_policies.append(as_str(k, f"authorizationPolicies[{i}]"))
    if d.get("locality") is not None:
        loc = as_map(d["locality"], "locality")
        check_keys(loc, {"region", "zone", "subzone"}, "locality")
        for k in ("region", "zone", "subzone"):
            setattr(w.locality, k, as_str(loc.get(k, ""), f"locality.{k}"))
    if d.get("capacity") is not None:
        cap = d["capacity"]
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap < 2**32:
            raise FieldError(f"capacity {short(cap)} is not a non-negative integer")
        w.capacity.value = cap
    for host, ports in as_map(d.get("services"), "services").items():
        key = as_str(host, "services key")
        _port_list(ports, f"services[{key!r}]", w.services[key].ports)
    return w.uid, wpb.Address(workload=w)


def _service(d: dict[Any, Any]) -> tuple[str, Any]:
    check_keys(d, _SERVICE_KEYS)
    s = wpb.Service()
    for k in ("name", "namespace", "hostname"):
        if d.get(k) is not None:
            setattr(s, k, as_str(d[k], k))
    for i, v in enumerate(as_list(d.get("vips"), "vips")):
        net, sep, ip = as_str(v, f"vips[{i}]").rpartition("/")
        if not sep:
            raise FieldError(f"vips[{i}] {short(v)} is not 'network/IP' (use '/IP' for none)")
        s.addresses.add(network=net, address=as_ip(ip, f"vips[{i}]").packed)
    _port_list(d.get("ports"), "ports", s.ports)
    for i, san in enumerate(as_list(d.get("subjectAltNames"), "subjectAltNames")):
        s.subject_alt_names.append(as_str(san, f"subjectAltNames[{i}]"))
    if d.get("waypoint") is not None:
        _gateway(d["waypoint"], "waypoint", s.waypoint)
    if d.get("loadBalancer") is not None:
        lb = as_map(d["loadBalancer"], "loadBalancer")
        check_keys(lb, {"routingPreferences", "mode", "healthPolicy"}, "loadBalancer")
        m = s.load_balancing
        scopes = type(m).DESCRIPTOR.fields_by_name["routing_preference"].enum_type
        for i, p in enumerate(as_list(lb.get("routingPreferences"), "routingPreferences")):
            ev = scopes.values_by_name.get(str(p).upper())
            if ev is None:
                raise FieldError(f"loadBalancer.routingPreferences[{i}] {short(p)} is unknown")
            m.routing_preference.append(ev.number)
        for yk, pk in (("mode", "mode"), ("healthPolicy", "health_policy")):
            if lb.get(yk) is not None:
                ev = (
                    type(m)
                    .DESCRIPTOR.fields_by_name[pk]
                    .enum_type.values_by_name.get(str(lb[yk]).upper())
                )
                if ev is None:
                    raise FieldError(f"loadBalancer.{yk} {short(lb[yk])} is unknown")
                setattr(m, pk, ev.number)
    if d.get("ipFamilies") is not None:
        fam = enum_value(d["ipFamilies"], "ipFamilies", _IP_FAMILIES)
        s.ip_families = _enum(wpb.Service, "ip_families", fam)
    if "canonical" in d:
        s.canonical = as_bool(d["canonical"], "canonical")
    return f"{s.namespace}/{s.hostname}", wpb.Address(service=s)


def _string_match(value: Any, name: str, out: Any) -> None:
    sm = as_map(value, name)
    if len(sm) != 1:
        raise FieldError(
            f"{name} {short(value)} must have exactly one of exact|prefix|suffix|presence"
        )
    ((k, v),) = sm.items()
    kind = str(k).lower()
    if kind == "presence":
        out.presence.SetInParent()
    elif kind in ("exact", "prefix", "suffix"):
        setattr(out, kind, as_str(v, f"{name}.{k}"))
    else:
        raise FieldError(f"{name}: unknown string match {short(k)}")


def match_from_dict(d: Any, name: str, out: Any) -> None:
    """Fill an ``istio.security.Match`` from its camelCase YAML form (ztunnel's RbacMatch)."""
    m = as_map(d, name)
    check_keys(m, frozenset(_MATCH_KEYS), name)
    for yk, pk in _MATCH_KEYS.items():
        target = getattr(out, pk)
        for i, v in enumerate(as_list(m.get(yk), f"{name}.{yk}")):
            where = f"{name}.{yk}[{i}]"
            if pk.endswith("ips"):
                net = as_cidr(v, where)
                target.add(address=net.network_address.packed, length=net.prefixlen)
            elif pk.endswith("ports"):
                target.append(as_port(v, where))
            elif pk.endswith("service_accounts"):
                sa = as_map(v, where)
                check_keys(sa, {"namespace", "serviceAccount"}, where)
                target.add(
                    namespace=as_str(sa.get("namespace"), f"{where}.namespace"),
                    serviceAccount=as_str(sa.get("serviceAccount"), f"{where}.serviceAccount"),
                )
            else:
                _string_match(v, where, target.add())


def _groups(value: Any, name: str, out: Any) -> None:
    for g, grp in enumerate(as_list(value, name)):
        gname = f"{name}[{g}]"
        group = out.groups.add()
        if isinstance(grp, dict):  # {rules: [{matches: [...]}]}
            check_keys(grp, {"rules"}, gname)
            grp = [
                as_map(r, f"{gname}.rules[{i}]")
                for i, r in enumerate(as_list(grp.get("rules"), f"{gname}.rules"))
            ]
        for r, rule in enumerate(as_list(grp, gname)):
            rname = f"{gname}[{r}]"
            if isinstance(rule, dict):
                check_keys(rule, {"matches"}, rname)
                rule = rule.get("matches")
            rl = group.rules.add()
            for k, mt in enumerate(as_list(rule, rname)):
                match_from_dict(mt, f"{rname}[{k}]", rl.matches.add())


def _policy(d: dict[Any, Any]) -> tuple[str, Any]:
    check_keys(d, _POLICY_KEYS)
    a = apb.Authorization(
        name=as_str(d.get("name"), "name"), namespace=as_str(d.get("namespace"), "namespace")
    )
    if "scope" not in d or "action" not in d:
        raise FieldError("scope and action are required")
    a.scope = _enum(apb.Authorization, "scope", enum_value(d["scope"], "scope", _SCOPE))
    a.action = _enum(apb.Authorization, "action", enum_value(d["action"], "action", _ACTION))
    if d.get("dryRun") is not None:
        a.dry_run = as_bool(d["dryRun"], "dryRun")
    if "rules" in d and "groups" in d:
        raise FieldError("give either rules or groups, not both")
    spelling = "rules" if "rules" in d else "groups"
    _groups(d.get(spelling), spelling, a)
    return f"{a.namespace}/{a.name}", a


def _label(section: str, i: int, entry: Any) -> str:
    if isinstance(entry, dict):
        for k in ("uid", "hostname", "name"):
            v = entry.get(k)
            if isinstance(v, str) and v:
                return f"{section}[{i}] ({k} {v})"
    return f"{section}[{i}]"


_SECTIONS = {"workloads": _workload, "services": _service, "policies": _policy}


def parse_local_data(data: Any) -> ParseResult:
    """The already-loaded YAML document -> protos and errors."""
    res = ParseResult()
    if data is None:
        return res
    if not isinstance(data, dict):
        res.errors.append(f"local config: top level must be a mapping, got {short(data)}")
        return res
    for k in data:
        if k not in _SECTIONS:
            res.errors.append(
                f"local config: unknown field {short(k)} (want workloads, services, policies)"
            )
    for section, conv in _SECTIONS.items():
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            res.errors.append(f"{section}: {short(entries)} is not a list")
            continue
        for i, entry in enumerate(entries):
            label = _label(section, i, entry)
            try:
                if not isinstance(entry, dict):
                    raise FieldError(f"{short(entry)} is not a mapping")
                key, msg = conv(entry)
                from_proto(msg)  # the same checks the store makes
            except (FieldError, ModelError) as e:
                res.errors.append(f"{label}: {e}")
            except (ValueError, TypeError, OverflowError) as e:  # protobuf setters, defensively
                res.errors.append(f"{label}: {e}")
            else:
                res.resources.append((key, msg))
    return res


def parse_local_config(text: str) -> ParseResult:
    """ztunnel local config YAML text -> ``ParseResult(resources=[(key, proto)], errors)``."""
    data, err = load_yaml(text)
    if err is not None:
        return ParseResult(errors=[f"local config: {err}"])
    return parse_local_data(data)
