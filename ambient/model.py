"""The internal mesh model: immutable dataclasses built once from Istio's xDS protos.

Every config source (xDS, ztunnel's local YAML, Kubernetes manifests) produces the protobuf
resources istiod would push (``istio.workload.Address`` and ``istio.security.Authorization``).
The store converts each resource exactly once with ``from_proto`` into the frozen objects here;
everything downstream (routing, authorization, admin dumps) reads only these objects.

Invariants:
- A model object is valid by construction: ``from_proto`` checks what ztunnel checks (IP byte
  lengths, enum values, ``ns/host`` keys) plus what would otherwise fail later (empty uid, port
  ranges, an identity that cannot be a SPIFFE ID) and raises ``ModelError`` naming the resource
  and the field.
- Defaults are applied as ztunnel applies them: elided trust domain = ``cluster.local``, service
  account = ``default``, cluster id = ``Kubernetes``, capacity = 1.
- ``from_proto(to_proto(x)) == x`` for every model object.
- ``to_json`` gives ztunnel's ``/config_dump`` shapes (camelCase; enum spellings as ztunnel's
  serde renders them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

from ambient.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_HBONE_PORT",
    "DEFAULT_SERVICE_ACCOUNT",
    "DEFAULT_TRUST_DOMAIN",
    "Action",
    "ApplicationTunnel",
    "GatewayAddress",
    "HealthStatus",
    "IPAddress",
    "IPNetwork",
    "LoadBalancing",
    "Locality",
    "Match",
    "ModelError",
    "NamespacedHostname",
    "NetworkAddress",
    "Policy",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "StringMatch",
    "TunnelProtocol",
    "Workload",
    "address_from_proto",
    "from_proto",
    "ip_from_bytes",
    "policy_from_proto",
    "service_from_proto",
    "to_proto",
    "workload_from_proto",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_CAPACITY = 1
DEFAULT_HBONE_PORT = 15008


class ModelError(ValueError):
    """A resource cannot become a model object; the message names the resource and field."""


class TunnelProtocol(StrEnum):
    NONE = "NONE"
    HBONE = "HBONE"


class HealthStatus(StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class Scope(StrEnum):
    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


# ---------------------------------------------------------------------------------------------
# small value types


class NetworkAddress(NamedTuple):
    """An IP on a network; unpacks as ``(network, ip)``. Key form ``"network/IP"``."""

    network: str
    ip: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.ip}"


class NamespacedHostname(NamedTuple):
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True)
class GatewayAddress:
    """A waypoint or network gateway: an address or a service hostname, plus its HBONE port."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = DEFAULT_HBONE_PORT

    def to_json(self) -> dict[str, Any]:
        # ztunnel renders both destination kinds as strings: "network/IP" or "ns/hostname".
        return {"destination": str(self.destination), "hboneMtlsPort": self.hbone_mtls_port}


@dataclass(frozen=True)
class ApplicationTunnel:
    protocol: str = "NONE"  # NONE | PROXY
    port: int | None = None


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class LoadBalancing:
    routing_preference: tuple[str, ...] = ()
    mode: str = "UNSPECIFIED_MODE"
    health_policy: str = "ONLY_HEALTHY"


@dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch: ``kind`` is exact, prefix, suffix or presence (any non-empty)."""

    kind: str
    value: str = ""

    def matches(self, s: str) -> bool:
        if self.kind == "exact":
            return s == self.value
        if self.kind == "prefix":
            return s.startswith(self.value)
        if self.kind == "suffix":
            return s.endswith(self.value)
        return s != ""  # presence

    def to_json(self) -> dict[str, Any]:
        # ztunnel's serde rendering of its StringMatch enum.
        if self.kind == "presence":
            return {"Presence": []}
        return {self.kind.capitalize(): self.value}


@dataclass(frozen=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


_MATCH_FIELDS = (
    "namespaces",
    "not_namespaces",
    "principals",
    "not_principals",
    "source_ips",
    "not_source_ips",
    "destination_ips",
    "not_destination_ips",
    "destination_ports",
    "not_destination_ports",
    "service_accounts",
    "not_service_accounts",
)


@dataclass(frozen=True)
class Match:
    """One ``istio.security.Match``: every non-empty field must hold (see ``ambient.authz``)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in _MATCH_FIELDS)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _MATCH_FIELDS:
            vals = getattr(self, f)
            if not vals:
                continue
            if f.endswith("ips"):
                js: list[Any] = [str(n) for n in vals]
            elif f.endswith("ports"):
                js = list(vals)
            elif f.endswith("service_accounts"):
                js = [{"namespace": s.namespace, "serviceAccount": s.service_account} for s in vals]
            else:
                js = [s.to_json() for s in vals]
            out[_camel(f)] = js
        return out


