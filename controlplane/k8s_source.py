"""The Kubernetes object source: list/watch informers feeding the control plane's object seam.

One informer per kind, each a worker thread running the blocking ``kubernetes`` client exactly
as it would against a real cluster: a paginated list (``limit``/``continue``) gives the objects
and a resourceVersion; a watch from that resourceVersion (``allowWatchBookmarks``, a
server-side ``timeoutSeconds`` of 5-10 min) streams changes.  Responses are read raw
(``_preload_content=False``) and parsed as JSON, so objects reach the control plane as the
plain dicts the API server sent (list items get the ``kind``/``apiVersion`` the server leaves
out), never as client model objects.

Delivery (see ``controlplane.objects``): the threads post to the event loop; the loop keeps
a per-kind cache and calls the sink with :class:`Update` batches.

- The first update has ``resync=True`` and is sent once *every* kind has listed.
- Watch events become delta updates; events that arrive together are coalesced into one.
- A re-list of one kind (its watch answered 410 Gone, or its CRD appeared later) is sent as
  ``resync=True`` with the complete set of *all* kinds from the cache, so "resync means
  complete" holds without a per-kind field; ``ObjectStore.apply`` turns it into the diff.

Failures: a watch that breaks resumes from the last resourceVersion seen (an event's or a
bookmark's) after a capped, jittered exponential backoff; 410 Gone re-lists at once; a kind
the server does not serve (404, CRD not installed) counts as empty so start-up is not
blocked, and is re-listed with backoff until it appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client

from .objects import KINDS, Sink, Update, object_key

__all__ = ["KIND_APIS", "Backoff", "Gone", "KindApi", "KindStatus", "KubernetesSource"]

log = logging.getLogger(__name__)

Obj = dict[str, Any]
_PAGE_SIZE = 500
_CONNECT_TIMEOUT_S = 10.0
_LIST_READ_TIMEOUT_S = 60.0
_WATCH_GRACE_S = 30.0  # read timeout beyond the server-side watch timeout: a dead peer


@dataclass(frozen=True)
class KindApi:
    """How to list/watch one kind with the ``kubernetes`` client."""

    kind: str
    api_version: str
    plural: str
    list_fn: Callable[[kubernetes.client.ApiClient], Callable[..., Any]]


def _core(method: str) -> Callable[[kubernetes.client.ApiClient], Callable[..., Any]]:
    return lambda c: getattr(kubernetes.client.CoreV1Api(c), method)


def _discovery(method: str) -> Callable[[kubernetes.client.ApiClient], Callable[..., Any]]:
    return lambda c: getattr(kubernetes.client.DiscoveryV1Api(c), method)


def _custom(group: str, version: str, plural: str) -> Callable[
    [kubernetes.client.ApiClient], Callable[..., Any]
]:
    return lambda c: functools.partial(
        kubernetes.client.CustomObjectsApi(c).list_cluster_custom_object, group, version, plural
    )


KIND_APIS: dict[str, KindApi] = {
    k.kind: k
    for k in (
        KindApi("Namespace", "v1", "namespaces", _core("list_namespace")),
        KindApi("Pod", "v1", "pods", _core("list_pod_for_all_namespaces")),
        KindApi("Service", "v1", "services", _core("list_service_for_all_namespaces")),
        KindApi("ServiceAccount", "v1", "serviceaccounts",
                _core("list_service_account_for_all_namespaces")),
        KindApi("EndpointSlice", "discovery.k8s.io/v1", "endpointslices",
                _discovery("list_endpoint_slice_for_all_namespaces")),
        KindApi("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies",
                _custom("security.istio.io", "v1", "authorizationpolicies")),
        KindApi("PeerAuthentication", "security.istio.io/v1", "peerauthentications",
                _custom("security.istio.io", "v1", "peerauthentications")),
        KindApi("Gateway", "gateway.networking.k8s.io/v1", "gateways",
                _custom("gateway.networking.k8s.io", "v1", "gateways")),
        KindApi("HTTPRoute", "gateway.networking.k8s.io/v1", "httproutes",
                _custom("gateway.networking.k8s.io", "v1", "httproutes")),
        KindApi("GRPCRoute", "gateway.networking.k8s.io/v1", "grpcroutes",
                _custom("gateway.networking.k8s.io", "v1", "grpcroutes")),
        KindApi("ReferenceGrant", "gateway.networking.k8s.io/v1beta1", "referencegrants",
                _custom("gateway.networking.k8s.io", "v1beta1", "referencegrants")),
        KindApi("HTTPTrafficPolicy", "ambient.io/v1alpha1", "httptrafficpolicies",
                _custom("ambient.io", "v1alpha1", "httptrafficpolicies")),
    )
}


class Gone(Exception):
    """The API server compacted the resourceVersion we asked for (410): re-list."""


class WatchError(Exception):
    """A watch ended with an ERROR event other than 410, or a malformed line."""


# -- pure parts ---------------------------------------------------------------------------


class Backoff:
    """Capped exponential backoff with jitter: attempt n waits base*2^n scaled by [0.5, 1)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return delay * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self.attempt = 0


