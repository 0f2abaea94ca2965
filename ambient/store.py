"""The single-writer mesh store (ztunnel's ProxyState, in Python).

One writer (the xDS client, or a local config loader) calls ``MeshStore.apply`` with batches
of upserts and removals. Each batch builds a new immutable ``MeshState`` (copy-on-write of the
maps and indexes that changed) and swaps it in with one attribute assignment, so readers on any
thread just take ``store.snapshot`` and use it for as long as they like without locks.

Invariants:
- Each bad entry is rejected on its own (a ``Rejection`` naming it, and a log line); the rest
  of the batch applies. A rejected entry never replaces the last good version of its key.
- Every object in a state went through ``model.from_proto`` (model objects handed in directly
  are re-validated by a proto round trip), so one code path decides what is valid.
- Indexes are always consistent with the maps: addresses -> workload, VIPs -> service,
  service -> endpoint workloads, namespace -> policies, node -> workloads.
- Lookups on ``MeshState`` are pure; scoping and endpoint selection follow ztunnel.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from ambient.api import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ambient.model import (
    IPAddress,
    ModelError,
    NetworkAddress,
    Policy,
    Scope,
    Service,
    Workload,
    from_proto,
    to_proto,
)

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "Endpoint",
    "MeshState",
    "MeshStore",
    "Rejection",
]

log = logging.getLogger("ambient.store")

_ADDRESS_KINDS = {"address", "workload", "service", ADDRESS_TYPE_URL}
_POLICY_KINDS = {"authorization", "policy", AUTHORIZATION_TYPE_URL}


class Rejection(NamedTuple):
    key: str
    message: str


class Endpoint(NamedTuple):
    workload: Workload
    target_port: int


def _add(index: dict, key: Any, member: str) -> None:
    old = index.get(key, ())
    index[key] = tuple(m for m in old if m != member) + (member,)


def _discard(index: dict, key: Any, member: str) -> None:
    old = index.get(key, ())
    new = tuple(m for m in old if m != member)
    if new:
        index[key] = new
    else:
        index.pop(key, None)


@dataclass(frozen=True, eq=False)
class MeshState:
    """An immutable view of the mesh at one version. All lookups are pure."""

    version: int = 0
    root_namespace: str | None = None
    _workloads: Mapping[str, Workload] = field(default_factory=dict)
    _services: Mapping[str, Service] = field(default_factory=dict)
    _policies: Mapping[str, Policy] = field(default_factory=dict)
    # NetworkAddress -> uids / service keys holding it, the last one wins.
    _wl_by_addr: Mapping[NetworkAddress, tuple[str, ...]] = field(default_factory=dict)
    _svc_by_vip: Mapping[NetworkAddress, tuple[str, ...]] = field(default_factory=dict)
    # service key -> uids of workloads whose ``services`` map names it.
    _endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # namespace -> namespace-scope policy keys; "" -> GLOBAL-scope policy keys.
    _pol_by_ns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _by_node: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # -- read-only maps ------------------------------------------------------------------
    @property
    def workloads(self) -> Mapping[str, Workload]:
        return MappingProxyType(self._workloads)  # type: ignore[arg-type]

    @property
    def services(self) -> Mapping[str, Service]:
        return MappingProxyType(self._services)  # type: ignore[arg-type]

    @property
    def policies(self) -> Mapping[str, Policy]:
        return MappingProxyType(self._policies)  # type: ignore[arg-type]

    # -- lookups -------------------------------------------------------------------------
    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_address(self, network: str, ip: IPAddress | str) -> Workload | None:
        uids = self._wl_by_addr.get(NetworkAddress(network, _ip(ip)))
        return self._workloads[uids[-1]] if uids else None

    def service_by_vip(self, network: str, ip: IPAddress | str) -> Service | None:
        keys = self._svc_by_vip.get(NetworkAddress(network, _ip(ip)))
        return self._services[keys[-1]] if keys else None

    def service_by_key(self, key: str) -> Service | None:
        return self._services.get(key)

    def endpoint_workloads(self, service: Service | str) -> list[Workload]:
        """All workloads selected by the service (healthy or not), in uid order."""
        key = service if isinstance(service, str) else service.key
        return [self._workloads[u] for u in sorted(self._endpoints.get(key, ()))]

    def endpoints(self, service: Service | str, service_port: int) -> list[Endpoint]:
        """Endpoints reachable on ``service_port``, with their target port (ztunnel's rule).

        The target port is the workload's own mapping for that service port, else the
        service's non-zero target port. A port the service does not declare has no endpoints,
        and a workload is skipped when the service's target is 0 (a named port) and the
        workload did not resolve it. Unhealthy workloads are included; callers filter on
        ``Workload.status``.
        """
        svc = self._services.get(service) if isinstance(service, str) else service
        if svc is None or service_port not in svc.ports:
            return []
        svc_target = svc.ports[service_port]
        out = []
        for wl in self.endpoint_workloads(svc):
            ep_ports = wl.services.get(svc.key, {})
            target = ep_ports.get(service_port) or svc_target
            if target:
                out.append(Endpoint(wl, target))
        return out

    def policies_for(self, workload: Workload) -> list[Policy]:
        """Policies in scope for ``workload`` as the destination (ztunnel's rule).

        Namespace-scope policies of the workload's namespace, GLOBAL-scope policies (all of
        them, like ztunnel; only the root namespace's if ``root_namespace`` is set), and the
        policies the workload lists in ``authorization_policies`` (unknown keys are skipped:
        the control plane may not have sent them yet).
        """
        keys = list(self._pol_by_ns.get(workload.namespace, ()))
        for k in self._pol_by_ns.get("", ()):
            if self.root_namespace is None or self._policies[k].namespace == self.root_namespace:
                keys.append(k)
        keys.extend(workload.authorization_policies)
        seen: set[str] = set()
        out = []
        for k in keys:
            pol = self._policies.get(k)
            if pol is not None and k not in seen:
                seen.add(k)
                out.append(pol)
        return out

    def workloads_on_node(self, node: str) -> list[Workload]:
        return [self._workloads[u] for u in sorted(self._by_node.get(node, ()))]

    # -- admin ---------------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        """The ``/config_dump`` body sections: workloads, services (with endpoints), policies."""
        services = []
        for key in sorted(self._services):
            js = self._services[key].to_json()
            js["endpoints"] = {
                wl.uid: {
                    "workloadUid": wl.uid,
                    "service": "",
                    "port": {str(k): v for k, v in sorted(wl.services.get(key, {}).items())},
                }
                for wl in self.endpoint_workloads(key)
            }
            services.append(js)
        return {
            "workloads": [self._workloads[k].to_json() for k in sorted(self._workloads)],
            "services": services,
            "policies": [self._policies[k].to_json() for k in sorted(self._policies)],
            "version": self.version,
        }


class _Builder:
    """Mutable copies of one state's maps and indexes, turned into the next state."""

    def __init__(self, s: MeshState) -> None:
        self.workloads = dict(s._workloads)
        self.services = dict(s._services)
        self.policies = dict(s._policies)
        self.wl_by_addr = dict(s._wl_by_addr)
        self.svc_by_vip = dict(s._svc_by_vip)
        self.endpoints = dict(s._endpoints)
        self.pol_by_ns = dict(s._pol_by_ns)
        self.by_node = dict(s._by_node)
        self.changed = False

    def remove_workload(self, uid: str) -> bool:
        old = self.workloads.pop(uid, None)
        if old is None:
            return False
        for na in old.network_addresses():
            _discard(self.wl_by_addr, na, uid)
        for skey in old.services:
            _discard(self.endpoints, skey, uid)
        if old.node:
            _discard(self.by_node, old.node, uid)
        self.changed = True
        return True

    def put_workload(self, wl: Workload) -> None:
        if self.workloads.get(wl.uid) == wl:
            return
        self.remove_workload(wl.uid)
        self.workloads[wl.uid] = wl
        for na in wl.network_addresses():
            _add(self.wl_by_addr, na, wl.uid)
        for skey in wl.services:
            _add(self.endpoints, skey, wl.uid)
        if wl.node:
            _add(self.by_node, wl.node, wl.uid)
        self.changed = True

    def remove_service(self, key: str) -> bool:
        old = self.services.pop(key, None)
        if old is None:
            return False
        for vip in old.vips:
            _discard(self.svc_by_vip, vip, key)
        self.changed = True
        return True

    def put_service(self, svc: Service) -> None:
        if self.services.get(svc.key) == svc:
            return
        self.remove_service(svc.key)
        self.services[svc.key] = svc
        for vip in svc.vips:
            _add(self.svc_by_vip, vip, svc.key)
        self.changed = True

    @staticmethod
    def _ns_index_key(p: Policy) -> str | None:
        if p.scope is Scope.GLOBAL:
            return ""
        if p.scope is Scope.NAMESPACE:
            return p.namespace
        return None

    def remove_policy(self, key: str) -> bool:
        old = self.policies.pop(key, None)
        if old is None:
            return False
        idx = self._ns_index_key(old)
        if idx is not None:
            _discard(self.pol_by_ns, idx, key)
        self.changed = True
        return True

    def put_policy(self, p: Policy) -> None:
        if self.policies.get(p.key) == p:
            return
        self.remove_policy(p.key)
        self.policies[p.key] = p
        idx = self._ns_index_key(p)
        if idx is not None:
            _add(self.pol_by_ns, idx, p.key)
        self.changed = True

    def build(self, version: int, root_namespace: str | None) -> MeshState:
        return MeshState(
            version=version,
            root_namespace=root_namespace,
            _workloads=self.workloads,
            _services=self.services,
            _policies=self.policies,
            _wl_by_addr=self.wl_by_addr,
            _svc_by_vip=self.svc_by_vip,
            _endpoints=self.endpoints,
            _pol_by_ns=self.pol_by_ns,
            _by_node=self.by_node,
        )


def _guess_key(obj: Any) -> str:
    """Best-effort name for a resource that failed to convert, for the rejection."""
    for attr in ("workload", "service"):
        try:
            if obj.HasField(attr):
                return _guess_key(getattr(obj, attr))
        except (AttributeError, ValueError):
            pass
    uid = getattr(obj, "uid", "")
    if uid:
        return uid
    ns = getattr(obj, "namespace", "")
    name = getattr(obj, "hostname", "") or getattr(obj, "name", "")
    return f"{ns}/{name}" if ns or name else "(unnamed)"


def _convert(obj: Any) -> Workload | Service | Policy:
    if isinstance(obj, Workload | Service | Policy):
        # Re-validate through the proto path: one place decides what is valid.
        return from_proto(to_proto(obj))
    if hasattr(obj, "DESCRIPTOR"):
        return from_proto(obj)
    raise ModelError(f"unsupported resource {type(obj).__name__}")


class MeshStore:
    """The single writer of mesh state; readers use ``snapshot``.

    ``root_namespace``: if set, GLOBAL-scope policies apply only when they live in it (what
    istiod always sends); the default ``None`` applies every GLOBAL policy, as ztunnel does.
    """

    def __init__(self, root_namespace: str | None = None) -> None:
        self._root_namespace = root_namespace
        self._state = MeshState(root_namespace=root_namespace)
        self._lock = threading.Lock()  # guards against accidental concurrent writers
        self._subscribers: list[Callable[[MeshState], None]] = []

    @property
    def snapshot(self) -> MeshState:
        return self._state

    def subscribe(self, callback: Callable[[MeshState], None]) -> Callable[[], None]:
        """Call ``callback(new_state)`` after every batch that changed something.

        Returns a function that unsubscribes. Callbacks run on the writer's thread; an
        exception in one is logged and does not affect the store or other callbacks.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def apply(
        self,
        upserts: Iterable[Any] = (),
        removals: Iterable[str | tuple[str, str]] = (),
    ) -> list[Rejection]:
        """Apply one batch: removals first, then upserts in order (a later one wins).

        ``upserts``: protos (``Address``, ``Workload``, ``Service``, ``Authorization``) or
        model objects. ``removals``: a key (workload uid, service ``ns/hostname`` or policy
        ``ns/name``; removed from every kind it names), or ``(kind, key)`` where kind is an
        xDS type URL or ``"address"``/``"workload"``/``"service"``/``"policy"``.
        Returns the rejected entries; everything else is applied.
        """
        rejections: list[Rejection] = []
        with self._lock:
            b = _Builder(self._state)
            for r in removals:
                kind, key = r if isinstance(r, tuple) else ("", r)
                addr = kind == "" or kind in _ADDRESS_KINDS
                pol = kind == "" or kind in _POLICY_KINDS
                if not addr and not pol:
                    rejections.append(Rejection(key, f"removal of unknown kind {kind!r}"))
                    continue
                if addr and kind != "service":
                    b.remove_workload(key)
                if addr and kind != "workload":
                    b.remove_service(key)
                if pol:
                    b.remove_policy(key)
            for obj in upserts:
                try:
                    item = _convert(obj)
                except (ModelError, ValueError, TypeError) as e:
                    key = _guess_key(obj)
                    log.warning("rejected %s: %s (keeping its last good version)", key, e)
                    rejections.append(Rejection(key, str(e)))
                    continue
                if isinstance(item, Workload):
                    b.put_workload(item)
                elif isinstance(item, Service):
                    b.put_service(item)
                else:
                    b.put_policy(item)
            if not b.changed:
                return rejections
            new = b.build(self._state.version + 1, self._root_namespace)
            self._state = new
        for cb in list(self._subscribers):
            try:
                cb(new)
            except Exception:
                log.exception("store subscriber %r failed", cb)
        return rejections

    def replace_all(self, resources: Iterable[Any]) -> list[Rejection]:
        """Make the store hold exactly ``resources`` (a full local config reload).

        Keys missing from ``resources`` are removed; a rejected entry keeps its last good
        version (it is not removed).
        """
        items = list(resources)
        keep_wl, keep_svc, keep_pol = set(), set(), set()
        for obj in items:
            key = obj.key if isinstance(obj, Workload | Service | Policy) else _guess_key(obj)
            keep_wl.add(key)
            keep_svc.add(key)
            keep_pol.add(key)
        s = self._state
        removals: list[str | tuple[str, str]] = [
            ("workload", k) for k in s._workloads if k not in keep_wl
        ]
        removals += [("service", k) for k in s._services if k not in keep_svc]
        removals += [("policy", k) for k in s._policies if k not in keep_pol]
        return self.apply(items, removals)

    def dump(self) -> dict[str, Any]:
        return self._state.dump()


def _ip(ip: IPAddress | str) -> IPAddress:
    """``ip`` as an address object; one already parsed is not parsed again (lookups run for
    every proxied connection, and ``ip_address`` re-parses its argument's text)."""
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip
    return ipaddress.ip_address(ip)