# ---------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Workload:
    """A workload (pod, VM, ...). ``services`` maps ``"ns/hostname"`` -> {service port: target}."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = "DEPLOYMENT"
    services: Mapping[str, Mapping[int, int]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    cluster_id: str = DEFAULT_CLUSTER_ID
    locality: Locality = Locality()
    network_mode: str = "STANDARD"
    capacity: int = DEFAULT_CAPACITY

    def __post_init__(self) -> None:
        # Freeze the nested mapping so a Workload can be shared across readers safely.
        frozen = MappingProxyType(
            {k: MappingProxyType(dict(v)) for k, v in dict(self.services).items()}
        )
        object.__setattr__(self, "services", frozen)

    @property
    def key(self) -> str:
        return self.uid

    @cached_property
    def _identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    def identity(self) -> SpiffeId:
        """The SPIFFE identity this workload runs as (validated by ``from_proto``)."""
        return self._identity

    def network_addresses(self) -> tuple[NetworkAddress, ...]:
        return tuple(NetworkAddress(self.network, ip) for ip in self.addresses)

    def to_json(self) -> dict[str, Any]:
        """ztunnel's config_dump shape for a workload."""
        out: dict[str, Any] = {
            "uid": self.uid,
            "workloadIps": [str(ip) for ip in self.addresses],
            "protocol": "HBONE" if self.tunnel_protocol is TunnelProtocol.HBONE else "TCP",
            "networkMode": "HostNetwork" if self.network_mode == "HOST_NETWORK" else "Standard",
            "name": self.name,
            "namespace": self.namespace,
            "trustDomain": self.trust_domain,
            "serviceAccount": self.service_account,
            "network": self.network,
            "workloadName": self.workload_name,
            "workloadType": self.workload_type.lower(),
            "canonicalName": self.canonical_name,
            "canonicalRevision": self.canonical_revision,
            "hostname": self.hostname,
            "node": self.node,
            "nativeTunnel": self.native_tunnel,
            "authorizationPolicies": list(self.authorization_policies),
            "status": self.status.value.capitalize(),
            "clusterId": self.cluster_id,
            "services": sorted(self.services),
            "capacity": self.capacity,
        }
        if self.waypoint is not None:
            out["waypoint"] = self.waypoint.to_json()
        if self.network_gateway is not None:
            out["networkGateway"] = self.network_gateway.to_json()
        if self.application_tunnel is not None:
            at = self.application_tunnel
            out["applicationTunnel"] = {"protocol": at.protocol, "port": at.port}
        if self.locality != Locality():
            loc = self.locality
            out["locality"] = {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}
        return out


