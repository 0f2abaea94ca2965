"""Kubernetes manifests -> the WDS protos istiod would push (Address and Authorization).

Two entry points over one engine:
- ``translate_manifests(text or dicts)``: the whole set at once (ztunnel's local-manifests
  mode, tests);
- ``Translator``: the incremental engine the control plane keeps; ``apply`` takes changed
  and deleted objects by key and returns which resources changed.

Kinds read: Namespace, Pod, Service, EndpointSlice, Gateway (class istio-waypoint),
AuthorizationPolicy, PeerAuthentication; ServiceAccount and HTTPRoute are accepted and
publish nothing; other kinds are ignored with a warning.  Parsing is per object
(``k8s_parse``), combination per producer (``k8s_build``) over indexes (``k8s_world``).

Invariants: never raises on any input; a malformed object yields one error naming
kind/namespace/name and the field, and the rest still translate; a malformed *new version*
of an object leaves its last good version in force (outputs unchanged); every resource
returned passes ``model.from_proto``; output is deterministic; applying changes one batch at
a time gives the same resources as translating the final set at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ambient.config._common import load_yaml_documents
from ambient.config.k8s_build import build
from ambient.config.k8s_parse import (
    KINDS,
    L7_ONLY_KINDS,
    Settings,
    describe,
    key_of,
    normalise,
    parse,
)
from ambient.config.k8s_world import World
from ambient.model import from_proto

__all__ = [
    "Delta", "Problems", "Settings", "TranslationResult", "Translator", "translate_manifests",
]  # fmt: skip


@dataclass
class TranslationResult:
    resources: list[tuple[str, Any]] = field(default_factory=list)  # (key, Address|Authorization)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Delta:
    """Resources that changed in one ``Translator.apply``: new/replaced ones and removed names."""

    upserts: dict[str, Any] = field(default_factory=dict)
    removals: set[str] = field(default_factory=set)


@dataclass
class Problems:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Translator:
    """Incremental translation; single writer.  ``resources`` is the current output."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.world = World(self.settings)
        self.resources: dict[str, Any] = {}
        self._outputs: dict[str, dict[str, Any]] = {}  # producer -> its resources
        self._parse_problems: dict[str, Problems] = {}  # object key -> problems
        self._build_warnings: dict[str, list[str]] = {}  # producer -> warnings
        self._build_errors: dict[str, str] = {}
        self._ignored: set[str] = set()  # keys of objects of kinds we do not read

    def problems(self) -> dict[str, Problems]:
        """Errors and warnings by object key (only objects that have any)."""
        out: dict[str, Problems] = {}
        for key, p in self._parse_problems.items():
            out[key] = Problems(list(p.errors), list(p.warnings))
        for key, warns in self._build_warnings.items():
            out.setdefault(key, Problems()).warnings.extend(warns)
        for key, err in self._build_errors.items():
            out.setdefault(key, Problems()).errors.append(err)
        return {k: v for k, v in sorted(out.items()) if v.errors or v.warnings}

    def apply(
        self, upserts: Mapping[str, Any], deletes: Iterable[str] = (), *, resync: bool = False
    ) -> Delta:
        """Apply changed objects (by key) and deletions; ``resync``: upserts is everything."""
        deletes = set(deletes)
        if resync:
            deletes |= (set(self.world.records) | self._ignored) - set(upserts)
        affected: set[str] = set()
        for key in sorted(deletes):
            self._parse_problems.pop(key, None)
            self._ignored.discard(key)
            if key in self.world.records:
                affected |= self.world.put(key, None, present=False)
        for key, obj in upserts.items():
            affected |= self._upsert(key, obj)
        return self._rebuild(affected)

    def _upsert(self, key: str, obj: Any) -> set[str]:
        try:
            norm = normalise(obj)
        except Exception as e:
            self._refuse(key, f"{describe(obj)}: {e}")
            return set()
        if norm["kind"] in L7_ONLY_KINDS:
            self._ignored.add(key)  # the waypoint's business: nothing for ztunnel
            return set()
        if norm["kind"] not in KINDS:
            self._ignored.add(key)
            self._parse_problems[key] = Problems(
                warnings=[f"{describe(norm)}: kind {norm['kind']} is ignored"]
            )
            return set()
        try:
            rec = parse(norm, self.settings)
        except Exception as e:
            self._refuse(key, f"{describe(norm)}: {e}")
            return set()
        self._ignored.discard(key)
        warnings = list(getattr(rec, "warnings", ()))
        if warnings:
            self._parse_problems[key] = Problems(warnings=warnings)
        else:
            self._parse_problems.pop(key, None)
        return self.world.put(key, rec, present=True)

    def _refuse(self, key: str, message: str) -> None:
        if key in self.world.records:
            message += " (the last good version stays in force)"
        self._parse_problems[key] = Problems(errors=[message])

    def _rebuild(self, affected: set[str]) -> Delta:
        delta = Delta()
        for producer in sorted(affected):
            old = self._outputs.get(producer, {})
            try:
                new, warnings = build(self.world, producer)
                for msg in new.values():
                    from_proto(msg)  # what a ztunnel would reject must not be sent
            except Exception as e:
                self._build_errors[producer] = (
                    f"{producer}: cannot translate ({e}); its last resources stay in force"
                )
                continue
            self._build_errors.pop(producer, None)
            if warnings:
                self._build_warnings[producer] = warnings
            else:
                self._build_warnings.pop(producer, None)
            if new:
                self._outputs[producer] = new
            else:
                self._outputs.pop(producer, None)
            for name in old.keys() - new.keys():
                self.resources.pop(name, None)
                delta.upserts.pop(name, None)
                delta.removals.add(name)
            for name, msg in new.items():
                if old.get(name) != msg or name not in self.resources:
                    self.resources[name] = msg
                    delta.upserts[name] = msg
                    delta.removals.discard(name)
        return delta


def _objects(source: str | Iterable[Any], res: TranslationResult) -> list[Any]:
    if isinstance(source, str):
        docs, err = load_yaml_documents(source)
        if err:
            res.errors.append(f"manifests: {err}")
    else:
        docs = list(source)
    out: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out.extend(d["items"])
        elif d is not None:
            out.append(d)
    return out


def translate_manifests(
    source: str | Iterable[Any],
    *,
    cluster_id: str = "Kubernetes",
    trust_domain: str = "cluster.local",
    cluster_domain: str = "cluster.local",
    root_namespace: str = "istio-system",
) -> TranslationResult:
    """Kubernetes objects -> ``TranslationResult(resources=[(key, proto)], warnings, errors)``."""
    res = TranslationResult()
    objs: dict[str, Any] = {}
    for i, raw in enumerate(_objects(source, res)):
        try:
            key = key_of(normalise(raw))
        except Exception as e:
            res.errors.append(f"{describe(raw, i)}: {e}")
            continue
        objs[key] = raw  # a later document with the same key replaces an earlier one
    t = Translator(Settings(cluster_id, trust_domain, cluster_domain, root_namespace))
    t.apply(objs, resync=True)
    for p in t.problems().values():
        res.errors.extend(p.errors)
        res.warnings.extend(p.warnings)
    res.resources = sorted(t.resources.items(), key=lambda kv: kv[0])
    return res
