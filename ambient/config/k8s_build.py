"""Records in a ``World`` -> the WDS resources istiod would push (the second half of translation).

``build(world, producer)`` returns the resources one producer yields, by resource name
(Workload: its uid; Service: ``ns/hostname``; Authorization: ``ns/name``), plus warnings
about how it was combined with other objects (for example a waypoint that is not ready).

Istio's rules followed here (istiod ``pilot/pkg/serviceregistry/kube/controller/ambient``):
- Pods: terminal pods are not published; HEALTHY only with condition Ready=True; HBONE when
  enrolled (``istio.io/dataplane-mode=ambient`` on the pod or its namespace, ``none`` on
  the pod opts out; never for host-network pods); ``services`` from selector services in
  the pod's namespace plus selector-less services whose EndpointSlices name the pod; named
  target ports resolved from the pod's container ports (a port the pod lacks is left out).
- EndpointSlice endpoints without a Pod targetRef become workloads of their own
  (``<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>``, host-network mode).
- Waypoints: ``istio.io/use-waypoint`` on the object wins over the namespace's; ``none``
  opts out; the waypoint must be ready and allow the namespace (HBONE listener's
  allowedRoutes, default Same) and serve the traffic type (``istio.io/waypoint-for``:
  service by default).  A waypoint's own pods and services get no waypoint.

Invariants: pure reads of the world (apart from recording waypoint lookups); deterministic.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ambient.api.istio.workload import workload_pb2 as wpb
from ambient.config import k8s_policy as kp
from ambient.config.k8s_parse import (
    DATAPLANE_MODE,
    GATEWAY_MANAGED,
    GATEWAY_NAME,
    MANAGED_WAYPOINT,
    USE_WAYPOINT,
    USE_WAYPOINT_NS,
    PodInfo,
    SliceInfo,
    SvcInfo,
    selects,
)
from ambient.config.k8s_world import PA_PRODUCER, Ref, World

Built = tuple[dict[str, Any], list[str]]  # (resources by name, warnings)


def _use_waypoint(labels: dict[str, str], default_ns: str) -> tuple[Ref | None, bool]:
    """(requested waypoint, opted out with ``none``) from an object's labels."""
    name = labels.get(USE_WAYPOINT)
    if name is None:
        return None, False
    if name == "none":
        return None, True
    return (labels.get(USE_WAYPOINT_NS, default_ns), name), False


def _allows(world: World, gw: Any, ns: str) -> bool:
    if gw.allowed_from == "All":
        return True
    if gw.allowed_from == "Selector":
        labels = world.namespaces[ns].labels if ns in world.namespaces else {}
        return selects(gw.allowed_selector, labels)
    return bool(gw.namespace == ns)


def waypoint_for(
    world: World, what: str, ns: str, labels: dict[str, str], refs: set[Ref]
) -> tuple[Any | None, str | None]:
    """(GatewayAddress or None, warning) for a service or workload; adds lookups to refs."""
    ref, none = _use_waypoint(labels, ns)
    own = ref is not None
    if none:
        return None, None
    if ref is None and ns in world.namespaces:
        ref, _ = _use_waypoint(world.namespaces[ns].labels, ns)
    if ref is None:
        return None, None
    refs.add(ref)
    found = world.waypoint(ref)
    where = "its" if own else "its namespace's"
    if found is None:
        return None, (
            f"{where} {USE_WAYPOINT} names {ref[0]}/{ref[1]}, which is not a ready waypoint "
            f"(no Gateway of class istio-waypoint with an address or a Service); no waypoint set"
        )
    gw, addr = found
    if not _allows(world, gw, ns):
        return None, (
            f"waypoint {ref[0]}/{ref[1]} does not allow namespace {ns} "
            "(its HBONE listener's allowedRoutes); no waypoint set"
        )
    if gw.traffic not in (what, "all"):
        if what == "workload" and not own:
            return None, None  # a namespace waypoint for services only: not an error
        return None, (
            f"waypoint {ref[0]}/{ref[1]} is for {gw.traffic} traffic, not {what} "
            f"(label istio.io/waypoint-for); no waypoint set"
        )
    return addr, None


def _canonical(labels: dict[str, str], workload_name: str) -> tuple[str, str]:
    name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload_name
    )
    rev = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return name, rev


def _pod_services(world: World, p: PodInfo) -> list[SvcInfo]:
    out = [
        s for s in world.services_in(p.namespace) if s.selector and selects(s.selector, p.labels)
    ]
    seen = {s.name for s in out}
    for sk in sorted(world.slices_by_pod.get((p.namespace, p.name), ())):
        svc_name = world.slices[sk].service
        if svc_name is None or svc_name in seen:
            continue
        svc = world.services.get((p.namespace, svc_name))
        if svc is not None:
            seen.add(svc_name)
            out.append(svc)
    return out