@dataclass(frozen=True)
class Service:
    """A service; ``ports`` maps service port -> target port (0: resolved per endpoint)."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancing: LoadBalancing | None = None
    ip_families: str = "AUTOMATIC"
    canonical: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "hostname": self.hostname,
            "vips": [str(v) for v in self.vips],
            "ports": {str(k): v for k, v in sorted(self.ports.items())},
            "subjectAltNames": list(self.subject_alt_names),
            "canonical": self.canonical,
            "ipFamilies": self.ip_families,
        }
        if self.waypoint is not None:
            out["waypoint"] = self.waypoint.to_json()
        if self.load_balancing is not None:
            lb = self.load_balancing
            out["loadBalancer"] = {
                "routingPreferences": list(lb.routing_preference),
                "mode": lb.mode,
                "healthPolicy": lb.health_policy,
            }
        return out


@dataclass(frozen=True)
class Policy:
    """An L4 authorization policy: ``groups`` (OR) -> rules (AND) -> matches (OR)."""

    name: str
    namespace: str
    scope: Scope = Scope.NAMESPACE
    action: Action = Action.ALLOW
    groups: tuple[tuple[tuple[Match, ...], ...], ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "scope": _pascal(self.scope.value),
            "action": _pascal(self.action.value),
            "rules": [[[m.to_json() for m in rule] for rule in grp] for grp in self.groups],
            "dryRun": self.dry_run,
        }


# ---------------------------------------------------------------------------------------------
# helpers


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _pascal(upper_snake: str) -> str:
    return "".join(p.capitalize() for p in upper_snake.split("_"))


def ip_from_bytes(raw: bytes, where: str) -> IPAddress:
    """4 or 16 raw bytes -> an IP; ``where`` names the resource field for the error."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ModelError(f"{where}: address has {len(raw)} bytes, want 4 (IPv4) or 16 (IPv6)")


def _enum_name(msg: Any, fname: str, where: str) -> str:
    value = getattr(msg, fname)
    enum = msg.DESCRIPTOR.fields_by_name[fname].enum_type
    ev = enum.values_by_number.get(value)
    if ev is None:
        raise ModelError(f"{where}: {fname} has unknown value {value}")
    return ev.name


def _enum_number(msg_cls: Any, fname: str, name: str) -> int:
    enum = msg_cls.DESCRIPTOR.fields_by_name[fname].enum_type
    return enum.values_by_name[name].number


