"""File-backed mesh configuration of a local ztunnel.

Mesh configuration: ztunnel's local YAML (``LOCAL_XDS_PATH`` / ``LOCAL_XDS``) or a file
  of Kubernetes manifests (``LOCAL_MANIFESTS_PATH``), translated into the same protobuf
  resources the control plane would push, then applied to the store as one batch.  The file
  is polled for changes; a bad entry is rejected on its own (its last good version stays,
  and removals wait until the file is clean), and a file that cannot be read or parsed at
  all leaves the last good configuration in force.  (Pods come from the CNI node agent
  over ZDS: ``ztunnel/inpod.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from ambient.config._common import load_yaml_documents
from ambient.config.local import parse_local_config
from ambient.config.manifests import translate_manifests
from ambient.store import MeshStore
from ztunnel.config import Settings

log = logging.getLogger("ztunnel.config")
POLL_INTERVAL = 1.0


Stamp = tuple[float, int]  # (mtime, size): a file is re-read only when this changes


def read_if_changed(path: str, stamp: Stamp | None) -> tuple[Stamp, str] | None:
    """The file's new stamp and text, or None if it is unchanged since ``stamp``."""
    st = os.stat(path)
    new = (st.st_mtime, st.st_size)
    if new == stamp:
        return None
    with open(path, encoding="utf-8") as f:
        return new, f.read()


@dataclass
class LoadReport:
    applied: int
    rejected: list[str]
    warnings: list[str]


ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


def _object_key(obj: Any) -> ObjectKey | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    meta = obj["metadata"]
    return (str(obj.get("kind")), str(meta.get("namespace", "")), str(meta.get("name", "")))


def keep_last_good(
    objects: list[Any], last_good: dict[ObjectKey, Any], settings: Settings
) -> tuple[list[Any], list[str]]:
    """Replace each object that does not translate on its own by its last good version.

    Translation is holistic (a policy's selector changes which workloads list it), so a
    rejected object is swapped for its last good manifest *before* translating the whole
    set; its effects on other objects stay exactly as they were.  ``last_good`` is updated.
    """
    out, errors = [], []
    for obj in objects:
        key = _object_key(obj)
        alone = _translate([obj], settings)
        if not alone.errors:
            if key is not None:
                last_good[key] = obj
            out.append(obj)
            continue
        errors.extend(alone.errors)
        if key is not None and key in last_good:
            out.append(last_good[key])
    seen = {_object_key(o) for o in objects}
    for key in [k for k in last_good if k not in seen]:
        del last_good[key]  # deleted from the file: forget it
    return out, errors


def _translate(objects: list[Any], settings: Settings) -> Any:
    return translate_manifests(
        objects, cluster_id=settings.cluster_id, trust_domain=settings.trust_domain,
        cluster_domain=settings.cluster_domain, root_namespace=settings.root_namespace,
    )


def load_config_text(
    text: str,
    settings: Settings,
    store: MeshStore,
    *,
    manifests: bool,
    last_good: dict[ObjectKey, Any] | None = None,
) -> LoadReport:
    """Parse one configuration text and make the store hold exactly what it describes."""
    if manifests:
        docs, err = load_yaml_documents(text)
        if err is not None:
            raise ValueError(err)
        docs = [d for d in docs if d is not None]
        docs, pre_errors = keep_last_good(docs, {} if last_good is None else last_good, settings)
        tr = _translate(docs, settings)
        resources, errors, warnings = tr.resources, pre_errors + tr.errors, tr.warnings
    else:
        pr = parse_local_config(text)
        resources, errors, warnings = pr.resources, pr.errors, []
    if not resources and errors:
        # Nothing usable at all (for example a YAML syntax error): keep the last good config.
        raise ValueError("; ".join(errors))
    upserts = [r for _, r in resources]
    # A rejected entry of the local format is absent from ``resources``; removing what is
    # absent would drop its last good version.  So while it has errors, nothing is removed.
    if errors and not manifests:
        rejections = store.apply(upserts)
    else:
        rejections = store.replace_all(upserts)
    rejected = errors + [f"{r.key}: {r.message}" for r in rejections]
    for msg in rejected:
        log.error("config entry rejected (the last good version stays in force): %s", msg)
    for msg in warnings:
        log.warning("%s", msg)
    return LoadReport(len(resources) - len(rejections), rejected, warnings)


class ConfigWatcher:
    """Loads the configured source now and again whenever the file changes."""

    def __init__(self, settings: Settings, store: MeshStore) -> None:
        self.settings = settings
        self.store = store
        self.path = settings.local_xds_path or settings.local_manifests_path
        self._stamp: Stamp | None = None
        self.last_error: str | None = None
        self._last_good: dict[ObjectKey, Any] = {}

    def load_once(self) -> LoadReport | None:
        s = self.settings
        if s.local_xds is not None:
            if self._stamp is not None:
                return None
            self._stamp = (0.0, 0)
            return load_config_text(s.local_xds, s, self.store, manifests=False)
        if self.path is None:
            return None
        try:
            changed = read_if_changed(self.path, self._stamp)
        except OSError as e:
            self._fail(f"cannot read {self.path}: {e.strerror}")
            return None
        if changed is None:
            return None
        self._stamp, text = changed
        try:
            report = load_config_text(
                text, s, self.store, manifests=s.local_manifests_path is not None,
                last_good=self._last_good,
            )
        except ValueError as e:
            self._fail(f"{self.path}: {e}")
            return None
        self.last_error = None
        log.info("loaded %s: %d resources, %d rejected", self.path, report.applied,
                 len(report.rejected))
        return report

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("configuration not loaded, keeping the last good one: %s", message)
        self.last_error = message

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self.load_once()
