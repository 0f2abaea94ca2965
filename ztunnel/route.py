"""Outbound routing: where a captured connection goes.  Pure functions over a state snapshot.

Given the mesh state, the source workload and the original destination of a captured
connection, :func:`route_outbound` decides one of:

* :class:`Hbone`: tunnel to ``<endpoint ip>:15008`` with ``:authority`` ``<endpoint ip>:<port>``,
  expecting one of a set of SPIFFE identities on the far side;
* :class:`Passthrough`: plain TCP to a destination outside the mesh (source IP kept);
* :class:`NoRoute`: refuse (fail closed), with the reason for the access log.

Service VIPs resolve to one endpoint per connection (random among healthy endpoints, or
weighted by capacity); the choice is injected so the table tests are deterministic.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ambient.hbone.protocol import format_authority
from ambient.identity import IdentityError, SpiffeId

if TYPE_CHECKING:
    from ambient.model import Service, Workload
    from ambient.store import MeshState

HBONE_PORT = 15008
T = TypeVar("T")


@dataclass(frozen=True)
class Hbone:
    address: tuple[str, int]
    authority: str
    workload: Workload
    service: Service | None
    identities: frozenset[SpiffeId]


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
            authority=format_authority(ip, port),
            workload=workload,
            service=service,
            identities=frozenset({workload.identity()}) | _san_identities(service),
        )
    return Passthrough(address=(ip, port), workload=workload, service=service)


def route_outbound(
    state: MeshState,
    source: Workload | None,
    dst_ip: str,
    dst_port: int,
    *,
    network: str = "",
    choose: Callable[[Sequence[tuple[Workload, int]]], tuple[Workload, int]] = weighted_choice,
) -> Route:
    """Decide where a connection from ``source`` to ``dst_ip:dst_port`` goes."""
    ip = ipaddress.ip_address(dst_ip)
    service = state.service_by_vip(network, ip)
    if service is not None:
        if getattr(service, "waypoint", None):
            # Waypoints (L7) are not built yet: traffic that must pass one is refused,
            # never sent around it.
            return NoRoute(
                f"service {service.namespace}/{service.hostname} uses a waypoint, "
                "which this ztunnel cannot reach yet",
                service,
            )
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
        if getattr(target, "waypoint", None):
            return NoRoute(
                f"workload {target.namespace}/{target.name} uses a waypoint, "
                "which this ztunnel cannot reach yet"
            )
        return _to_workload(target, dst_port, None)
    return Passthrough(address=(dst_ip, dst_port), workload=None, service=None)
