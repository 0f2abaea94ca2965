"""The snapshot cache the xDS server serves from: resources by type URL and name, versioned.

Role: the one place where translated resources (``istio.workload.Address``,
``istio.security.Authorization`` protos) wait to be pushed.  The translation pipeline writes
batches into it; every delta xDS stream reads from it and is told which names changed.

Invariants:
- Single writer: ``apply`` is called from the control plane's event loop only; watchers are
  called synchronously from ``apply``, on that loop, after the batch is in place.
- A resource's version is a short hash of its deterministic serialization, so equal content
  always has an equal version, in this process and in the next one.  That is what lets a
  reconnecting proxy (``initial_resource_versions``) be sent only what really changed, even
  across a control-plane restart.
- An upsert whose content is unchanged is not a change: no watcher hears about it.
- ``system_version`` grows by one for every batch that changed something (informational: it
  becomes ``system_version_info`` in responses).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from google.protobuf.message import Message

__all__ = ["Entry", "SnapshotCache", "Watcher", "resource_version"]

log = logging.getLogger("controlplane.cache")

Watcher = Callable[[str, frozenset[str]], None]
"""Called with ``(type_url, names that changed or were removed)`` after each batch."""


class Entry(NamedTuple):
    """One cached resource: unpacks as ``(version, proto)``; ``data`` is its wire bytes."""

    version: str
    resource: Message
    data: bytes


class ChangesLike(Protocol):
    """What the translation pipeline hands over: per type URL, upserts and removals."""

    @property
    def upserts(self) -> Mapping[str, Mapping[str, Message]]: ...

    @property
    def removals(self) -> Mapping[str, Iterable[str]]: ...


def resource_version(data: bytes) -> str:
    """The version of a resource with wire bytes ``data``: 16 hex digits of BLAKE2b."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class SnapshotCache:
    """Resources by type URL and name; notifies watchers of the names each batch changed."""

    def __init__(self) -> None:
        self._types: dict[str, dict[str, Entry]] = {}
        self._watchers: list[Watcher] = []
        self.system_version = 0

    # -- reading ---------------------------------------------------------------------------
    def resources(self, type_url: str) -> Mapping[str, Entry]:
        """A read-only view of ``{name: (version, proto, data)}`` for ``type_url``."""
        return MappingProxyType(self._types.get(type_url, {}))

    def get(self, type_url: str, name: str) -> Entry | None:
        return self._types.get(type_url, {}).get(name)

    # -- watching --------------------------------------------------------------------------
    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Register ``watcher``; returns a function that unregisters it (idempotent)."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    # -- writing ---------------------------------------------------------------------------
    def apply(
        self,
        type_url: str,
        upserts: Mapping[str, Message] | None = None,
        removals: Iterable[str] = (),
    ) -> frozenset[str]:
        """Apply one batch for ``type_url``: removals first, then upserts (a name in both stays).

        Returns the names that changed (added, changed or removed); watchers are told the
        same set, only when it is not empty.
        """
        changed = self._apply_one(type_url, upserts or {}, removals)
        if changed:
            self.system_version += 1
            self._notify(type_url, changed)
        return changed

    def apply_changes(self, changes: ChangesLike) -> dict[str, frozenset[str]]:
        """Apply a pipeline ``Changes`` (every type URL it names) as one batch."""
        out: dict[str, frozenset[str]] = {}
        for type_url in sorted(set(changes.upserts) | set(changes.removals)):
            changed = self._apply_one(
                type_url, changes.upserts.get(type_url, {}), changes.removals.get(type_url, ())
            )
            if changed:
                out[type_url] = changed
        if out:
            self.system_version += 1
            for type_url, names in out.items():
                self._notify(type_url, names)
        return out

    def replace(self, type_url: str, resources: Mapping[str, Message]) -> frozenset[str]:
        """Make ``type_url`` hold exactly ``resources`` (a full resync)."""
        gone = set(self._types.get(type_url, {})) - set(resources)
        return self.apply(type_url, resources, gone)

    def _apply_one(
        self, type_url: str, upserts: Mapping[str, Message], removals: Iterable[str]
    ) -> frozenset[str]:
        current = self._types.setdefault(type_url, {})
        changed: set[str] = set()
        for name in removals:
            if name not in upserts and current.pop(name, None) is not None:
                changed.add(name)
        for name, msg in upserts.items():
            if not name:
                raise ValueError(f"{type_url}: a resource has an empty name; every resource "
                                 "needs its key (workload uid, ns/hostname or ns/name)")
            data = msg.SerializeToString(deterministic=True)
            old = current.get(name)
            if old is not None and old.data == data:
                continue
            current[name] = Entry(resource_version(data), msg, data)
            changed.add(name)
        return frozenset(changed)

    def _notify(self, type_url: str, names: frozenset[str]) -> None:
        for w in list(self._watchers):
            try:
                w(type_url, names)
            except Exception:  # one broken stream must not stop the others
                log.exception("cache watcher %r failed", w)

    def dump(self) -> dict[str, Any]:
        """``{type_url: {name: version}}``, for debugging endpoints and tests."""
        return {t: {n: e.version for n, e in sorted(m.items())} for t, m in self._types.items()}
