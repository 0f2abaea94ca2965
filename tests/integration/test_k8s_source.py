"""KubernetesSource with the real ``kubernetes`` client against the in-process API server.

Covers the informer contract: one complete first update, deltas, bookmarks, 410 Gone and
re-list, reconnects with backoff, paging, and CRDs that are not installed yet.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from k8s_apiserver import FakeApiServer

from controlplane.k8s_source import Backoff, KubernetesSource
from controlplane.objects import KINDS, ObjectStore, Update, object_key


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for a condition (bounded); the failure says which."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.store = ObjectStore()

    def __call__(self, update: Update) -> None:
        self.updates.append(copy.deepcopy(update))
        self.store.apply(update)


def fast_backoff() -> Backoff:
    return Backoff(base=0.01, cap=1.0, rng=lambda: 0.0)  # waits 0.005, 0.01, 0.02, ...


def pod(name: str, ns: str = "default", node: str = "node-1", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": "default",
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"podIP": "10.0.0.1"}}


SEED: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Namespace",
     "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}],
              "selector": {"app": "web"}}},
    {"apiVersion": "v1", "kind": "ServiceAccount",
     "metadata": {"name": "default", "namespace": "default"}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-abc", "namespace": "default",
                  "labels": {"kubernetes.io/service-name": "web"}},
     "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}],
     "ports": [{"port": 8080}]},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "allow", "namespace": "default"}, "spec": {"action": "ALLOW"}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "strict", "namespace": "istio-system"},
     "spec": {"mtls": {"mode": "STRICT"}}},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
     "metadata": {"name": "waypoint", "namespace": "default"},
     "spec": {"gatewayClassName": "istio-waypoint",
              "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
     "metadata": {"name": "web", "namespace": "default"},
     "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": ""}]}},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
     "metadata": {"name": "web-grpc", "namespace": "default"},
     "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": ""}]}},
    {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
     "metadata": {"name": "from-shop", "namespace": "default"},
     "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                        "namespace": "shop"}], "to": [{"group": "", "kind": "Service"}]}},
    {"apiVersion": "ambient.io/v1alpha1", "kind": "HTTPTrafficPolicy",
     "metadata": {"name": "web-faults", "namespace": "default"},
     "spec": {"targetRefs": [{"kind": "HTTPRoute", "name": "web"}],
              "fault": {"abort": {"httpStatus": 503, "percentage": 1}}}},
    *[pod(f"web-{i}", app="web") for i in range(5)],
]


def server_objects(server: FakeApiServer, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    return {object_key(o): o for k in kinds for o in server.objects(k)}


async def start(server: FakeApiServer, **kw: Any) -> tuple[KubernetesSource, Recorder,
                                                            asyncio.Task[None]]:
    kw.setdefault("backoff", fast_backoff)
    kinds = kw.pop("open_kinds", kw.get("kinds", KINDS))
    src = KubernetesSource(server.api_client(), **kw)
    rec = Recorder()
    task = asyncio.create_task(src.run(rec))
    await asyncio.wait_for(src.wait_synced(), 20)
    # Hooks such as bookmark() and expire_watches() act on open watches only.
    await until(lambda: all(server.open_watches(k) for k in kinds), "every watch to open")
    return src, rec, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-informer-")]


@pytest.fixture
def server() -> Any:
    with FakeApiServer() as srv:
        for obj in SEED:
            srv.create(obj)
        yield srv


def test_first_update_is_one_complete_resync_of_plain_dicts(server: FakeApiServer) -> None:
    async def main() -> None:
        src, rec, task = await start(server, page_size=2)
        try:
            first = rec.updates[0]
            assert first.resync is True
            assert first.upserts == server_objects(server)
            assert {k.split("/")[0] for k in first.upserts} == set(KINDS)
            for obj in first.upserts.values():
                assert type(obj) is dict and obj["kind"] and obj["apiVersion"]
                assert json.loads(json.dumps(obj)) == obj
            # Five pods at two per page: the list was paged with continue tokens.
            pages = server.list_requests("pods")
            assert [p.query.get("limit") for p in pages] == ["2", "2", "2"]
            assert sum(1 for p in pages if "continue" in p.query) == 2
            assert len(rec.updates) == 1
        finally:
            await stop(task)

    run(main())


def test_create_modify_delete_arrive_as_deltas(server: FakeApiServer) -> None:
    async def main() -> None:
        src, rec, task = await start(server)
        try:
            server.create(pod("new", app="new"))
            await until(lambda: "Pod/default/new" in rec.store.objects, "the new pod")
            server.patch("Pod", "new", {"metadata": {"labels": {"version": "v2"}}}, "default")
            await until(lambda: rec.store.objects["Pod/default/new"]["metadata"]["labels"]
                        .get("version") == "v2", "the label change")
            server.delete("Service", "web", "default")
            await until(lambda: "Service/default/web" not in rec.store.objects, "the delete")
            deltas = rec.updates[1:]
            assert deltas and not any(u.resync for u in deltas)
            assert any(u.deletes == {"Service/default/web"} for u in deltas)
            assert rec.store.objects == server_objects(server)
            assert rec.store.objects["Pod/default/new"]["kind"] == "Pod"
            assert server.list_requests("pods") and len(server.list_requests("pods")) == 1
        finally:
            await stop(task)

    run(main())


def test_bookmarks_advance_the_resource_version(server: FakeApiServer) -> None:
    async def main() -> None:
        src, rec, task = await start(server)
        try:
            for i in range(3):  # other kinds move the global resourceVersion on
                server.create({"kind": "Namespace", "metadata": {"name": f"extra-{i}"}})
            await until(lambda: "Namespace//extra-2" in rec.store.objects, "namespaces")
            before = src.status["Pod"].resource_version
            n_updates = len(rec.updates)
            server.bookmark()
            want = str(server.resource_version)
            await until(lambda: src.status["Pod"].resource_version == want, "the pod bookmark")
            assert before != want and src.status["Pod"].bookmarks >= 1
            assert len(rec.updates) == n_updates  # a bookmark is not an update
            # A reconnect resumes from the bookmarked version, not from the list's.
            watches = len(server.watch_requests("pods"))
            server.end_watches()
            await until(lambda: len(server.watch_requests("pods")) > watches, "a new pod watch")
            assert server.watch_requests("pods")[-1].query["resourceVersion"] == want
            assert server.watch_requests("pods")[-1].query["allowWatchBookmarks"] == "true"
            assert len(server.list_requests("pods")) == 1
        finally:
            await stop(task)

    run(main())


def test_compacted_resource_version_gets_410_and_the_source_relists() -> None:
    async def main() -> None:
        with FakeApiServer(window=3) as server:
            for obj in SEED:
                server.create(obj)
            src, rec, task = await start(server)
            try:
                server.pause_watches()
                server.drop_watches()
                await until(lambda: all(s.errors >= 1 for s in src.status.values()),
                            "every watch to notice the drop")
                # Changes made while the source cannot watch, then compacted away.
                server.delete("Pod", "web-0", "default")
                server.create(pod("late"))
                for i in range(4):
                    server.create({"kind": "Namespace", "metadata": {"name": f"gap-{i}"}})
                server.resume_watches()
                await until(lambda: src.status["Pod"].relists >= 1, "a 410 on the pod watch")
                await until(lambda: rec.store.objects == server_objects(server), "convergence")
                assert "Pod/default/web-0" not in rec.store.objects
                resyncs = [u for u in rec.updates[1:] if u.resync]
                assert resyncs and set(resyncs[-1].upserts) == set(server_objects(server))
                assert len(server.list_requests("pods")) == 2
            finally:
                await stop(task)

    run(main())


def test_a_live_watch_expired_by_the_server_relists(server: FakeApiServer) -> None:
    async def main() -> None:
        src, rec, task = await start(server, kinds=("Pod", "Namespace"))
        try:
            server.expire_watches()
            server.create(pod("after-expiry"))
            await until(lambda: src.status["Pod"].relists >= 1, "the relist")
            await until(lambda: "Pod/default/after-expiry" in rec.store.objects, "the new pod")
            assert rec.store.objects == server_objects(server, ("Pod", "Namespace"))
        finally:
            await stop(task)

    run(main())


def test_dropped_watches_reconnect_with_growing_backoff(server: FakeApiServer) -> None:
    async def main() -> None:
        src, rec, task = await start(server, kinds=("Pod",))
        try:
            lists = len(server.list_requests("pods"))
            server.fail_requests(4)  # the next four pod watches answer 500
            server.drop_watches()
            await until(lambda: len(src.status["Pod"].delays) >= 5, "five retries")
            server.create(pod("after-drop"))
            await until(lambda: "Pod/default/after-drop" in rec.store.objects, "the new pod")
            # Drop, then four 500s: each wait doubles (jitter pinned to its low end).
            assert src.status["Pod"].delays == [0.005, 0.01, 0.02, 0.04, 0.08]
            assert "500" in (src.status["Pod"].last_error or "")
            assert len(server.list_requests("pods")) == lists  # resumed, not re-listed
            assert rec.store.objects == server_objects(server, ("Pod",))
        finally:
            await stop(task)

    run(main())


def test_a_kind_not_served_yet_does_not_block_sync(server: FakeApiServer) -> None:
    async def main() -> None:
        server.hide_kind("HTTPRoute")
        src, rec, task = await start(server,
                                     open_kinds=tuple(k for k in KINDS if k != "HTTPRoute"))
        try:
            assert not any(k.startswith("HTTPRoute/") for k in rec.updates[0].upserts)
            assert src.status["HTTPRoute"].served is False
            server.hide_kind("HTTPRoute", False)  # the CRD gets installed
            await until(lambda: "HTTPRoute/default/web" in rec.store.objects, "the route")
            assert rec.updates[-1].resync is True
            assert rec.store.objects == server_objects(server)
        finally:
            await stop(task)

    run(main())


def test_unknown_kind_is_refused() -> None:
    with FakeApiServer() as srv, pytest.raises(ValueError, match="no list/watch API"):
        KubernetesSource(srv.api_client(), kinds=("Pod", "Deployment"))


def test_pod_annotation_patches_over_http_reach_the_source(server: FakeApiServer) -> None:
    import kubernetes.client

    async def main() -> None:
        src, rec, task = await start(server, kinds=("Pod",))
        try:
            v1 = kubernetes.client.CoreV1Api(server.api_client())
            key = "ambient.istio.io/redirection"
            await asyncio.to_thread(v1.patch_namespaced_pod, "web-1", "default",
                                    {"metadata": {"annotations": {key: "enabled"}}})
            await until(lambda: rec.store.objects["Pod/default/web-1"]["metadata"]
                        .get("annotations", {}).get(key) == "enabled", "the merge patch")
            await asyncio.to_thread(v1.patch_namespaced_pod, "web-2", "default", [
                {"op": "add", "path": "/metadata/annotations",
                 "value": {key: "pending"}}])
            await until(lambda: rec.store.objects["Pod/default/web-2"]["metadata"]
                        .get("annotations", {}).get(key) == "pending", "the JSON patch")
            stale = server.get("Pod", "web-3", "default")
            assert stale is not None
            server.patch("Pod", "web-3", {"metadata": {"labels": {"x": "y"}}}, "default")
            with pytest.raises(kubernetes.client.ApiException) as info:
                await asyncio.to_thread(v1.replace_namespaced_pod, "web-3", "default", stale)
            assert info.value.status == 409
        finally:
            await stop(task)

    run(main())
