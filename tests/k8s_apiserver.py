"""An in-process Kubernetes API server for tests: the REST list/watch contract without etcd.

No real kube-apiserver can run on the project's machines (platform notes, "Kubernetes"), so
components that talk to Kubernetes are tested with the real ``kubernetes`` Python client
against this server.  It honours the parts of the contract those components rely on:

- one global ``resourceVersion`` counter (like etcd's revision); every write bumps it and the
  object carries it in ``metadata.resourceVersion``;
- list (``GET`` on a collection, cluster-wide or per namespace) answers ``<Kind>List`` with
  ``metadata.resourceVersion``; ``limit``/``continue`` paging serves a consistent snapshot
  (the continue token pins the list's resourceVersion); built-in kinds' items omit
  ``kind``/``apiVersion`` (as the real server does), custom resources' items keep them;
- watch (``?watch=true&resourceVersion=N``) streams JSON lines ``{"type", "object"}`` over
  HTTP/1.1 chunked encoding: every change after N, ``BOOKMARK`` events on request
  (:meth:`FakeApiServer.bookmark`) when ``allowWatchBookmarks=true``, and ends cleanly at
  ``timeoutSeconds``; without a resourceVersion (or "0") it first replays the current objects
  as ``ADDED``;
- a compaction window: only the last ``window`` changes are kept; a watch (or continue token)
  older than that gets ``ERROR`` with a ``Status`` 410 / reason ``Expired``;
- create (``POST``), replace (``PUT``, with optimistic concurrency: 409 on a stale
  resourceVersion), patch (``PATCH``: JSON merge, strategic merge treated as merge, JSON
  patch), delete; ``labelSelector`` and simple ``fieldSelector`` equality filters;
- ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answering from tokens registered with
  :meth:`FakeApiServer.add_token`.

Test hooks: direct ``create``/``update``/``patch``/``delete`` methods, ``compact()``,
``bookmark()``, ``drop_watches()`` (abrupt close, as when a load balancer cuts a
connection), ``end_watches()`` (clean end, as at a server-side timeout), ``fail_requests``
(answer the next N list/watch requests with 500), and a request log.  Serves only
127.0.0.1 on a random port, with no authentication.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client

Obj = dict[str, Any]

_MAX_WATCH_SECONDS = 1800.0
_WAIT_SLICE = 0.5  # watch threads re-check closing/drop flags at least this often


@dataclass(frozen=True)
class Resource:
    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    builtin: bool = True  # built-in lists omit kind/apiVersion on their items

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: tuple[Resource, ...] = (
    Resource("Namespace", "", "v1", "namespaces", namespaced=False),
    Resource("Node", "", "v1", "nodes", namespaced=False),
    Resource("Pod", "", "v1", "pods"),
    Resource("Service", "", "v1", "services"),
    Resource("ServiceAccount", "", "v1", "serviceaccounts"),
    Resource("ConfigMap", "", "v1", "configmaps"),
    Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    Resource("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies",
             builtin=False),
    Resource("PeerAuthentication", "security.istio.io", "v1", "peerauthentications",
             builtin=False),
    Resource("Gateway", "gateway.networking.k8s.io", "v1", "gateways", builtin=False),
    Resource("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", builtin=False),
    Resource("GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes", builtin=False),
    Resource("ReferenceGrant", "gateway.networking.k8s.io", "v1beta1", "referencegrants",
             builtin=False),
    Resource("HTTPTrafficPolicy", "ambient.io", "v1alpha1", "httptrafficpolicies",
             builtin=False),
    # what `ambientctl install` applies (tests/integration/test_install_apply.py)
    Resource("Secret", "", "v1", "secrets"),
    Resource("Deployment", "apps", "v1", "deployments"),
    Resource("DaemonSet", "apps", "v1", "daemonsets"),
    Resource("ClusterRole", "rbac.authorization.k8s.io", "v1", "clusterroles",
             namespaced=False),
    Resource("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings",
             namespaced=False),
    Resource("Role", "rbac.authorization.k8s.io", "v1", "roles"),
    Resource("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings"),
    Resource("CustomResourceDefinition", "apiextensions.k8s.io", "v1",
             "customresourcedefinitions", namespaced=False),
    Resource("GatewayClass", "gateway.networking.k8s.io", "v1", "gatewayclasses",
             namespaced=False, builtin=False),
)
_BY_KIND = {r.kind: r for r in RESOURCES}
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


class ApiError(Exception):
    """Answered to the client as a ``Status`` object with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass
