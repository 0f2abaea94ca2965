"""Object updates in, changed WDS resources out: the control plane's translation step.

``Pipeline.apply(update)`` applies a source's ``Update`` to the ``ObjectStore``, hands only the
objects that really changed to the incremental ``Translator`` (``ambient.config.manifests``)
and returns ``Changes``: per xDS type URL, the resources to send (``{name: proto}``) and the
names to remove.  Resource names are istiod's: a Workload's uid, ``ns/hostname`` for a
Service, ``ns/name`` for an Authorization.

Invariants:
- Incremental: a change re-translates only the producers it can affect (one pod change
  re-translates one workload); the result equals a full translation of the store's objects
  whenever every object translates (the property test in ``tests/unit/test_pipeline.py``).
- A broken object never removes other objects' resources, and a broken new version of an
  object keeps its last good translation in force; ``problems()`` says what and why.
- Single writer: call ``apply`` from one task (the control plane's event loop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ambient.api import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ambient.config.manifests import Problems, Settings, Translator
from controlplane.objects import ObjectStore, Update

log = logging.getLogger("controlplane.pipeline")

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)


@dataclass
class Changes:
    """What one update changed, per type URL."""

    upserts: dict[str, dict[str, Any]] = field(default_factory=lambda: {t: {} for t in TYPE_URLS})
    removals: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TYPE_URLS})

    def __bool__(self) -> bool:
        return any(self.upserts.values()) or any(self.removals.values())

    def count(self) -> int:
        """Resources pushed (upserts plus removals) over all types."""
        return sum(len(v) for v in self.upserts.values()) + sum(
            len(v) for v in self.removals.values()
        )


def type_url_of(msg: Any) -> str:
    name = msg.DESCRIPTOR.full_name
    return AUTHORIZATION_TYPE_URL if name == "istio.security.Authorization" else ADDRESS_TYPE_URL


class Pipeline:
    def __init__(self, settings: Settings | None = None) -> None:
        self.store = ObjectStore()
        self.translator = Translator(settings)
        self._types: dict[str, str] = {}  # resource name -> type URL
        self._reported: dict[str, Problems] = {}

    def apply(self, update: Update) -> Changes:
        changed = self.store.apply(update)
        objs = self.store.objects
        upserts = {k: objs[k] for k in changed if k in objs}
        deletes = {k for k in changed if k not in objs}
        delta = self.translator.apply(upserts, deletes)
        out = Changes()
        for name in delta.removals:
            t = self._types.pop(name, ADDRESS_TYPE_URL)
            out.removals[t].add(name)
        for name, msg in delta.upserts.items():
            t = type_url_of(msg)
            old = self._types.get(name)
            if old is not None and old != t:
                out.removals[old].add(name)  # a name that changed type (pathological)
            self._types[name] = t
            out.upserts[t][name] = msg
        self._log_problems()
        return out

    def resources(self, type_url: str) -> dict[str, Any]:
        """The current resources of one type, by name (for a new subscriber)."""
        return {
            n: m for n, m in self.translator.resources.items() if self._types.get(n) == type_url
        }

    def problems(self) -> dict[str, Problems]:
        """Translation errors and warnings, by object key."""
        return self.translator.problems()

    def _log_problems(self) -> None:
        # Log what is new, once: an operator sees each problem when it appears.
        now = self.translator.problems()
        for key, p in now.items():
            before = self._reported.get(key)
            if before is not None and before.errors == p.errors and before.warnings == p.warnings:
                continue
            for e in p.errors:
                log.error("%s", e)
            for w in p.warnings:
                if before is None or w not in before.warnings:
                    log.warning("%s", w)
        self._reported = now
