"""The control plane's view of the cluster: Kubernetes objects as plain dicts, by key.

Role: the seam between the *sources* (Kubernetes list/watch, or a local manifests
directory) and the *translation* into Istio's WDS resources.  A source never translates;
it only reports what objects exist, as :class:`Update` batches delivered to a sink.

Invariants:
- An object's key is ``"<Kind>/<namespace>/<name>"`` (namespace empty for cluster-scoped
  kinds such as Namespace).  Objects are the JSON/YAML dict shape Kubernetes serves
  (``apiVersion``, ``kind``, ``metadata``, ``spec``, ``status``).
- The first update a source delivers has ``resync=True`` and holds the complete set: keys
  not in it no longer exist.  Later updates are deltas (``upserts`` replace whole objects,
  ``deletes`` remove keys).  After a re-list (e.g. a watch that answered 410 Gone), the
  source sends another ``resync=True`` update with the complete set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount",
    "AuthorizationPolicy", "PeerAuthentication", "Gateway", "HTTPRoute",
    # read by waypoints only (L7): routes, cross-namespace grants, faults and rate limits
    "GRPCRoute", "ReferenceGrant", "HTTPTrafficPolicy",
)
CLUSTER_SCOPED = frozenset({"Namespace"})


def object_key(obj: dict[str, Any]) -> str:
    """``Kind/namespace/name`` of a Kubernetes object dict (KeyError if it has no name)."""
    kind = str(obj.get("kind", ""))
    meta = obj.get("metadata") or {}
    ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return f"{kind}/{ns}/{meta['name']}"


@dataclass
class Update:
    upserts: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    resync: bool = False  # True: upserts is the complete set of objects


Sink = Callable[[Update], None]


class ObjectStore:
    """The current objects, by key; single writer (the control plane's event loop)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0

    def apply(self, update: Update) -> set[str]:
        """Apply ``update``; returns the keys whose object changed (added, replaced, removed)."""
        changed: set[str] = set()
        if update.resync:
            gone = set(self.objects) - set(update.upserts)
            for k in gone:
                del self.objects[k]
            changed |= gone
        for k in update.deletes:
            if self.objects.pop(k, None) is not None:
                changed.add(k)
        for k, obj in update.upserts.items():
            if self.objects.get(k) != obj:
                self.objects[k] = obj
                changed.add(k)
        if changed:
            self.version += 1
        return changed
