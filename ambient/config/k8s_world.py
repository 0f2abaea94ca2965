"""The parsed Kubernetes objects, indexed, and which outputs a change can affect.

``World`` holds the last good record of every object (see ``k8s_parse``) with the indexes
translation needs (pods by namespace and by label, services by namespace, EndpointSlices by
service and by the pods they reference, selector policies by namespace, waypoint users by
waypoint).  ``World.put`` replaces one record and returns the *producers* whose outputs may
change: a producer is the key of an object that yields resources (a Pod, Service,
EndpointSlice or AuthorizationPolicy) or ``PA_PRODUCER``, which yields every resource
derived from PeerAuthentications.

Invariants: the indexes always describe exactly ``records``; the affected set of a change
over-approximates: any producer whose output could differ after the change is in it (the
pipeline's property test checks incremental == full translation).  Waypoint use is the one
dependency found by reading: builders record which waypoints they looked up (``note_waypoints``)
so a Gateway change reaches exactly its users.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ambient.config import k8s_policy as kp
from ambient.config.k8s_parse import (
    GatewayInfo,
    NsInfo,
    Parsed,
    PodInfo,
    PolicyInfo,
    Settings,
    SliceInfo,
    SvcInfo,
    selects,
)

PA_PRODUCER = "PeerAuthentication/*"
Ref = tuple[str, str]  # (namespace, name)


def _split(key: str) -> tuple[str, str, str]:
    kind, ns, name = key.split("/", 2)
    return kind, ns, name


class World:
    """Single writer: the translator that owns it."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.records: dict[str, Parsed] = {}
        self.namespaces: dict[str, NsInfo] = {}
        self.pods: dict[str, PodInfo] = {}  # object key -> pod
        self.pods_by_ns: dict[str, set[str]] = defaultdict(set)
        self.pods_by_label: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.services: dict[Ref, SvcInfo] = {}
        self.services_by_ns: dict[str, set[str]] = defaultdict(set)  # ns -> service names
        self.slices: dict[str, SliceInfo] = {}  # object key -> slice
        self.slices_by_service: dict[Ref, set[str]] = defaultdict(set)
        self.slices_by_pod: dict[Ref, set[str]] = defaultdict(set)  # pod ref -> slice keys
        self.gateways: dict[Ref, GatewayInfo] = {}
        self.policies: dict[str, PolicyInfo] = {}
        self.selector_policies_by_ns: dict[str, set[str]] = defaultdict(set)
        self.pas: dict[str, kp.PeerAuthn] = {}
        self.pas_by_ns: dict[str, set[str]] = defaultdict(set)
        self._wp_deps: dict[str, set[Ref]] = {}
        self._wp_users: dict[Ref, set[str]] = defaultdict(set)

    # -- queries ----------------------------------------------------------------------------

    def pods_matching(self, ns: str | None, selector: dict[str, str] | None) -> set[str]:
        """Keys of pods in ``ns`` (all namespaces if None) whose labels match ``selector``."""
        if not selector:
            return set()
        sets = [self.pods_by_label.get(kv, set()) for kv in selector.items()]
        smallest = min(sets, key=len)
        out = set()
        for key in smallest:
            p = self.pods[key]
            if (ns is None or p.namespace == ns) and selects(selector, p.labels):
                out.add(key)
        return out

    def pods_in(self, ns: str | None) -> set[str]:
        return set(self.pods) if ns is None else set(self.pods_by_ns.get(ns, ()))

    def services_in(self, ns: str) -> list[SvcInfo]:
        return [self.services[(ns, n)] for n in sorted(self.services_by_ns.get(ns, ()))]

    def pas_for(self, ns: str) -> list[kp.PeerAuthn]:
        keys = self.pas_by_ns.get(ns, set()) | self.pas_by_ns.get(self.s.root_namespace, set())
        return [self.pas[k] for k in sorted(keys)]

    def waypoint(self, ref: Ref) -> tuple[GatewayInfo, Any] | None:
        """A ready waypoint and its GatewayAddress, or None.

        istiod takes the address from the Gateway's status; with no status (no gateway
        controller, as in the local mode) we use the Service named like the Gateway.
        """
        gw = self.gateways.get(ref)
        if gw is None:
            return None
        if gw.address is not None:
            return gw, gw.address
        svc = self.services.get(ref)
        if svc is None:
            return None
        from ambient.api.istio.workload import workload_pb2 as wpb

        addr = wpb.GatewayAddress(
            hostname=wpb.NamespacedHostname(namespace=svc.namespace, hostname=svc.hostname),
            hbone_mtls_port=15008,
        )
        return gw, addr

    def note_waypoints(self, producer: str, refs: Iterable[Ref]) -> None:
        """Record the waypoints ``producer`` looked up (so their changes reach it)."""
        for r in self._wp_deps.pop(producer, ()):
            users = self._wp_users[r]
            users.discard(producer)
            if not users:
                del self._wp_users[r]
        new = set(refs)
        if new:
            self._wp_deps[producer] = new
            for r in new:
                self._wp_users[r].add(producer)

    def producers(self) -> list[str]:
        out = [k for k in self.pods]
        out += [f"Service/{ns}/{n}" for ns, n in self.services]
        out += list(self.slices)
        out += [k for k, p in self.policies.items() if p.out is not None]
        out.append(PA_PRODUCER)
        return out

    # -- updates ----------------------------------------------------------------------------

    def put(self, key: str, rec: Parsed, present: bool) -> set[str]:
        """Make ``key`` hold ``rec`` (or be absent); returns the affected producers."""
        old = self.records.get(key)
        had = key in self.records
        affected = self._affected(key, old) if had else set()
        if had:
            self._unindex(key, old)
            del self.records[key]
        if present:
            self.records[key] = rec
            self._index(key, rec)
            affected |= self._affected(key, rec)
        return affected

    def _affected(self, key: str, rec: Parsed) -> set[str]:
        kind, ns, name = _split(key)
        root = self.s.root_namespace
        if kind == "Namespace":
            out = self.pods_in(name)
            return out | {f"Service/{name}/{n}" for n in self.services_by_ns.get(name, ())}
        if kind == "Pod":
            return {key}
        if kind == "Service":
            out = {key} | self._wp_users.get((ns, name), set())
            if isinstance(rec, SvcInfo):
                out |= self.pods_matching(ns, rec.selector)
            for sk in self.slices_by_service.get((ns, name), ()):
                out.add(sk)
                out |= {f"Pod/{ns}/{p}" for p in self.slices[sk].pod_refs()}
            return out
        if kind == "EndpointSlice":
            out = {key}
            if isinstance(rec, SliceInfo):
                out |= {f"Pod/{ns}/{p}" for p in rec.pod_refs()}
            return out
        if kind == "Gateway":
            return set(self._wp_users.get((ns, name), set()))
        if kind == "AuthorizationPolicy":
            out = {key}
            if isinstance(rec, PolicyInfo) and rec.out is not None and rec.out.selector:
                out |= self.pods_matching(None if ns == root else ns, rec.out.selector)
            return out
        if kind == "PeerAuthentication" and isinstance(rec, kp.PeerAuthn):
            out = {PA_PRODUCER}
            if rec.selector is None:
                out |= self.pods_in(None if ns == root else ns)
            elif ns != root:
                out |= self.pods_matching(ns, rec.selector)
            return out
        return set()

    def _index(self, key: str, rec: Parsed) -> None:
        kind, ns, name = _split(key)
        if isinstance(rec, NsInfo):
            self.namespaces[name] = rec
        elif isinstance(rec, PodInfo):
            self.pods[key] = rec
            self.pods_by_ns[ns].add(key)
            for kv in rec.labels.items():
                self.pods_by_label[kv].add(key)
        elif isinstance(rec, SvcInfo):
            self.services[(ns, name)] = rec
            self.services_by_ns[ns].add(name)
        elif isinstance(rec, SliceInfo):
            self.slices[key] = rec
            if rec.service:
                self.slices_by_service[(ns, rec.service)].add(key)
            for p in rec.pod_refs():
                self.slices_by_pod[(ns, p)].add(key)
        elif isinstance(rec, GatewayInfo):
            self.gateways[(ns, name)] = rec
        elif isinstance(rec, PolicyInfo):
            self.policies[key] = rec
            if rec.out is not None and rec.out.selector:
                self.selector_policies_by_ns[ns].add(key)
        elif isinstance(rec, kp.PeerAuthn):
            self.pas[key] = rec
            self.pas_by_ns[ns].add(key)

    def _unindex(self, key: str, rec: Parsed) -> None:
        kind, ns, name = _split(key)

        def drop(index: dict[Any, set[str]], k: Any, v: str) -> None:
            s = index.get(k)
            if s is not None:
                s.discard(v)
                if not s:
                    del index[k]

        if isinstance(rec, NsInfo):
            self.namespaces.pop(name, None)
        elif isinstance(rec, PodInfo):
            del self.pods[key]
            drop(self.pods_by_ns, ns, key)
            for kv in rec.labels.items():
                drop(self.pods_by_label, kv, key)
        elif isinstance(rec, SvcInfo):
            del self.services[(ns, name)]
            drop(self.services_by_ns, ns, name)
        elif isinstance(rec, SliceInfo):
            del self.slices[key]
            if rec.service:
                drop(self.slices_by_service, (ns, rec.service), key)
            for p in rec.pod_refs():
                drop(self.slices_by_pod, (ns, p), key)
        elif isinstance(rec, GatewayInfo):
            del self.gateways[(ns, name)]
        elif isinstance(rec, PolicyInfo):
            del self.policies[key]
            drop(self.selector_policies_by_ns, ns, key)
        elif isinstance(rec, kp.PeerAuthn):
            del self.pas[key]
            drop(self.pas_by_ns, ns, key)
