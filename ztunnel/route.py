"""Outbound routing, and the inbound "came through its waypoint" rule.  Pure functions over a
state snapshot.

Given the mesh state, the source workload and the original destination of a captured
connection, :func:`route_outbound` decides one of:

* :class:`Hbone`: tunnel to ``<endpoint ip>:15008`` with ``:authority`` ``<endpoint ip>:<port>``,
  expecting one of a set of SPIFFE identities on the far side; or, when the destination has a
  waypoint, tunnel to the waypoint (``waypoint=True``) with ``:authority`` the *original*
  destination (service VIP:port or workload IP:port) and the waypoint's identities;
* :class:`Passthrough`: plain TCP to a destination outside the mesh (source IP kept);
* :class:`NoRoute`: refuse (fail closed), with the reason for the access log.

Waypoints (Istio's rules, ztunnel ``proxy/outbound.rs``, ``state.rs``): service-addressed
traffic uses ``Service.waypoint``, pod-addressed traffic ``Workload.waypoint``.  A
``GatewayAddress`` names the waypoint by ``ns/hostname`` (its Service: one healthy endpoint
on the HBONE port is picked) or by an address (a Service VIP or a workload IP).  A waypoint
that cannot be resolved, or has no healthy endpoint, is ``NoRoute``: traffic that needs a
waypoint is never sent around it.  Traffic *from* the waypoint itself never goes back to it
(Istio skips it for pod-addressed traffic; we skip it for service-addressed traffic too, so
no loop is possible even if a waypoint pod were captured).

Inbound (:func:`waypoint_bypass`): a connection to a workload that must be reached through a
waypoint is refused unless its peer identity is that waypoint's.  This is *stricter than
Istio*: Istio's ztunnel does not check it, and its docs tell operators to add an L4
AuthorizationPolicy allowing only the waypoint's service account.  We enforce it always, for
(a) a workload with its own waypoint (``istio.io/waypoint-for: workload|all``) and (b) a
connection whose destination port is a target port of a Service with a waypoint that selects
the workload (the port is how the destination tells it was "addressed through the service").

Service VIPs resolve to one endpoint per connection (random among healthy endpoints, or
weighted by capacity); the choice is injected so the table tests are deterministic.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ambient.hbone.protocol import format_authority
from ambient.identity import IdentityError, SpiffeId
from ambient.model import NamespacedHostname, NetworkAddress

if TYPE_CHECKING:
    from ambient.model import GatewayAddress, Service, Workload
    from ambient.store import MeshState

HBONE_PORT = 15008
Choose = Callable[[Sequence[tuple["Workload", int]]], tuple["Workload", int]]


@dataclass(frozen=True)
class Hbone:
    address: tuple[str, int]
    authority: str
    workload: Workload  # the next hop: the destination workload, or the waypoint's
    service: Service | None  # the service the client addressed (never the waypoint's)
    identities: frozenset[SpiffeId]
    waypoint: bool = False  # the next hop is the destination's waypoint


@dataclass(frozen=True)
class Passthrough:
    address: tuple[str, int]
    workload: Workload | None
    service: Service | None


@dataclass(frozen=True)
class NoRoute:
    reason: str
    service: Service | None = None


Route = Hbone | Passthrough | NoRoute


def weighted_choice(candidates: Sequence[tuple[Workload, int]]) -> tuple[Workload, int]:
    """Pick an endpoint, weighted by ``Workload.capacity`` (default 1)."""
    weights = [max(1, getattr(w, "capacity", 1) or 1) for w, _ in candidates]
    return random.choices(list(candidates), weights=weights, k=1)[0]


def _san_identities(service: Service | None) -> frozenset[SpiffeId]:
    if service is None:
        return frozenset()
    ids = set()
    for san in service.subject_alt_names:
        try:
            ids.add(SpiffeId.parse(san))
        except IdentityError:
            continue  # a non-SPIFFE SAN cannot match a mesh peer; ignore it
    return frozenset(ids)


def _to_workload(workload: Workload, port: int, service: Service | None) -> Route:
    ips = list(workload.addresses)
    if not ips:
        return NoRoute(f"workload {workload.namespace}/{workload.name} has no address", service)
    ip = str(ips[0])
    if workload.tunnel_protocol == "HBONE":
        return Hbone(
            address=(ip, HBONE_PORT),
            authority=format_authority(ips[0], port),
            workload=workload,
            service=service,
            identities=frozenset({workload.identity()}) | _san_identities(service),
        )
    return Passthrough(address=(ip, port), workload=workload, service=service)


# -- waypoints -------------------------------------------------------------------------------


def _describe(gw: GatewayAddress) -> str:
    return str(gw.destination)


def _waypoint_service(state: MeshState, gw: GatewayAddress) -> Service | None:
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        return state.service_by_key(f"{dest.namespace}/{dest.hostname}")
    return state.service_by_vip(dest.network, dest.ip)


def waypoint_workloads(state: MeshState, gw: GatewayAddress) -> list[Workload]:
    """Every workload behind a waypoint reference (healthy or not); [] if unknown."""
    svc = _waypoint_service(state, gw)
    if svc is not None:
        return state.endpoint_workloads(svc)
    dest = gw.destination
    if isinstance(dest, NetworkAddress):
        wl = state.workload_by_address(dest.network, dest.ip)
        return [wl] if wl is not None else []
    return []


def waypoint_identities(state: MeshState, gw: GatewayAddress) -> frozenset[SpiffeId]:
    """The identities a waypoint's proxies present (its workloads' and its Service's SANs)."""
    ids = {w.identity() for w in waypoint_workloads(state, gw)}
    return frozenset(ids) | _san_identities(_waypoint_service(state, gw))