def _check_port(port: int, where: str, *, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if not lo <= port <= 65535:
        raise ModelError(f"{where}: port {port} is out of range {lo}..65535")
    return port


def _ns_host(key: str, where: str) -> str:
    ns, sep, host = key.partition("/")
    if not sep or not ns or not host:
        raise ModelError(f"{where}: {key!r} is not 'namespace/hostname'")
    return key


def _pb():
    # Imported lazily so the pure model (and authz) import without the generated code.
    from ambient.api.istio.security import authorization_pb2
    from ambient.api.istio.workload import workload_pb2

    return workload_pb2, authorization_pb2


# ---------------------------------------------------------------------------------------------
# from proto


def _gateway_from_proto(gw: Any, where: str) -> GatewayAddress:
    kind = gw.WhichOneof("destination")
    port = gw.hbone_mtls_port or DEFAULT_HBONE_PORT
    _check_port(port, f"{where}.hbone_mtls_port")
    if kind == "address":
        ip = ip_from_bytes(gw.address.address, f"{where}.address")
        return GatewayAddress(NetworkAddress(gw.address.network, ip), port)
    if kind == "hostname":
        if not gw.hostname.hostname:
            raise ModelError(f"{where}.hostname: the hostname is empty")
        return GatewayAddress(NamespacedHostname(gw.hostname.namespace, gw.hostname.hostname), port)
    raise ModelError(f"{where}: neither address nor hostname is set")


def _port_map(ports: Iterable[Any], where: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, p in enumerate(ports):
        sp = _check_port(p.service_port, f"{where}[{i}].service_port")
        out[sp] = _check_port(p.target_port, f"{where}[{i}].target_port", allow_zero=True)
    return out


def workload_from_proto(w: Any) -> Workload:
    """``istio.workload.Workload`` -> ``Workload``; raises ``ModelError``."""
    if not w.uid:
        name = f"{w.namespace}/{w.name}" if w.name else "(unnamed)"
        raise ModelError(f"workload {name}: uid is empty")
    where = f"workload {w.uid}"
    addrs = tuple(ip_from_bytes(a, f"{where}: addresses[{i}]") for i, a in enumerate(w.addresses))
    tp = _enum_name(w, "tunnel_protocol", where)
    if tp not in TunnelProtocol.__members__:
        raise ModelError(f"{where}: tunnel_protocol {tp} is not supported (use HBONE or NONE)")
    services = {
        _ns_host(k, f"{where}: services"): _port_map(v.ports, f"{where}: services[{k!r}].ports")
        for k, v in w.services.items()
    }
    app_tunnel = None
    if w.HasField("application_tunnel"):
        at = w.application_tunnel
        at_port = _check_port(at.port, f"{where}: application_tunnel.port", allow_zero=True)
        app_tunnel = ApplicationTunnel(
            _enum_name(at, "protocol", f"{where}: application_tunnel"), at_port or None
        )
    for i, k in enumerate(w.authorization_policies):
        if "/" not in k:
            raise ModelError(f"{where}: authorization_policies[{i}] {k!r} is not 'ns/name'")
    wl = Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=addrs,
        hostname=w.hostname,
        network=w.network,
        tunnel_protocol=TunnelProtocol(tp),
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
        waypoint=_gateway_from_proto(w.waypoint, f"{where}: waypoint")
        if w.HasField("waypoint")
        else None,
        network_gateway=_gateway_from_proto(w.network_gateway, f"{where}: network_gateway")
        if w.HasField("network_gateway")
        else None,
        node=w.node,
        native_tunnel=w.native_tunnel,
        application_tunnel=app_tunnel,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_name=w.workload_name,
        workload_type=_enum_name(w, "workload_type", where),
        services=services,
        authorization_policies=tuple(w.authorization_policies),
        status=HealthStatus(_enum_name(w, "status", where)),
        cluster_id=w.cluster_id or DEFAULT_CLUSTER_ID,
        locality=Locality(w.locality.region, w.locality.zone, w.locality.subzone)
        if w.HasField("locality")
        else Locality(),
        network_mode=_enum_name(w, "network_mode", where),
        capacity=w.capacity.value if w.HasField("capacity") else DEFAULT_CAPACITY,
    )
    try:
        wl.identity()
    except IdentityError as e:
        raise ModelError(f"{where}: namespace/service_account/trust_domain: {e}") from None
    return wl


def service_from_proto(s: Any) -> Service:
    """``istio.workload.Service`` -> ``Service``; raises ``ModelError``."""
    if not s.hostname:
        raise ModelError(f"service {s.namespace}/{s.name}: hostname is empty")
    if not s.namespace:
        raise ModelError(f"service {s.name or s.hostname}: namespace is empty")
    where = f"service {s.namespace}/{s.hostname}"
    vips = tuple(
        NetworkAddress(a.network, ip_from_bytes(a.address, f"{where}: addresses[{i}]"))
        for i, a in enumerate(s.addresses)
    )
    lb = None
    if s.HasField("load_balancing"):
        m = s.load_balancing
        pref_field = m.DESCRIPTOR.fields_by_name["routing_preference"].enum_type
        prefs = []
        for v in m.routing_preference:
            ev = pref_field.values_by_number.get(v)
            if ev is None:
                raise ModelError(f"{where}: load_balancing.routing_preference has unknown {v}")
            prefs.append(ev.name)
        lb = LoadBalancing(
            tuple(prefs),
            _enum_name(m, "mode", f"{where}: load_balancing"),
            _enum_name(m, "health_policy", f"{where}: load_balancing"),
        )
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=vips,
        ports=_port_map(s.ports, f"{where}: ports"),
        subject_alt_names=tuple(s.subject_alt_names),
        waypoint=_gateway_from_proto(s.waypoint, f"{where}: waypoint")
        if s.HasField("waypoint")
        else None,
        load_balancing=lb,
        ip_families=_enum_name(s, "ip_families", where),
        canonical=s.canonical,
    )


