"""Kubernetes object dicts -> validated, typed records (the first half of translation).

Each ``parse_*`` function looks at one object only and either returns a record holding just
what translation needs, or raises ``FieldError`` (or ``ValueError``/``TypeError``/
``KeyError``) naming the field.  Everything that can be wrong with an object is found here,
so the second half (``k8s_build``) can combine records without failing, and a broken object
can be refused on its own while its last good record stays in force.

Invariants: pure; records are immutable after parsing; an object's key is
``Kind/namespace/name`` (namespace empty for Namespace), the same key the control plane's
sources use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.config import k8s_policy as kp
from ambient.config._common import (
    FieldError,
    as_ip,
    as_list,
    as_map,
    as_port,
    as_str,
    short,
)
from ambient.identity import IdentityError, SpiffeId

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NS = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
GATEWAY_MANAGED = "gateway.istio.io/managed"
MANAGED_WAYPOINT = "istio.io-mesh-controller"
SERVICE_NAME = "kubernetes.io/service-name"
WAYPOINT_CLASS = "istio-waypoint"
HBONE_PORT = 15008

# Kinds the translation reads; the others are accepted and stored but publish nothing.
KINDS = frozenset({
    "Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount",
    "AuthorizationPolicy", "PeerAuthentication", "Gateway", "HTTPRoute",
})  # fmt: skip
# Kinds only waypoints read (L7 routing and traffic policy): accepted without a warning.
L7_ONLY_KINDS = frozenset({"GRPCRoute", "ReferenceGrant", "HTTPTrafficPolicy"})
CLUSTER_SCOPED = frozenset({"Namespace"})


@dataclass(frozen=True)
class Settings:
    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"


@dataclass(frozen=True)
class NsInfo:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    labels: dict[str, str]
    ips: tuple[bytes, ...]
    service_account: str
    node: str
    host_network: bool
    healthy: bool
    terminal: bool
    named_ports: dict[str, int]
    workload_name: str
    workload_type: str


@dataclass(frozen=True)
class SvcPort:
    port: int
    target: int | str  # number, or a container port name resolved per endpoint
    name: str


@dataclass(frozen=True)
class SvcInfo:
    namespace: str
    name: str
    hostname: str
    labels: dict[str, str]
    selector: dict[str, str] | None  # None: a service without selector (EndpointSlices)
    ports: tuple[SvcPort, ...]
    proto: Any  # istio.workload.Service without its waypoint

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    ready: bool
    pod: str | None  # targetRef name when it is a Pod


@dataclass(frozen=True)
class SliceInfo:
    namespace: str
    name: str
    service: str | None  # kubernetes.io/service-name label
    fqdn: bool
    ports: dict[str, int]  # slice port name (= service port name) -> target port
    endpoints: tuple[Endpoint, ...]

    def pod_refs(self) -> set[str]:
        return {e.pod for e in self.endpoints if e.pod}


@dataclass(frozen=True)
class GatewayInfo:
    """A Gateway of class istio-waypoint."""

    namespace: str
    name: str
    address: Any | None  # istio.workload.GatewayAddress from status.addresses, if any
    traffic: str  # service | workload | all | none
    allowed_from: str  # Same | All | Selector
    allowed_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyInfo:
    out: kp.PolicyOut | None  # None: not for ztunnel
    warnings: tuple[str, ...]


Parsed = NsInfo | PodInfo | SvcInfo | SliceInfo | GatewayInfo | PolicyInfo | kp.PeerAuthn | None


def key_of(obj: dict[Any, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta['namespace']}/{meta['name']}"


def describe(obj: Any, i: int = 0) -> str:
    """``Kind ns/name`` of an object (as well as can be told), for messages."""
    if isinstance(obj, dict):
        meta: dict[Any, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
        ns, name = meta.get("namespace", "default"), meta.get("name", f"#{i}")
        if isinstance(obj.get("kind"), str) and obj["kind"] in CLUSTER_SCOPED:
            return f"{obj['kind']} {name}"
        return f"{obj.get('kind', '(no kind)')} {ns}/{name}"
    return f"object #{i}"


def normalise(obj: Any) -> dict[Any, Any]:
    """Check the envelope and fill metadata.namespace; raises FieldError."""
    if not isinstance(obj, dict):
        raise FieldError(f"{short(obj)} is not a mapping")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FieldError("kind is missing")
    meta = as_map(obj.get("metadata"), "metadata")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise FieldError("metadata.name is missing")
    if "/" in meta["name"]:
        raise FieldError(f"metadata.name {short(meta['name'])} contains '/'")
    ns = meta.get("namespace")
    if isinstance(ns, str) and "/" in ns:
        raise FieldError(f"metadata.namespace {short(ns)} contains '/'")
    if kind in CLUSTER_SCOPED:
        ns = ""
    elif ns is None:
        ns = "default"
    elif not isinstance(ns, str) or not ns:
        raise FieldError(f"metadata.namespace {short(ns)} is not a string")
    return {**obj, "metadata": {**meta, "namespace": ns}}


def labels_of(meta: dict[Any, Any], where: str = "metadata.labels") -> dict[str, str]:
    return {str(k): str(v) for k, v in as_map(meta.get("labels"), where).items()}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------
# per kind


def parse_namespace(obj: dict[Any, Any], _s: Settings) -> NsInfo:
    return NsInfo(obj["metadata"]["name"], labels_of(obj["metadata"]))


def _owner(meta: dict[Any, Any], labels: dict[str, str], pod_name: str) -> tuple[str, str]:
    """(workload_name, workload_type) from ownerReferences."""
    for ref in as_list(meta.get("ownerReferences"), "metadata.ownerReferences"):
        ref = as_map(ref, "metadata.ownerReferences[]")
        kind, name = ref.get("kind"), str(ref.get("name", ""))
        if kind == "ReplicaSet" and "-" in name:
            return name.rsplit("-", 1)[0], "DEPLOYMENT"
        if kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            return name, "DEPLOYMENT"
        if kind == "Job":
            return name, "JOB"
        if kind == "CronJob":
            return name, "CRONJOB"
    return labels.get("app", pod_name), "POD"


def _container_ports(spec: dict[Any, Any]) -> dict[str, int]:
    named = {}
    for i, c in enumerate(as_list(spec.get("containers"), "spec.containers")):
        c = as_map(c, f"spec.containers[{i}]")
        for j, p in enumerate(as_list(c.get("ports"), f"spec.containers[{i}].ports")):
            p = as_map(p, f"spec.containers[{i}].ports[{j}]")
            port = as_port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}].containerPort")
            if p.get("name"):
                named[str(p["name"])] = port
    return named


def parse_pod(obj: dict[Any, Any], s: Settings) -> PodInfo:
    meta, spec = obj["metadata"], as_map(obj.get("spec"), "spec")
    status = as_map(obj.get("status"), "status")
    name, ns = meta["name"], meta["namespace"]
    labels = labels_of(meta)
    sa = as_str(spec.get("serviceAccountName") or "default", "spec.serviceAccountName")
    try:
        SpiffeId(s.trust_domain, ns, sa)
    except IdentityError as e:
        raise FieldError(f"spec.serviceAccountName {short(sa)}: {e}") from None
    raw = [as_map(p, "status.podIPs[]").get("ip") for p in as_list(status.get("podIPs"), "podIPs")]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    ips = tuple(as_ip(ip, f"status.podIPs[{i}]").packed for i, ip in enumerate(raw))
    # Like Kubernetes' IsPodReady: healthy only with condition Ready=True, and not deleting.
    ready = False
    for c in as_list(status.get("conditions"), "status.conditions"):
        c = as_map(c, "status.conditions[]")
        if c.get("type") == "Ready":
            ready = str(c.get("status")) == "True"
    wname, wtype = _owner(meta, labels, name)
    return PodInfo(
        namespace=ns,
        name=name,
        labels=labels,
        ips=ips,
        service_account=sa,
        node=as_str(spec.get("nodeName") or "", "spec.nodeName"),
        host_network=spec.get("hostNetwork") is True,
        healthy=ready and not meta.get("deletionTimestamp"),
        terminal=status.get("phase") in ("Succeeded", "Failed"),
        named_ports=_container_ports(spec),
        workload_name=wname,
        workload_type=wtype,
    )


_IP_FAMILIES: dict[tuple[str, ...], str] = {("IPv4",): "IPV4_ONLY", ("IPv6",): "IPV6_ONLY"}


def parse_service(obj: dict[Any, Any], s: Settings) -> SvcInfo | None:
    meta, spec = obj["metadata"], as_map(obj.get("spec"), "spec")
    name, ns = meta["name"], meta["namespace"]
    if spec.get("type") == "ExternalName":
        return None
    hostname = f"{name}.{ns}.svc.{s.cluster_domain}"
    svc = wpb.Service(name=name, namespace=ns, hostname=hostname, canonical=True)
    ips = [as_str(ip, "spec.clusterIPs[]") for ip in as_list(spec.get("clusterIPs"), "clusterIPs")]
    if not ips and spec.get("clusterIP") is not None:
        ips = [as_str(spec["clusterIP"], "spec.clusterIP")]
    for i, ip in enumerate(ips):
        if ip in ("None", ""):
            continue  # headless: no VIP
        svc.addresses.add(network="", address=as_ip(ip, f"spec.clusterIPs[{i}]").packed)
    ports = []
    for i, p in enumerate(as_list(spec.get("ports"), "spec.ports")):
        p = as_map(p, f"spec.ports[{i}]")
        port = as_port(p.get("port"), f"spec.ports[{i}].port")
        target = p.get("targetPort", port)
        tref: int | str
        if isinstance(target, str) and not target.isdigit():
            tnum, tref = 0, target
        else:
            tnum = tref = as_port(target, f"spec.ports[{i}].targetPort")
        svc.ports.add(service_port=port, target_port=tnum)
        ports.append(SvcPort(port, tref, str(p.get("name") or "")))
    fams = tuple(str(f) for f in as_list(spec.get("ipFamilies"), "spec.ipFamilies"))
    svc.ip_families = wpb.IPFamilies.Value(
        "DUAL" if len(fams) == 2 else _IP_FAMILIES.get(fams, "AUTOMATIC")
    )
    if spec.get("internalTrafficPolicy") == "Local":
        svc.load_balancing.routing_preference.append(wpb.LoadBalancing.NODE)
        svc.load_balancing.mode = wpb.LoadBalancing.STRICT
    if spec.get("publishNotReadyAddresses") is True:
        svc.load_balancing.health_policy = wpb.LoadBalancing.ALLOW_ALL
    sel = spec.get("selector")
    selector = None
    if sel is not None:
        selector = {str(k): str(v) for k, v in as_map(sel, "spec.selector").items()}
    return SvcInfo(ns, name, hostname, labels_of(meta), selector, tuple(ports), svc)


def parse_endpoint_slice(obj: dict[Any, Any], _s: Settings) -> SliceInfo:
    meta = obj["metadata"]
    labels = labels_of(meta)
    ports = {}
    for i, p in enumerate(as_list(obj.get("ports"), "ports")):
        p = as_map(p, f"ports[{i}]")
        if p.get("port") is None or p.get("protocol", "TCP") != "TCP":
            continue  # like istiod: TCP ports with a number only
        ports[str(p.get("name") or "")] = as_port(p["port"], f"ports[{i}].port")
    eps = []
    for i, e in enumerate(as_list(obj.get("endpoints"), "endpoints")):
        e = as_map(e, f"endpoints[{i}]")
        addrs = as_list(e.get("addresses"), f"endpoints[{i}].addresses")
        if not addrs:
            continue
        cond = as_map(e.get("conditions"), f"endpoints[{i}].conditions")
        ready = cond.get("ready") is not False  # unset means ready
        ref = as_map(e.get("targetRef"), f"endpoints[{i}].targetRef")
        pod = str(ref["name"]) if ref.get("kind") == "Pod" and ref.get("name") else None
        addr = as_str(addrs[0], f"endpoints[{i}].addresses[0]")
        fqdn = obj.get("addressType") == "FQDN"
        if not fqdn:
            as_ip(addr, f"endpoints[{i}].addresses[0]")
        eps.append(Endpoint(addr, ready, pod))
    return SliceInfo(
        meta["namespace"], meta["name"], labels.get(SERVICE_NAME),
        obj.get("addressType") == "FQDN", ports, tuple(eps),
    )  # fmt: skip


def _gateway_address(status: dict[Any, Any], ns: str) -> Any | None:
    """Like istiod: a Hostname status address first (a service hostname), else an IP."""
    addrs = [as_map(a, "status.addresses[]") for a in as_list(status.get("addresses"), "addrs")]
    for a in addrs:
        if a.get("type") == "Hostname" and a.get("value"):
            return wpb.GatewayAddress(
                hostname=wpb.NamespacedHostname(namespace=ns, hostname=str(a["value"])),
                hbone_mtls_port=HBONE_PORT,
            )
    for i, a in enumerate(addrs):
        if a.get("type", "IPAddress") == "IPAddress" and a.get("value"):
            ip = as_ip(a["value"], f"status.addresses[{i}].value")
            return wpb.GatewayAddress(
                address=wpb.NetworkAddress(network="", address=ip.packed),
                hbone_mtls_port=HBONE_PORT,
            )
    return None


def parse_gateway(obj: dict[Any, Any], _s: Settings) -> GatewayInfo | None:
    meta, spec = obj["metadata"], as_map(obj.get("spec"), "spec")
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        return None  # an ingress or other gateway: not ours
    labels = labels_of(meta)
    traffic = labels.get(WAYPOINT_FOR, "service")
    if traffic not in ("service", "workload", "all", "none"):
        raise FieldError(
            f"label {WAYPOINT_FOR}={short(traffic)} is not one of service|workload|all|none"
        )
    allowed_from, allowed_sel = "Same", {}
    for i, lst in enumerate(as_list(spec.get("listeners"), "spec.listeners")):
        lst = as_map(lst, f"spec.listeners[{i}]")
        if lst.get("protocol") == "HBONE" and lst.get("port") == HBONE_PORT:
            routes = as_map(lst.get("allowedRoutes"), f"spec.listeners[{i}].allowedRoutes")
            nss = as_map(routes.get("namespaces"), f"spec.listeners[{i}].allowedRoutes.namespaces")
            allowed_from = str(nss.get("from") or "Same")
            if allowed_from not in ("Same", "All", "Selector"):
                raise FieldError(
                    f"spec.listeners[{i}].allowedRoutes.namespaces.from "
                    f"{short(allowed_from)} is not Same|All|Selector"
                )
            allowed_sel = kp.match_labels(nss, f"spec.listeners[{i}].allowedRoutes") or {}
            break
    address = _gateway_address(as_map(obj.get("status"), "status"), meta["namespace"])
    return GatewayInfo(meta["namespace"], meta["name"], address, traffic, allowed_from, allowed_sel)


def parse_authorization_policy(obj: dict[Any, Any], s: Settings) -> PolicyInfo:
    out, warnings = kp.authorization_policy(obj, s.root_namespace)
    return PolicyInfo(out, tuple(warnings))


def parse_peer_authentication(obj: dict[Any, Any], _s: Settings) -> kp.PeerAuthn:
    return kp.parse_peer_authentication(obj, 0)


def parse_ignored(_obj: dict[Any, Any], _s: Settings) -> None:
    return None  # ServiceAccount, HTTPRoute: stored for later users; nothing for ztunnel


PARSERS: dict[str, Any] = {
    "Namespace": parse_namespace,
    "Pod": parse_pod,
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Gateway": parse_gateway,
    "AuthorizationPolicy": parse_authorization_policy,
    "PeerAuthentication": parse_peer_authentication,
    "ServiceAccount": parse_ignored,
    "HTTPRoute": parse_ignored,
}


def parse(obj: dict[Any, Any], s: Settings) -> Parsed:
    """A normalised object of one of ``KINDS`` -> its record; raises on a bad field."""
    return PARSERS[obj["kind"]](obj, s)  # type: ignore[no-any-return]