class _Event:
    rv: int
    kind: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    prev: Obj | None


@dataclass
class _Token:
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]
    audiences: list[str]


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _Route:
    resource: Resource | None
    namespace: str | None
    name: str | None
    special: str | None = None  # "tokenreviews"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


# -- patches and selectors (pure) ---------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` deletes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 JSON patch: add, replace, remove, test (maps and list indices)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(str(op.get("path", "")))
        if not parts:
            raise ApiError(422, "Invalid", "JSON patch on the whole object is not supported")
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        kind = op.get("op")
        try:
            if kind == "test":
                cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if cur != op.get("value"):
                    raise ApiError(422, "Invalid", f"JSON patch test failed at {op['path']}")
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind in ("add", "replace"):
                if isinstance(parent, list):
                    idx = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(idx, op["value"])
                    else:
                        parent[idx] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            else:
                raise ApiError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError) as exc:
            raise ApiError(422, "Invalid", f"JSON patch {op}: {exc!r}") from exc
    return doc


def _field(obj: Obj, path: str) -> str:
    cur: Any = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def matches_selectors(obj: Obj, label_selector: str, field_selector: str) -> bool:
    """Equality-based label and field selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in label_selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    for term in filter(None, (t.strip() for t in field_selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if _field(obj, k.strip()) == v.strip():
                return False
        else:
            k, v = term.replace("==", "=").split("=", 1)
            if _field(obj, k.strip()) != v.strip():
                return False
    return True


def parse_path(path: str) -> _Route:
    """Map a REST path to (resource, namespace, name); raises ApiError 404 when unknown."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    if (group, version, rest) == ("authentication.k8s.io", "v1", ["tokenreviews"]):
        return _Route(None, None, None, special="tokenreviews")
    ns: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    if len(rest) > 2:
        raise ApiError(404, "NotFound", f"subresource {'/'.join(rest[2:])} is not served here")
    res = _BY_PATH.get((group, version, rest[0]))
    if res is None:
        raise ApiError(404, "NotFound", f"the server doesn't have a resource type {rest[0]!r} "
                       f"in {group or 'core'}/{version}")
    if ns is not None and not res.namespaced:
        raise ApiError(404, "NotFound", f"{res.kind} is cluster-scoped")
    return _Route(res, ns, rest[1] if len(rest) == 2 else None)


# -- the server ---------------------------------------------------------------------------


@dataclass
class _Watch:
    resource: Resource
    namespace: str | None
    label_selector: str
    field_selector: str
    bookmarks: bool
    cursor: int
    bookmark_gen: int
    drop_gen: int
    end_gen: int
    expire_gen: int


@dataclass
class _State:
    rv: int = 1
    objects: dict[str, dict[tuple[str, str], Obj]] = field(default_factory=dict)
    log: list[_Event] = field(default_factory=list)
    compacted: int = 0  # events with rv <= compacted are gone
    bookmark_gen: int = 0
    drop_gen: int = 0
    end_gen: int = 0
    expire_gen: int = 0
    watches_paused: bool = False
    hidden: set[str] = field(default_factory=set)
    open_watches: dict[str, int] = field(default_factory=dict)  # by kind
    closing: bool = False