def _string_matches(items: Iterable[Any]) -> tuple[StringMatch, ...]:
    out = []
    for sm in items:
        kind = sm.WhichOneof("match_type")
        # Like ztunnel: a StringMatch with no (or an unknown) match type is dropped.
        if kind == "presence":
            out.append(StringMatch("presence"))
        elif kind is not None:
            out.append(StringMatch(kind, getattr(sm, kind)))
    return tuple(out)


def _cidrs(items: Iterable[Any], where: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, a in enumerate(items):
        ip = ip_from_bytes(a.address, f"{where}[{i}]")
        if a.length > ip.max_prefixlen:
            raise ModelError(f"{where}[{i}]: prefix length {a.length} > {ip.max_prefixlen}")
        out.append(ipaddress.ip_network(f"{ip}/{a.length}", strict=False))
    return tuple(out)


def _match_from_proto(m: Any, where: str) -> Match:
    kw: dict[str, Any] = {}
    for f in _MATCH_FIELDS:
        vals = getattr(m, f)
        if f.endswith("ips"):
            kw[f] = _cidrs(vals, f"{where}.{f}")
        elif f.endswith("ports"):
            kw[f] = tuple(_check_port(p, f"{where}.{f}") for p in vals)
        elif f.endswith("service_accounts"):
            kw[f] = tuple(ServiceAccountMatch(s.namespace, s.serviceAccount) for s in vals)
        else:
            kw[f] = _string_matches(vals)
    return Match(**kw)


def policy_from_proto(a: Any) -> Policy:
    """``istio.security.Authorization`` -> ``Policy``; raises ``ModelError``."""
    if not a.name or not a.namespace:
        raise ModelError(f"policy {a.namespace}/{a.name}: name and namespace must be set")
    where = f"policy {a.namespace}/{a.name}"
    groups = tuple(
        tuple(
            tuple(
                _match_from_proto(m, f"{where}: groups[{g}].rules[{r}].matches[{k}]")
                for k, m in enumerate(rule.matches)
            )
            for r, rule in enumerate(grp.rules)
        )
        for g, grp in enumerate(a.groups)
    )
    return Policy(
        name=a.name,
        namespace=a.namespace,
        scope=Scope(_enum_name(a, "scope", where)),
        action=Action(_enum_name(a, "action", where)),
        groups=groups,
        dry_run=a.dry_run,
    )


def address_from_proto(addr: Any) -> Workload | Service:
    kind = addr.WhichOneof("type")
    if kind == "workload":
        return workload_from_proto(addr.workload)
    if kind == "service":
        return service_from_proto(addr.service)
    raise ModelError("address: neither workload nor service is set")


def from_proto(msg: Any) -> Workload | Service | Policy:
    """Any WDS resource (Address, Workload, Service, Authorization) -> its model object."""
    name = msg.DESCRIPTOR.full_name
    if name == "istio.workload.Address":
        return address_from_proto(msg)
    if name == "istio.workload.Workload":
        return workload_from_proto(msg)
    if name == "istio.workload.Service":
        return service_from_proto(msg)
    if name == "istio.security.Authorization":
        return policy_from_proto(msg)
    raise ModelError(f"unsupported resource type {name}")


# ---------------------------------------------------------------------------------------------
# to proto


def _gateway_to_proto(g: GatewayAddress, out: Any) -> None:
    d = g.destination
    if isinstance(d, NetworkAddress):
        out.address.network = d.network
        out.address.address = d.ip.packed
    else:
        out.hostname.namespace = d.namespace
        out.hostname.hostname = d.hostname
    out.hbone_mtls_port = g.hbone_mtls_port


def _fill_ports(ports: Mapping[int, int], out: Any) -> None:
    for sp, tp in sorted(ports.items()):
        p = out.add()
        p.service_port = sp
        p.target_port = tp


def _workload_to_proto(w: Workload) -> Any:
    wpb, _ = _pb()
    m = wpb.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ip.packed for ip in w.addresses],
        hostname=w.hostname,
        network=w.network,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        native_tunnel=w.native_tunnel,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_name=w.workload_name,
        authorization_policies=list(w.authorization_policies),
        cluster_id=w.cluster_id,
    )
    m.tunnel_protocol = _enum_number(wpb.Workload, "tunnel_protocol", w.tunnel_protocol.value)
    m.workload_type = _enum_number(wpb.Workload, "workload_type", w.workload_type)
    m.status = _enum_number(wpb.Workload, "status", w.status.value)
    m.network_mode = _enum_number(wpb.Workload, "network_mode", w.network_mode)
    if w.waypoint is not None:
        _gateway_to_proto(w.waypoint, m.waypoint)
    if w.network_gateway is not None:
        _gateway_to_proto(w.network_gateway, m.network_gateway)
    if w.application_tunnel is not None:
        at = w.application_tunnel
        m.application_tunnel.protocol = _enum_number(
            type(m.application_tunnel), "protocol", at.protocol
        )
        m.application_tunnel.port = at.port or 0
    for key, ports in w.services.items():
        _fill_ports(ports, m.services[key].ports)
    if w.locality != Locality():
        m.locality.region = w.locality.region
        m.locality.zone = w.locality.zone
        m.locality.subzone = w.locality.subzone
    m.capacity.value = w.capacity
    return m