def build_pod(world: World, key: str) -> Built:
    p = world.pods[key]
    s = world.s
    refs: set[Ref] = set()
    warnings: list[str] = []
    if p.terminal:
        world.note_waypoints(key, refs)
        return {}, []
    w = wpb.Workload(
        uid=f"{s.cluster_id}//Pod/{p.namespace}/{p.name}",
        name=p.name,
        namespace=p.namespace,
        addresses=list(p.ips),
        trust_domain=s.trust_domain,
        cluster_id=s.cluster_id,
        service_account=p.service_account,
        node=p.node,
        workload_name=p.workload_name,
    )
    w.workload_type = wpb.WorkloadType.Value(p.workload_type)
    w.canonical_name, w.canonical_revision = _canonical(p.labels, p.workload_name)
    if p.host_network:
        w.network_mode = wpb.HOST_NETWORK
    pod_mode = p.labels.get(DATAPLANE_MODE)
    ns_labels = world.namespaces[p.namespace].labels if p.namespace in world.namespaces else {}
    enrolled = (
        pod_mode != "none"
        and "ambient" in (pod_mode, ns_labels.get(DATAPLANE_MODE))
        and not p.host_network
    )
    w.tunnel_protocol = wpb.HBONE if enrolled else wpb.NONE
    w.status = wpb.HEALTHY if p.healthy else wpb.UNHEALTHY
    for svc in _pod_services(world, p):
        plist = w.services[svc.key]
        for sp in svc.ports:
            tnum = p.named_ports.get(sp.target) if isinstance(sp.target, str) else sp.target
            if tnum:
                plist.ports.add(service_port=sp.port, target_port=tnum)
    instance = p.labels.get(GATEWAY_NAME)
    is_waypoint = False
    if instance:
        refs.add((p.namespace, instance))
        is_waypoint = world.waypoint((p.namespace, instance)) is not None
    if not is_waypoint:
        addr, warn = waypoint_for(world, "workload", p.namespace, p.labels, refs)
        if addr is not None:
            w.waypoint.CopyFrom(addr)
        if warn:
            warnings.append(f"Pod {p.namespace}/{p.name}: {warn}")
    world.note_waypoints(key, refs)
    policy_keys = set()
    for ns in {p.namespace, s.root_namespace}:
        for pk in world.selector_policies_by_ns.get(ns, ()):
            out = world.policies[pk].out
            if out is not None and out.selector and selects(out.selector, p.labels):
                policy_keys.add(out.key)
    mesh, ns_pa, wl_pa = kp.pick_peer_authentications(
        world.pas_for(p.namespace), s.root_namespace, p.namespace, p.labels
    )
    policy_keys.update(kp.effective_pa_keys(s.root_namespace, mesh, ns_pa, wl_pa))
    w.authorization_policies.extend(sorted(policy_keys))
    return {w.uid: wpb.Address(workload=w)}, warnings


def build_service(world: World, key: str) -> Built:
    _, ns, name = key.split("/", 2)
    svc = world.services.get((ns, name))
    refs: set[Ref] = set()
    if svc is None:
        world.note_waypoints(key, refs)
        return {}, []
    proto = wpb.Service()
    proto.CopyFrom(svc.proto)
    warnings = []
    if svc.labels.get(GATEWAY_MANAGED) != MANAGED_WAYPOINT:  # a waypoint has no waypoint
        addr, warn = waypoint_for(world, "service", ns, svc.labels, refs)
        if addr is not None:
            proto.waypoint.CopyFrom(addr)
        if warn:
            warnings.append(f"Service {ns}/{name}: {warn}")
    world.note_waypoints(key, refs)
    return {svc.key: wpb.Address(service=proto)}, warnings


def build_slice(world: World, key: str) -> Built:
    sl: SliceInfo | None = world.slices.get(key)
    if sl is None or sl.service is None or sl.fqdn:
        return {}, []
    svc = world.services.get((sl.namespace, sl.service))
    if svc is None:
        return {}, []
    s = world.s
    plist = wpb.PortList()
    for sp in svc.ports:
        if sp.name in sl.ports:
            plist.ports.add(service_port=sp.port, target_port=sl.ports[sp.name])
    out: dict[str, Any] = {}
    for ep in sl.endpoints:
        if ep.pod is not None:
            continue  # the Pod's own workload carries it, with far more information
        uid = f"{s.cluster_id}/discovery.k8s.io/EndpointSlice/{sl.namespace}/{sl.name}/{ep.ip}"
        if uid in out:
            continue
        w = wpb.Workload(
            uid=uid, name=sl.name, namespace=sl.namespace, trust_domain=s.trust_domain,
            cluster_id=s.cluster_id, network_mode=wpb.HOST_NETWORK,
            status=wpb.HEALTHY if ep.ready else wpb.UNHEALTHY,
        )  # fmt: skip
        w.addresses.append(ipaddress.ip_address(ep.ip).packed)
        w.services[svc.key].CopyFrom(plist)
        out[uid] = wpb.Address(workload=w)
    return out, []


def build_policy(world: World, key: str) -> Built:
    rec = world.policies.get(key)
    if rec is None or rec.out is None:
        return {}, []
    return {rec.out.key: rec.out.proto}, []


def build_peer_authentications(world: World) -> Built:
    pas = [world.pas[k] for k in sorted(world.pas)]
    if not pas:
        return {}, []
    root = world.s.root_namespace
    static = kp.static_strict_policy(root)
    out = {static.key: static.proto}
    for pa in pas:
        mesh, ns_pa, _ = kp.pick_peer_authentications(pas, root, pa.namespace, {})
        conv = kp.convert_peer_authentication(root, pa, ns_pa, mesh)
        if conv is not None:
            out[conv.key] = conv.proto
    return out, []


def build(world: World, producer: str) -> Built:
    """The resources and warnings of one producer (empty if it no longer exists)."""
    if producer == PA_PRODUCER:
        return build_peer_authentications(world)
    kind = producer.split("/", 1)[0]
    if kind == "Pod":
        if producer not in world.pods:
            world.note_waypoints(producer, ())
            return {}, []
        return build_pod(world, producer)
    if kind == "Service":
        return build_service(world, producer)
    if kind == "EndpointSlice":
        return build_slice(world, producer)
    if kind == "AuthorizationPolicy":
        return build_policy(world, producer)
    return {}, []