def is_from_waypoint(state: MeshState, gw: GatewayAddress | None,
                     source: Workload | None) -> bool:
    """Whether ``source`` is one of the workloads making up the waypoint ``gw``."""
    if gw is None or source is None:
        return False
    return any(w.uid == source.uid for w in waypoint_workloads(state, gw))


def route_to_waypoint(
    state: MeshState,
    gw: GatewayAddress,
    authority: str,
    service: Service | None,
    target: str,
    choose: Choose,
) -> Route:
    """HBONE to one healthy proxy of waypoint ``gw``, keeping ``authority`` (the original
    destination); ``target`` names what needed the waypoint, for the refusal reason."""
    svc = _waypoint_service(state, gw)
    if svc is not None:
        candidates = [(w, p) for w, p in state.endpoints(svc, gw.hbone_mtls_port)
                      if w.status == "HEALTHY" and w.addresses]
        if not candidates:
            return NoRoute(
                f"{target} uses waypoint {_describe(gw)}, which has no ready proxy "
                f"on port {gw.hbone_mtls_port}; refusing rather than skipping it", service)
        wl, port = choose(candidates)
    else:
        dest = gw.destination
        found = (state.workload_by_address(dest.network, dest.ip)
                 if isinstance(dest, NetworkAddress) else None)
        if found is None or not found.addresses:
            return NoRoute(
                f"{target} uses waypoint {_describe(gw)}, which is unknown to this ztunnel "
                "(no such Service or workload); refusing rather than skipping it", service)
        wl, port = found, gw.hbone_mtls_port
    # A waypoint terminates HBONE itself whatever its capture mode: always HBONE.
    return Hbone(
        address=(str(wl.addresses[0]), port),
        authority=authority,
        workload=wl,
        service=service,
        identities=frozenset({wl.identity()}) | _san_identities(svc),
        waypoint=True,
    )


# -- outbound --------------------------------------------------------------------------------


def route_outbound(
    state: MeshState,
    source: Workload | None,
    dst_ip: str,
    dst_port: int,
    *,
    network: str = "",
    choose: Choose = weighted_choice,
) -> Route:
    """Decide where a connection from ``source`` to ``dst_ip:dst_port`` goes."""
    ip = ipaddress.ip_address(dst_ip)
    original = format_authority(ip, dst_port)
    service = state.service_by_vip(network, ip)
    if service is not None:
        if service.waypoint is not None and not is_from_waypoint(state, service.waypoint,
                                                                  source):
            return route_to_waypoint(state, service.waypoint, original, service,
                                     f"service {service.key}", choose)
        if dst_port not in service.ports:
            return NoRoute(
                f"service {service.namespace}/{service.hostname} has no port {dst_port}", service
            )
        endpoints = [(w, p) for w, p in state.endpoints(service, dst_port) if w.status == "HEALTHY"]
        if not endpoints:
            return NoRoute(
                f"no healthy endpoints for service {service.namespace}/{service.hostname}",
                service,
            )
        workload, target_port = choose(endpoints)
        return _to_workload(workload, target_port, service)
    target = state.workload_by_address(network, ip)
    if target is not None:
        if target.waypoint is not None and not is_from_waypoint(state, target.waypoint, source):
            return route_to_waypoint(state, target.waypoint, original, None,
                                     f"workload {target.namespace}/{target.name}", choose)
        return _to_workload(target, dst_port, None)
    return Passthrough(address=(dst_ip, dst_port), workload=None, service=None)


# -- inbound ---------------------------------------------------------------------------------


def required_waypoints(state: MeshState, workload: Workload,
                       dst_port: int) -> list[tuple[str, GatewayAddress]]:
    """The waypoints a connection to ``workload`` on ``dst_port`` must have come through,
    each with what requires it (``workload ns/name`` or ``service ns/host``)."""
    out: list[tuple[str, GatewayAddress]] = []
    if workload.waypoint is not None:
        out.append((f"workload {workload.namespace}/{workload.name}", workload.waypoint))
    for key in sorted(workload.services):
        svc = state.service_by_key(key)
        if svc is None or svc.waypoint is None:
            continue
        own = workload.services[key]
        targets = {own.get(sp) or tp for sp, tp in svc.ports.items()}
        if dst_port in targets:
            out.append((f"service {key}", svc.waypoint))
    return out


def waypoint_bypass(state: MeshState, workload: Workload, dst_port: int,
                    peer: SpiffeId | None) -> str | None:
    """Why a connection from ``peer`` skips a waypoint it must pass, or None if it does not.

    The peer must present the identity of (one of) the waypoint(s) required; an unresolvable
    waypoint has no identity, so the connection is refused (fail closed).
    """
    required = required_waypoints(state, workload, dst_port)
    if not required:
        return None
    allowed: set[SpiffeId] = set()
    for _, gw in required:
        allowed |= waypoint_identities(state, gw)
    if peer is not None and peer in allowed:
        return None
    what = ", ".join(sorted({f"{w} (waypoint {_describe(gw)})" for w, gw in required}))
    return (f"{workload.namespace}/{workload.name}:{dst_port} must be reached through its "
            f"waypoint: {what}; the peer {peer or 'without identity'} is not that waypoint")