def _service_to_proto(s: Service) -> Any:
    wpb, _ = _pb()
    m = wpb.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        subject_alt_names=list(s.subject_alt_names),
        canonical=s.canonical,
    )
    for v in s.vips:
        m.addresses.add(network=v.network, address=v.ip.packed)
    _fill_ports(s.ports, m.ports)
    if s.waypoint is not None:
        _gateway_to_proto(s.waypoint, m.waypoint)
    if s.load_balancing is not None:
        lb = s.load_balancing
        lbt = type(m.load_balancing)
        m.load_balancing.routing_preference.extend(
            _enum_number(lbt, "routing_preference", p) for p in lb.routing_preference
        )
        m.load_balancing.mode = _enum_number(lbt, "mode", lb.mode)
        m.load_balancing.health_policy = _enum_number(lbt, "health_policy", lb.health_policy)
    m.ip_families = _enum_number(wpb.Service, "ip_families", s.ip_families)
    return m


def _string_match_to_proto(sm: StringMatch, out: Any) -> None:
    if sm.kind == "presence":
        out.presence.SetInParent()
    else:
        setattr(out, sm.kind, sm.value)


def _match_to_proto(mt: Match, out: Any) -> None:
    for f in _MATCH_FIELDS:
        vals = getattr(mt, f)
        target = getattr(out, f)
        for v in vals:
            if f.endswith("ips"):
                target.add(address=v.network_address.packed, length=v.prefixlen)
            elif f.endswith("ports"):
                target.append(v)
            elif f.endswith("service_accounts"):
                # upstream spells this proto field camelCase: serviceAccount
                target.add(namespace=v.namespace, serviceAccount=v.service_account)
            else:
                _string_match_to_proto(v, target.add())


def _policy_to_proto(p: Policy) -> Any:
    _, apb = _pb()
    m = apb.Authorization(name=p.name, namespace=p.namespace, dry_run=p.dry_run)
    m.scope = _enum_number(apb.Authorization, "scope", p.scope.value)
    m.action = _enum_number(apb.Authorization, "action", p.action.value)
    for grp in p.groups:
        g = m.groups.add()
        for rule in grp:
            r = g.rules.add()
            for mt in rule:
                _match_to_proto(mt, r.matches.add())
    return m


def to_proto(obj: Workload | Service | Policy) -> Any:
    """Model object -> the xDS resource: ``Address`` for workloads/services, else
    ``Authorization``."""
    if isinstance(obj, Policy):
        return _policy_to_proto(obj)
    wpb, _ = _pb()
    if isinstance(obj, Workload):
        return wpb.Address(workload=_workload_to_proto(obj))
    if isinstance(obj, Service):
        return wpb.Address(service=_service_to_proto(obj))
    raise TypeError(f"to_proto: unsupported {type(obj).__name__}")