def with_type(obj: Obj, api: KindApi) -> Obj:
    """The object with ``kind``/``apiVersion`` filled in (list items come without them)."""
    if obj.get("kind") and obj.get("apiVersion"):
        return obj
    return {"kind": api.kind, "apiVersion": api.api_version, **obj}


def parse_watch_line(line: bytes, api: KindApi) -> tuple[str, Obj, str | None]:
    """One watch line -> (type, object, resourceVersion); raises Gone / WatchError."""
    try:
        event = json.loads(line)
        type_, obj = str(event["type"]), event["object"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WatchError(f"malformed watch event for {api.plural}: {line[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise WatchError(f"watch event for {api.plural} has no object: {line[:200]!r}")
    if type_ == "ERROR":
        if obj.get("code") == 410:
            raise Gone(str(obj.get("message") or "resourceVersion too old"))
        raise WatchError(f"watch on {api.plural} failed: {obj.get('code')} "
                         f"{obj.get('reason')}: {obj.get('message')}")
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    if type_ == "BOOKMARK":
        return type_, obj, str(rv) if rv else None
    if type_ not in ("ADDED", "MODIFIED", "DELETED"):
        raise WatchError(f"unknown watch event type {type_!r} for {api.plural}")
    return type_, with_type(obj, api), str(rv) if rv else None


def _lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        *lines, buf = (buf + chunk).split(b"\n")  # linear in the chunk, however many lines
        yield from (line for line in lines if line.strip())
    if buf.strip():
        yield buf


def _describe(exc: BaseException, api: KindApi) -> str:
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return (f"{status} {getattr(exc, 'reason', '')}: the control plane may not list/watch "
                f"{api.plural}; check its ClusterRole (get/list/watch on {api.plural})")
    if isinstance(status, int):
        return f"{status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


# -- status and messages ------------------------------------------------------------------


@dataclass
class KindStatus:
    """Per-kind counters, for tests and the admin page (written by the worker thread)."""

    resource_version: str | None = None
    lists: int = 0
    watches: int = 0
    relists: int = 0
    bookmarks: int = 0
    errors: int = 0
    last_error: str | None = None
    delays: list[float] = field(default_factory=list)  # backoff waits taken, in order
    served: bool = True


@dataclass
class _Listed:
    kind: str
    objects: dict[str, Obj]


@dataclass
class _Event:
    kind: str
    type: str
    obj: Obj


# -- the source -----------------------------------------------------------------------------


class KubernetesSource:
    """List/watch ``kinds`` through ``api_client`` and deliver :class:`Update` batches."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        kinds: tuple[str, ...] = KINDS,
        *,
        page_size: int = _PAGE_SIZE,
        watch_timeout_s: tuple[int, int] = (300, 600),
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        unknown = [k for k in kinds if k not in KIND_APIS]
        if unknown:
            raise ValueError(f"no list/watch API known for kinds {unknown}; "
                             f"known: {sorted(KIND_APIS)}")
        self._client = api_client
        self._apis = [KIND_APIS[k] for k in kinds]
        self._page_size = page_size
        self._watch_timeout = watch_timeout_s
        self._backoff = backoff
        self.status: dict[str, KindStatus] = {k: KindStatus() for k in kinds}
        self._cache: dict[str, dict[str, Obj]] = {}
        self._synced = asyncio.Event()
        self._stop = threading.Event()
        self._responses: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []

    @property
    def synced(self) -> bool:
        """True once the first complete (resync) update has been delivered."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    # -- event-loop side ----------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        """Run the informers until cancelled, calling ``sink`` on this event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Listed | _Event] = asyncio.Queue()

        def post(msg: _Listed | _Event) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed while a thread was posting
                loop.call_soon_threadsafe(queue.put_nowait, msg)

        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._worker, args=(api, post), daemon=True,
                             name=f"k8s-informer-{api.plural}")
            for api in self._apis
        ]
        for t in self._threads:
            t.start()
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                update = self._apply(batch)
                if update is not None:
                    sink(update)
        finally:
            await self._shutdown()

    def _apply(self, batch: list[_Listed | _Event]) -> Update | None:
        """Fold a batch of thread messages into the cache; the update to deliver, if any."""
        was_synced = self.synced
        relisted = False
        upserts: dict[str, Obj] = {}
        deletes: set[str] = set()
        for msg in batch:
            if isinstance(msg, _Listed):
                relisted = relisted or msg.kind in self._cache
                self._cache[msg.kind] = msg.objects
                continue
            cache = self._cache.setdefault(msg.kind, {})
            try:
                key = object_key(msg.obj)
            except KeyError:
                log.warning("ignoring a %s watch event with no metadata.name", msg.kind)
                continue
            if msg.type == "DELETED":
                cache.pop(key, None)
                upserts.pop(key, None)
                deletes.add(key)
            else:
                cache[key] = msg.obj
                deletes.discard(key)
                upserts[key] = msg.obj
        if not was_synced:
            if len(self._cache) < len(self._apis):
                return None  # the first update waits for every kind's list
            self._synced.set()
            log.info("kubernetes source synced: %d objects of %d kinds",
                     sum(len(c) for c in self._cache.values()), len(self._cache))
            return Update(upserts=self._everything(), resync=True)
        if relisted:
            return Update(upserts=self._everything(), resync=True)
        if upserts or deletes:
            return Update(upserts=upserts, deletes=deletes)
        return None

    def _everything(self) -> dict[str, Obj]:
        return {k: o for objs in self._cache.values() for k, o in objs.items()}

    async def _shutdown(self) -> None:
        self._stop.set()
        for resp in list(self._responses.values()):
            with contextlib.suppress(Exception):
                resp.shutdown()  # unblocks a thread waiting in a watch read
        threads, self._threads = self._threads, []

        def join() -> None:
            for t in threads:
                t.join(timeout=10)
                if t.is_alive():  # stuck in a request the server never answers; a daemon
                    log.warning("informer thread %s did not stop within 10s", t.name)

        await asyncio.get_running_loop().run_in_executor(None, join)

    # -- worker threads (blocking client calls) -----------------------------------------

    def _worker(self, api: KindApi, post: Callable[[_Listed | _Event], None]) -> None:
        status = self.status[api.kind]
        backoff = self._backoff()
        fn = api.list_fn(self._client)
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    objects, rv = self._list(api, fn, status)
                    post(_Listed(api.kind, objects))
                    backoff.reset()
                rv = self._watch(api, fn, rv, status, post, backoff)
                continue  # clean end (server timeout): watch again at once
            except Gone as exc:
                if self._stop.is_set():
                    return
                log.info("watch on %s expired (%s); re-listing", api.plural, exc)
                status.relists += 1
                rv = None
                continue
            except Exception as exc:  # every failure: log, back off, retry
                if self._stop.is_set():
                    return
                if rv is not None:  # resume from the last event or bookmark seen
                    rv = status.resource_version or rv
                status.errors += 1
                status.last_error = _describe(exc, api)
                if getattr(exc, "status", None) == 404 and rv is None:
                    if status.served:
                        log.warning("the API server does not serve %s (%s); treating it as "
                                    "empty (is its CRD installed?)", api.plural, api.api_version)
                        status.served = False
                        post(_Listed(api.kind, {}))
            delay = backoff.next()
            status.delays.append(delay)
            log.warning("kubernetes %s %s failed: %s; retrying in %.3gs", api.plural,
                        "list" if rv is None else "watch", status.last_error, delay)
            self._stop.wait(delay)

    def _list(self, api: KindApi, fn: Callable[..., Any],
              status: KindStatus) -> tuple[dict[str, Obj], str]:
        objects: dict[str, Obj] = {}
        cont: str | None = None
        rv = ""
        for _page in range(1_000_000):  # bounded by the server's continue tokens
            kwargs: dict[str, Any] = {"limit": self._page_size}
            if cont:
                kwargs["_continue"] = cont
            resp = fn(_preload_content=False,
                      _request_timeout=(_CONNECT_TIMEOUT_S, _LIST_READ_TIMEOUT_S), **kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            meta = body.get("metadata") or {}
            rv = rv or str(meta.get("resourceVersion") or "")
            for item in body.get("items") or []:
                obj = with_type(item, api)
                objects[object_key(obj)] = obj
            cont = meta.get("continue") or None
            if not cont:
                break
        if not rv:
            raise WatchError(f"the {api.plural} list carried no metadata.resourceVersion")
        status.lists += 1
        status.served = True
        status.resource_version = rv
        return objects, rv

    def _watch(self, api: KindApi, fn: Callable[..., Any], rv: str, status: KindStatus,
               post: Callable[[_Listed | _Event], None], backoff: Backoff) -> str:
        """One watch request from ``rv``; returns the last resourceVersion seen on a clean end."""
        timeout = random.randint(*self._watch_timeout)
        resp = fn(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                  timeout_seconds=timeout, _preload_content=False,
                  _request_timeout=(_CONNECT_TIMEOUT_S, timeout + _WATCH_GRACE_S))
        status.watches += 1
        self._responses[api.kind] = resp
        complete = False
        try:
            if self._stop.is_set():
                return rv
            for line in _lines(resp):
                type_, obj, new_rv = parse_watch_line(line, api)
                if new_rv:
                    rv = status.resource_version = new_rv
                backoff.reset()  # the connection works
                if type_ == "BOOKMARK":
                    status.bookmarks += 1
                    continue
                post(_Event(api.kind, type_, obj))
            complete = True
            return rv
        finally:
            self._responses.pop(api.kind, None)
            with contextlib.suppress(Exception):
                if not complete:
                    # A stream left mid-way (410, a bad line, shutdown) must not go back to
                    # the pool: the next request on it would wait behind the old stream.
                    resp.close()
                resp.release_conn()