class FakeApiServer:
    """A threaded HTTP server speaking enough of the Kubernetes REST API for our clients."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self._state = _State(objects={r.kind: {} for r in RESOURCES})
        self._cond = threading.Condition()
        self._tokens: dict[str, _Token] = {}
        self._fail_next = 0
        self.requests: list[_Request] = []
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-apiserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._state.closing = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api_client(self) -> kubernetes.client.ApiClient:
        """A real ``kubernetes`` client configured for this server (plain HTTP, no auth)."""
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        return kubernetes.client.ApiClient(cfg)

    # -- test hooks ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._state.rv

    def compact(self) -> None:
        """Forget every change so far: any watch or continue token older than now gets 410."""
        with self._cond:
            self._state.log.clear()
            self._state.compacted = self._state.rv
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK (at the current resourceVersion) on every watch that asked for them."""
        with self._cond:
            self._state.bookmark_gen += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection without ending the HTTP response."""
        with self._cond:
            self._state.drop_gen += 1
            self._cond.notify_all()

    def end_watches(self) -> None:
        """End every open watch cleanly (like the server-side watch timeout)."""
        with self._cond:
            self._state.end_gen += 1
            self._cond.notify_all()

    def expire_watches(self) -> None:
        """Answer every open watch with ERROR 410 Expired (as when the watch cache resets)."""
        with self._cond:
            self._state.expire_gen += 1
            self._cond.notify_all()

    def pause_watches(self) -> None:
        """Hold new watch requests before they start (a stalled path to the server)."""
        with self._cond:
            self._state.watches_paused = True

    def resume_watches(self) -> None:
        with self._cond:
            self._state.watches_paused = False
            self._cond.notify_all()

    def hide_kind(self, kind: str, hidden: bool = True) -> None:
        """Answer 404 for ``kind`` (its CRD is not installed) until called with False."""
        with self._cond:
            (self._state.hidden.add if hidden else self._state.hidden.discard)(kind)

    def fail_requests(self, count: int) -> None:
        """Answer the next ``count`` list/watch requests with 500 InternalError."""
        with self._cond:
            self._fail_next = count

    def open_watches(self, kind: str) -> int:
        """How many watches on ``kind`` are streaming right now."""
        with self._cond:
            return self._state.open_watches.get(kind, 0)

    def watch_requests(self, plural: str | None = None) -> list[_Request]:
        with self._cond:
            return [r for r in self.requests if r.query.get("watch") in ("true", "1")
                    and (plural is None or r.path.endswith("/" + plural))]

    def list_requests(self, plural: str | None = None) -> list[_Request]:
        with self._cond:
            return [r for r in self.requests if r.method == "GET"
                    and r.query.get("watch") not in ("true", "1")
                    and (plural is None or r.path.endswith("/" + plural))]

    def add_token(
        self, token: str, username: str, uid: str = "", extra: dict[str, list[str]] | None = None,
        *, groups: list[str] | None = None, audiences: list[str] | None = None,
    ) -> None:
        """Register a bearer token that TokenReview will accept for ``audiences``."""
        self._tokens[token] = _Token(username, uid or str(uuid.uuid4()), groups or [],
                                     extra or {}, audiences or ["istio-ca"])

    # -- object operations (used by the HTTP handler and directly by tests) ------------

    def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        res = self._resource_of(obj)
        with self._cond:
            return self._create(res, copy.deepcopy(obj), namespace)

    def update(self, obj: Obj) -> Obj:
        res = self._resource_of(obj)
        ns, name = _key(obj)
        with self._cond:
            return self._update(res, ns if res.namespaced else "", name, copy.deepcopy(obj))

    def patch(self, kind: str, name: str, patch: Any, namespace: str | None = None,
              content_type: str = "application/merge-patch+json") -> Obj:
        res = _BY_KIND[kind]
        with self._cond:
            return self._patch(res, self._ns(res, namespace), name, patch, content_type)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        res = _BY_KIND[kind]
        with self._cond:
            return self._delete(res, self._ns(res, namespace), name)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        res = _BY_KIND[kind]
        with self._cond:
            obj = self._state.objects[kind].get((self._ns(res, namespace), name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str) -> list[Obj]:
        with self._cond:
            return [copy.deepcopy(o) for o in self._state.objects[kind].values()]

    # -- internals (call with the lock held) ------------------------------------------

    @staticmethod
    def _resource_of(obj: Obj) -> Resource:
        res = _BY_KIND.get(str(obj.get("kind")))
        if res is None:
            raise ApiError(400, "BadRequest", f"kind {obj.get('kind')!r} is not served here")
        return res

    @staticmethod
    def _ns(res: Resource, namespace: str | None) -> str:
        return (namespace or "default") if res.namespaced else ""

    def _record(self, res: Resource, type_: str, obj: Obj, prev: Obj | None) -> None:
        st = self._state
        st.log.append(_Event(st.rv, res.kind, type_, copy.deepcopy(obj), prev))
        while len(st.log) > self.window:
            st.compacted = st.log.pop(0).rv
        self._cond.notify_all()

    def _bump(self, obj: Obj) -> None:
        self._state.rv += 1
        obj["metadata"]["resourceVersion"] = str(self._state.rv)

    def _create(self, res: Resource, obj: Obj, namespace: str | None) -> Obj:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{res.kind}: metadata.name is required")
        if res.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match "
                               "the namespace in the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = _key(obj)
        if key in self._state.objects[res.kind]:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        self._bump(obj)
        self._state.objects[res.kind][key] = obj
        self._record(res, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def _existing(self, res: Resource, ns: str, name: str) -> Obj:
        cur = self._state.objects[res.kind].get((ns, name))
        if cur is None:
            raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
        return cur

    def _replace(self, res: Resource, cur: Obj, new: Obj) -> Obj:
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        meta = new.setdefault("metadata", {})
        for k in ("name", "namespace", "uid", "creationTimestamp"):
            if k in cur["metadata"]:
                meta[k] = cur["metadata"][k]
        self._bump(new)
        self._state.objects[res.kind][_key(new)] = new
        self._record(res, "MODIFIED", new, cur)
        return copy.deepcopy(new)

    def _update(self, res: Resource, ns: str, name: str, obj: Obj) -> Obj:
        cur = self._existing(res, ns, name)
        want = (obj.get("metadata") or {}).get("resourceVersion")
        if want and want != cur["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} '
                           f'"{name}": the object has been modified; please apply your changes '
                           "to the latest version and try again")
        return self._replace(res, cur, obj)

    def _patch(self, res: Resource, ns: str, name: str, patch: Any, content_type: str) -> Obj:
        cur = self._existing(res, ns, name)
        ctype = content_type.split(";")[0].strip()
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
            new = json_patch(cur, patch)
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            new = merge_patch(cur, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"patch type {ctype!r} not supported")
        want = (new.get("metadata") or {}).get("resourceVersion")
        if want and want != cur["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'{res.plural} "{name}": stale resourceVersion')
        return self._replace(res, cur, new)

    def _delete(self, res: Resource, ns: str, name: str) -> Obj:
        cur = self._existing(res, ns, name)
        del self._state.objects[res.kind][(ns, name)]
        gone = copy.deepcopy(cur)
        self._bump(gone)
        self._record(res, "DELETED", gone, cur)
        return gone

    def _snapshot(self, res: Resource, at: int) -> dict[tuple[str, str], Obj]:
        """The objects of ``res`` as they were at resourceVersion ``at`` (undoing the log)."""
        if at < self._state.compacted:
            raise ApiError(410, "Expired", f"continue token too old: resourceVersion {at} has "
                           "been compacted; restart the list without continue")
        objs = dict(self._state.objects[res.kind])
        for ev in reversed(self._state.log):
            if ev.rv <= at:
                break
            if ev.kind != res.kind:
                continue
            key = _key(ev.obj)
            if ev.type == "ADDED":
                objs.pop(key, None)
            elif ev.prev is not None:
                objs[key] = ev.prev
        return objs

    def _list(self, res: Resource, ns: str | None, q: dict[str, str]) -> Obj:
        limit = int(q.get("limit") or 0)
        start = ""
        at = self._state.rv
        if q.get("continue"):
            try:
                tok = json.loads(base64.urlsafe_b64decode(q["continue"]))
                at, start = int(tok["rv"]), str(tok["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ApiError(400, "BadRequest", f"invalid continue token: {exc}") from exc
        objs = self._snapshot(res, at) if at != self._state.rv else self._state.objects[res.kind]
        keys = sorted(k for k in objs if (ns is None or k[0] == ns) and "/".join(k) > start
                      and matches_selectors(objs[k], q.get("labelSelector", ""),
                                            q.get("fieldSelector", "")))
        meta: Obj = {"resourceVersion": str(at)}
        if limit and len(keys) > limit:
            keys = keys[:limit]
            token = {"rv": at, "start": "/".join(keys[-1])}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
        items = []
        for k in keys:
            item = copy.deepcopy(objs[k])
            if res.builtin:
                item.pop("kind", None)
                item.pop("apiVersion", None)
            items.append(item)
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
                "items": items}

    def _token_review(self, body: Obj) -> Obj:
        spec = body.get("spec") or {}
        tok = self._tokens.get(str(spec.get("token") or ""))
        wanted = list(spec.get("audiences") or [])
        status: Obj
        if tok is None:
            status = {"authenticated": False, "error": "token not recognized"}
        elif wanted and not set(wanted) & set(tok.audiences):
            status = {"authenticated": False,
                      "error": f"token audiences {tok.audiences} do not include {wanted}"}
        else:
            status = {"authenticated": True,
                      "user": {"username": tok.username, "uid": tok.uid,
                               "groups": tok.groups, "extra": tok.extra},
                      "audiences": [a for a in wanted if a in tok.audiences] or tok.audiences}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    # -- watch --------------------------------------------------------------------------

    def _open_watch(
        self, res: Resource, ns: str | None, q: dict[str, str]
    ) -> tuple[_Watch, list[Obj]]:
        """Register a watch; returns it with the events to send first (initial ADDED or 410)."""
        st = self._state
        first: list[Obj] = []
        rv_param = q.get("resourceVersion", "")
        w = _Watch(res, ns, q.get("labelSelector", ""), q.get("fieldSelector", ""),
                   q.get("allowWatchBookmarks") in ("true", "1"), st.rv, st.bookmark_gen,
                   st.drop_gen, st.end_gen, st.expire_gen)
        if rv_param in ("", "0"):
            for key in sorted(st.objects[res.kind]):
                obj = st.objects[res.kind][key]
                if self._wants(w, obj):
                    first.append({"type": "ADDED", "object": copy.deepcopy(obj)})
            return w, first
        try:
            w.cursor = int(rv_param)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None
        return w, first

    def _wants(self, w: _Watch, obj: Obj) -> bool:
        ns = (obj.get("metadata") or {}).get("namespace") or ""
        return (w.namespace is None or ns == w.namespace) and matches_selectors(
            obj, w.label_selector, w.field_selector)

    def _next_events(self, w: _Watch, deadline: float) -> tuple[str, list[Obj]]:
        """Block until something is due for ``w``: ("events"|"end"|"drop", events)."""
        st = self._state
        with self._cond:
            while True:
                if st.closing or st.drop_gen != w.drop_gen:
                    return "drop", []
                if w.cursor < st.compacted or st.expire_gen != w.expire_gen:
                    err = ApiError(410, "Expired", f"too old resource version: {w.cursor} "
                                   f"({st.compacted + 1})")
                    return "end", [{"type": "ERROR", "object": err.status()}]
                out = [{"type": ev.type, "object": copy.deepcopy(ev.obj)} for ev in st.log
                       if ev.rv > w.cursor and ev.kind == w.resource.kind
                       and self._wants(w, ev.obj)]
                w.cursor = max(w.cursor, st.rv)
                if w.bookmarks and st.bookmark_gen != w.bookmark_gen:
                    w.bookmark_gen = st.bookmark_gen
                    out.append({"type": "BOOKMARK", "object": {
                        "kind": w.resource.kind, "apiVersion": w.resource.api_version,
                        "metadata": {"resourceVersion": str(w.cursor)}}})
                if st.end_gen != w.end_gen:  # pending events first, then the clean end
                    return "end", out
                if out:
                    return "events", out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "end", []
                self._cond.wait(min(remaining, _WAIT_SLICE))

    def _take_failure(self) -> bool:
        with self._cond:
            if self._fail_next > 0:
                self._fail_next -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # -- plumbing -----------------------------------------------------------------------

    def _query(self) -> tuple[str, dict[str, str]]:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with self.api._cond:
            self.api.requests.append(_Request(self.command, url.path, q))
        return url.path, q

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"request body is not JSON: {exc}") from exc

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, fn: Any) -> None:
        try:
            fn()
        except ApiError as e:
            self._send(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- verbs --------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch(self._put)

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch(self._patch)

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch(self._delete)

    def _route(self) -> tuple[_Route, dict[str, str]]:
        path, q = self._query()
        return parse_path(path), q

    def _get(self) -> None:
        route, q = self._route()
        api = self.api
        if route.resource is None:
            raise ApiError(405, "MethodNotAllowed", "tokenreviews only accept POST")
        res = route.resource
        with api._cond:
            if res.kind in api._state.hidden:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.name is not None:
            with api._cond:
                obj = api._existing(res, api._ns(res, route.namespace), route.name)
                self._send(200, copy.deepcopy(obj))
            return
        if api._take_failure():
            raise ApiError(500, "InternalError", "injected failure (FakeApiServer.fail_requests)")
        if q.get("watch") in ("true", "1"):
            self._watch(res, route.namespace, q)
            return
        with api._cond:
            body = api._list(res, route.namespace, q)
        self._send(200, body)

    def _post(self) -> None:
        route, _ = self._route()
        body = self._body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        if route.special == "tokenreviews":
            with self.api._cond:
                self._send(201, self.api._token_review(body))
            return
        assert route.resource is not None
        if route.name is not None:
            raise ApiError(405, "MethodNotAllowed", "POST goes to the collection, not an object")
        body.setdefault("kind", route.resource.kind)
        with self.api._cond:
            obj = self.api._create(route.resource, body, route.namespace)
        self._send(201, obj)

    def _object_route(self) -> tuple[Resource, str, str]:
        route, _ = self._route()
        if route.resource is None or route.name is None:
            raise ApiError(405, "MethodNotAllowed", "this verb needs an object path")
        res = route.resource
        return res, self.api._ns(res, route.namespace), route.name

    def _put(self) -> None:
        res, ns, name = self._object_route()
        body = self._body()
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        with self.api._cond:
            obj = self.api._update(res, ns, name, body)
        self._send(200, obj)

    def _patch(self) -> None:
        res, ns, name = self._object_route()
        body = self._body()
        ctype = self.headers.get("Content-Type") or "application/merge-patch+json"
        with self.api._cond:
            obj = self.api._patch(res, ns, name, body, ctype)
        self._send(200, obj)

    def _delete(self) -> None:
        res, ns, name = self._object_route()
        self._body()
        with self.api._cond:
            gone = self.api._delete(res, ns, name)
        self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Success", "details": {
                             "name": name, "kind": res.plural,
                             "uid": gone["metadata"].get("uid")}})

    # -- watch streaming ----------------------------------------------------------------

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, res: Resource, ns: str | None, q: dict[str, str]) -> None:
        api = self.api
        timeout = float(q.get("timeoutSeconds") or _MAX_WATCH_SECONDS)
        deadline = time.monotonic() + min(timeout, _MAX_WATCH_SECONDS)
        with api._cond:
            while api._state.watches_paused and not api._state.closing:
                api._cond.wait(_WAIT_SLICE)
            w, first = api._open_watch(res, ns, q)
            api._state.open_watches[res.kind] = api._state.open_watches.get(res.kind, 0) + 1
        try:
            self._stream(w, first, deadline)
        finally:
            with api._cond:
                api._state.open_watches[res.kind] -= 1

    def _stream(self, w: _Watch, first: list[Obj], deadline: float) -> None:
        api = self.api
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for ev in first:
            self._chunk(json.dumps(ev).encode() + b"\n")
        while True:
            what, events = api._next_events(w, deadline)
            for ev in events:
                self._chunk(json.dumps(ev).encode() + b"\n")
            if what == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if what == "end":
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return

