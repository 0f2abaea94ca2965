"""What the waypoint knows: the cluster objects it watches, turned into the mesh model and the
L7 configuration, with the last good version of every object kept in force.

Role: ``WaypointState.apply(update)`` takes a source's ``controlplane.objects.Update`` (from
``LocalSource`` or ``KubernetesSource``), runs the control plane's incremental ``Translator``
into a ``MeshStore`` (services, workloads, endpoints: what routing needs) and rebuilds the L7
configuration with ``waypoint.l7.build_config``. Readers take ``snapshot()``: an immutable
``Snapshot`` of mesh state, L7 config and service port protocols, swapped in one assignment.

Invariants:
* Single writer (the event loop's source task); readers never see a half-applied update.
* A new version of an L7 object (HTTPRoute, GRPCRoute, AuthorizationPolicy,
  HTTPTrafficPolicy) that ``build_config`` rejects is replaced by its last good version, and
  the problem is logged once; the mesh model keeps the translator's own last-good rule.
* ``port_protocol`` follows Istio's protocol selection: the port's ``appProtocol``, else the
  port name's prefix before ``-``; ``http``, ``http2``, ``grpc``, ``grpc-web`` and
  ``kubernetes.io/h2c`` are HTTP, anything else (or nothing) is TCP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ambient.config.k8s_parse import KINDS as TRANSLATED_KINDS
from ambient.config.manifests import Settings as TranslateSettings
from ambient.config.manifests import Translator
from ambient.store import MeshState, MeshStore
from controlplane.objects import ObjectStore, Update
from waypoint import l7

__all__ = ["L7_KINDS", "Snapshot", "WaypointState", "port_protocol", "service_protocols"]

log = logging.getLogger("waypoint.config")

L7_KINDS = frozenset({"HTTPRoute", "GRPCRoute", "AuthorizationPolicy", "HTTPTrafficPolicy"})
HTTP_PROTOCOLS = {"http": "http", "http2": "http2", "grpc": "grpc", "grpc-web": "http2",
                  "kubernetes.io/h2c": "http2", "h2c": "http2"}


def port_protocol(port: Mapping[str, Any]) -> str:
    """``http`` | ``http2`` | ``grpc`` | ``tcp`` for one Service port (pure)."""
    app = port.get("appProtocol")
    if isinstance(app, str) and app:
        return HTTP_PROTOCOLS.get(app.lower(), "tcp")
    name = port.get("name")
    if isinstance(name, str) and name:
        return HTTP_PROTOCOLS.get(name.lower().split("-", 1)[0], "tcp")
    return "tcp"


def service_protocols(objects: Mapping[str, Mapping[str, Any]], cluster_domain: str
                      ) -> dict[str, dict[int, str]]:
    """``"ns/hostname"`` -> {service port: protocol} for every Service object (pure)."""
    out: dict[str, dict[int, str]] = {}
    for key, obj in objects.items():
        if not key.startswith("Service/"):
            continue
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        ports: dict[int, str] = {}
        for p in spec.get("ports") or []:
            if isinstance(p, dict) and isinstance(p.get("port"), int):
                ports[p["port"]] = port_protocol(p)
        out[f"{ns}/{name}.{ns}.svc.{cluster_domain}"] = ports
    return out


@dataclass(frozen=True)
class Snapshot:
    mesh: MeshState
    l7: Any  # waypoint.l7.WaypointConfig
    protocols: Mapping[str, Mapping[int, str]] = field(
        default_factory=lambda: MappingProxyType({}))
    version: int = 0

    def protocol(self, service_key: str, port: int) -> str:
        return self.protocols.get(service_key, {}).get(port, "tcp")


class WaypointState:
    """Objects in, snapshots out; see the module docstring."""

    def __init__(
        self,
        name: str,
        namespace: str,
        *,
        trust_domain: str = "cluster.local",
        cluster_domain: str = "cluster.local",
        cluster_id: str = "Kubernetes",
        root_namespace: str = "istio-system",
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.trust_domain = trust_domain
        self.cluster_domain = cluster_domain
        self.objects = ObjectStore()
        self.translator = Translator(TranslateSettings(cluster_id, trust_domain, cluster_domain,
                                                       root_namespace))
        self.mesh = MeshStore()
        cfg, _ = l7.build_config({}, namespace, name, trust_domain=trust_domain,
                                 cluster_domain=cluster_domain)
        self._snapshot = Snapshot(self.mesh.snapshot, cfg)
        self._last_good: dict[str, dict[str, Any]] = {}  # L7 object key -> last good object
        self.problems: list[str] = []
        self.synced = False
        self.updates = 0

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def apply(self, update: Update) -> None:
        """Apply one source update (never raises for bad objects; they are logged)."""
        changed = self.objects.apply(update)
        objs = self.objects.objects
        translated = {k: objs[k] for k in changed
                      if k in objs and k.split("/", 1)[0] in TRANSLATED_KINDS}
        deletes = {k for k in changed if k not in objs}
        delta = self.translator.apply(translated, deletes)
        rejections = self.mesh.apply(delta.upserts.values(), delta.removals)
        for r in rejections:
            log.error("mesh entry %s rejected (its last good version stays): %s", r.key,
                      r.message)
        cfg, problems = self._build_l7(changed)
        self._report(problems)
        self.updates += 1
        self._snapshot = Snapshot(
            self.mesh.snapshot, cfg,
            MappingProxyType(service_protocols(objs, self.cluster_domain)),
            self.updates,
        )
        if update.resync:
            self.synced = True

    def _build_l7(self, changed: set[str]) -> tuple[Any, list[str]]:
        objs = self.objects.objects
        for key in [k for k in self._last_good if k not in objs]:
            del self._last_good[key]
        current = dict(objs)
        cfg, problems = self._build(current)
        rejected = _rejected(cfg, problems, current)
        swapped = False
        for key in rejected:
            good = self._last_good.get(key)
            if good is not None and current.get(key) is not good:
                current[key] = good
                swapped = True
                log.error("%s is invalid; its last good version stays in force", key)
        if swapped:
            cfg, more = self._build(current)
            problems = problems + [p for p in more if p not in problems]
            rejected = _rejected(cfg, more, current)
        for key, obj in current.items():
            if key.split("/", 1)[0] in L7_KINDS and key not in rejected:
                self._last_good[key] = obj
        return cfg, problems

    def _build(self, objects: Mapping[str, dict[str, Any]]) -> tuple[Any, list[str]]:
        return l7.build_config(objects, self.namespace, self.name,  # type: ignore[no-any-return]
                               trust_domain=self.trust_domain,
                               cluster_domain=self.cluster_domain)

    def _report(self, problems: list[str]) -> None:
        for p in problems:
            if p not in self.problems:
                log.warning("waypoint config: %s", p)
        self.problems = problems


def _rejected(cfg: Any, problems: list[str], objects: Mapping[str, Any]) -> set[str]:
    """Keys of L7 objects ``build_config`` refused (it lists them in ``cfg.rejected``)."""
    keys = getattr(cfg, "rejected", None)
    if keys is not None:
        return set(keys)
    del problems, objects
    return set()
