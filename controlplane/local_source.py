"""A directory (or one file) of Kubernetes manifests as the control plane's object source.

Files ``*.yaml``, ``*.yml`` and ``*.json`` directly in the directory (not its subdirectories,
like ``kubectl apply -f DIR``), each holding one or more documents (``kind: List`` is
expanded).  The source polls: a file is re-read when its mtime or size changes, and its
objects are re-parsed only when its content hash changes.

Invariants:
- The first update delivered is ``resync=True`` with every object; later ones are deltas
  (only objects that changed, and keys that are gone).
- A file that cannot be read or parsed keeps the objects it had before (an error naming the
  file and line is logged once per content); a deleted file's objects are deleted.
- If the same object (kind/namespace/name) is in two files, the file that sorts last wins
  (and a warning says so).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from controlplane.objects import Sink, Update, object_key

log = logging.getLogger("controlplane.local_source")
SUFFIXES = (".yaml", ".yml", ".json")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class _File:
    stamp: tuple[int, int] = (0, -1)
    digest: str = ""
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed_digest: str = ""  # content we already reported as broken


class ParseError(ValueError):
    pass


def parse_manifests(text: str, path: str) -> dict[str, dict[str, Any]]:
    """Objects by key from a manifests text; raises ParseError naming the file and line."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ParseError(f"{where}: {e.problem or e}") from None
    except Exception as e:  # YAMLError without a mark, or a constructor surprise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ParseError(f"{path}: {first}") from None
    out: dict[str, dict[str, Any]] = {}
    items: list[tuple[int, Any]] = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            items.extend((i, x) for x in d["items"])
        elif d is not None:
            items.append((i, d))
    for i, obj in items:
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
                raise KeyError("kind")
            if not isinstance(obj.get("metadata") or {}, dict):
                raise KeyError("metadata mapping")
            out[object_key(obj)] = obj
        except (KeyError, TypeError) as e:
            raise ParseError(
                f"{path}: document {i + 1} has no {e.args[0] if e.args else 'kind/name'} "
                "(every object needs kind and metadata.name)"
            ) from None
    return out


class LocalSource:
    """Polls ``path``; ``poll()`` returns the next Update (or None), ``run`` feeds a sink."""

    def __init__(self, path: str, sink: Sink | None = None, interval: float = 1.0) -> None:
        self.path = path
        self.sink = sink
        self.interval = interval
        self._files: dict[str, _File] = {}
        self._sent: dict[str, dict[str, Any]] | None = None  # objects as last delivered
        self._missing_logged = False

    def _paths(self) -> list[str] | None:
        if os.path.isdir(self.path):
            names = sorted(n for n in os.listdir(self.path) if n.endswith(SUFFIXES))
            return [os.path.join(self.path, n) for n in names if not n.startswith(".")]
        if os.path.isfile(self.path):
            return [self.path]
        return None

    def _refresh(self, path: str) -> None:
        f = self._files.setdefault(path, _File())
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == f.stamp:
                return
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            log.error("manifests file %s cannot be read (%s); its last objects stay", path, e)
            return
        f.stamp = stamp
        digest = hashlib.sha256(raw).hexdigest()
        if digest in (f.digest, f.failed_digest):
            return
        try:
            f.objects = parse_manifests(raw.decode("utf-8"), path)
            f.digest, f.failed_digest = digest, ""
        except (ParseError, UnicodeDecodeError) as e:
            f.failed_digest = digest
            log.error(
                "manifests file %s is not valid (%s); its previous objects stay in force "
                "until it is fixed", path, e,
            )  # fmt: skip

    def poll(self) -> Update | None:
        """Re-read what changed; the Update to deliver, or None when nothing changed."""
        paths = self._paths()
        if paths is None:
            if not self._missing_logged:
                log.error("manifests path %s does not exist; create it or fix the path", self.path)
                self._missing_logged = True
            if self._sent is None:
                self._sent = {}
                return Update(resync=True)
            return None  # a vanished path is more likely a mistake than "delete everything"
        self._missing_logged = False
        for gone in set(self._files) - set(paths):
            del self._files[gone]
        for p in paths:
            self._refresh(p)
        now: dict[str, dict[str, Any]] = {}
        owner: dict[str, str] = {}
        for p in paths:
            for key, obj in self._files[p].objects.items():
                if key in owner and now[key] != obj:
                    log.warning("%s is in both %s and %s; using %s", key, owner[key], p, p)
                now[key], owner[key] = obj, p
        if self._sent is None:
            self._sent = now
            return Update(upserts=dict(now), resync=True)
        before = self._sent
        upserts = {k: o for k, o in now.items() if before.get(k) != o}
        deletes = set(before) - set(now)
        self._sent = now
        if not upserts and not deletes:
            return None
        return Update(upserts=upserts, deletes=deletes)

    async def run(self) -> None:
        """Poll forever, delivering each Update to the sink."""
        assert self.sink is not None, "LocalSource.run needs a sink"
        while True:
            update = self.poll()
            if update is not None:
                self.sink(update)
            await asyncio.sleep(self.interval)
